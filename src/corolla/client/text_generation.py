"""Token-by-token generation for asyncio code: many generations share one event loop (a web server's), each with
its own inference session, none blocking a thread while it waits for the swarm.

The steps are those of transformers' ``generate`` with a server-side cache (the whole prompt first, then one token
per step, the full attention mask and the new tokens' position ids), so greedy output equals ``model.generate``.
Local work (embeddings, final norm, LM head) runs in the default thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from corolla.client.sampling import SamplingParams, next_tokens


@dataclass(frozen=True, kw_only=True)
class GenerationStep:
    """The tokens chosen at one step, one per row; ``finished[i]``: row i has just ended or ended before."""

    tokens: torch.Tensor  # [rows] int64
    finished: torch.Tensor  # [rows] bool


async def generate_tokens(
    model,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> AsyncIterator[GenerationStep]:
    """Yield the next token of every row of ``input_ids`` [rows, prompt] until each row has produced an end token
    (``eos_token_ids``) or ``max_new_tokens`` tokens. ``model``: a distributed causal LM
    (``AutoDistributedModelForCausalLM``). The inference session is closed when the iteration ends, fails or is
    abandoned (a cancelled task included), so servers free its cache at once."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    rows, prompt_length = input_ids.shape
    session = model.inference_session(max_length=prompt_length + max_new_tokens)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
    finished = torch.zeros(rows, dtype=torch.bool)
    counts = None
    try:
        step_ids = input_ids
        for index in range(max_new_tokens):
            total = prompt_length + index
            hidden = await asyncio.to_thread(_embed, model, step_ids)
            positions = torch.arange(total - step_ids.shape[1], total).expand(rows, -1)
            mask = torch.ones(rows, total, dtype=torch.long)
            output = await session.astep(hidden, mask, positions)
            logits = await asyncio.to_thread(_last_logits, model, output)
            tokens = next_tokens(logits, params, counts=counts, generator=generator)
            if params.frequency_penalty or params.presence_penalty:
                counts = _count(counts, tokens, logits.shape[-1])
            finished = finished | torch.isin(tokens, eos) | (index + 1 == max_new_tokens)
            yield GenerationStep(tokens=tokens, finished=finished.clone())
            if bool(finished.all()):
                return
            step_ids = tokens[:, None]
    finally:
        await session.aclose()


def _embed(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model._base_model.embed_for_blocks(input_ids)


def _last_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's logits for the last position (after the final norm of all positions, as transformers does)."""
    with torch.no_grad():
        return model.lm_head(model._base_model.finish_blocks(hidden)[:, -1:])[:, -1].float()


def _count(counts: torch.Tensor | None, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.zeros(tokens.shape[0], vocab) if counts is None else counts
    counts[torch.arange(tokens.shape[0]), tokens] += 1
    return counts
