"""Checks of untrusted span-call tensors (by servers on requests, by clients on proofs they check). Each failure
raises InvalidRequestError saying what was wrong."""

from __future__ import annotations

import torch

from corolla.errors import InvalidRequestError


def check_span(start: int, end: int, *, served: tuple[int, int]) -> None:
    """The requested blocks must be a non-empty sub-range of the blocks this server hosts."""
    if not (isinstance(start, int) and isinstance(end, int)):
        raise InvalidRequestError(f"block range must be integers, got {start!r}:{end!r}")
    if start >= end:
        raise InvalidRequestError(f"block range {start}:{end} is empty: the end block must be greater than the start")
    if not served[0] <= start < end <= served[1]:
        raise InvalidRequestError(
            f"blocks {start}:{end} are not hosted here; this server hosts blocks {served[0]}:{served[1]}"
        )


def check_hidden_states(
    hidden: torch.Tensor, *, hidden_size: int, max_tokens: int, batch_size: int | None = None
) -> None:
    """Hidden states must be a finite float tensor [batch, tokens, hidden_size] within the token limit."""
    if not hidden.is_floating_point():
        raise InvalidRequestError(f"hidden states must be floating point, got {hidden.dtype}")
    if hidden.ndim != 3:
        raise InvalidRequestError(f"hidden states must have shape [batch, tokens, hidden], got {list(hidden.shape)}")
    batch, tokens, size = hidden.shape
    if size != hidden_size:
        raise InvalidRequestError(f"hidden size must be {hidden_size}, got {size}")
    if batch == 0 or tokens == 0:
        raise InvalidRequestError(f"hidden states are empty: shape {list(hidden.shape)}")
    if batch_size is not None and batch != batch_size:
        raise InvalidRequestError(f"the session was opened for batch size {batch_size}, got {batch}")
    if batch * tokens > max_tokens:
        raise InvalidRequestError(
            f"{batch}x{tokens}={batch * tokens} tokens exceed this server's limit of {max_tokens}"
        )
    if not torch.isfinite(hidden).all():
        raise InvalidRequestError("hidden states contain NaN or Inf")


def check_attention_mask(mask: torch.Tensor, *, batch: int, length: int) -> torch.Tensor:
    """A 0/1 mask of shape [batch, length]; returned as int64."""
    if mask.ndim != 2 or tuple(mask.shape) != (batch, length):
        raise InvalidRequestError(f"attention mask must have shape [{batch}, {length}], got {list(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        mask = mask.to(torch.float64)
        if not torch.isfinite(mask).all():
            raise InvalidRequestError("attention mask contains NaN or Inf")
    if not ((mask == 0) | (mask == 1)).all():
        raise InvalidRequestError("attention mask must contain only 0 and 1")
    return mask.to(torch.int64)


def check_position_ids(position_ids: torch.Tensor, *, batch: int, tokens: int, limit: int) -> torch.Tensor:
    """Integer positions of shape [batch, tokens] within [0, limit); returned as int64."""
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise InvalidRequestError(f"position ids must be integers, got {position_ids.dtype}")
    if position_ids.ndim != 2 or tuple(position_ids.shape) != (batch, tokens):
        raise InvalidRequestError(f"position ids must have shape [{batch}, {tokens}], got {list(position_ids.shape)}")
    if (position_ids < 0).any() or (position_ids >= limit).any():
        raise InvalidRequestError(f"position ids must be in [0, {limit})")
    return position_ids.to(torch.int64)


def check_grad_outputs(grad: torch.Tensor, *, like: torch.Tensor) -> None:
    """The gradient of a span's outputs: finite floats of the same shape as its input hidden states."""
    if not grad.is_floating_point():
        raise InvalidRequestError(f"grad_outputs must be floating point, got {grad.dtype}")
    if grad.shape != like.shape:
        raise InvalidRequestError(
            f"grad_outputs must have the shape of the hidden states {list(like.shape)}, got {list(grad.shape)}"
        )
    if not torch.isfinite(grad).all():
        raise InvalidRequestError("grad_outputs contain NaN or Inf")


def check_prompts(prompts: torch.Tensor, *, blocks: int, batch: int, tokens: int, hidden_size: int) -> None:
    """Deep prompts: finite floats of shape [blocks, batch or 1, prefix <= tokens, hidden_size]."""
    if not prompts.is_floating_point():
        raise InvalidRequestError(f"prompts must be floating point, got {prompts.dtype}")
    shape = list(prompts.shape)
    if (
        prompts.ndim != 4
        or shape[0] != blocks
        or shape[1] not in (1, batch)
        or not 0 < shape[2] <= tokens
        or shape[3] != hidden_size
    ):
        raise InvalidRequestError(
            f"prompts must have shape [{blocks} blocks, {batch} or 1, prefix <= {tokens}, {hidden_size}], got {shape}"
        )
    if not torch.isfinite(prompts).all():
        raise InvalidRequestError("prompts contain NaN or Inf")
