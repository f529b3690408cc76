"""Inference steps of several sessions through one span, run as one batched forward.

A decode step of one session is a matrix-vector product per weight: it reads every weight of the span to do a little
arithmetic, so its time is the time to read the weights. Steps of several sessions merged into one forward read the
weights once for all of them (the technique serving engines call continuous batching).

Sessions differ in length, so their caches are merged left-padded: session ``i`` with ``past_i`` cached tokens gets
``max(past) - past_i`` padding positions in front, masked out by the attention mask, and explicit position ids that
are the ones it would have alone. Attention then sees exactly each session's own keys, at the same relative
distances (rotary, ALiBi and sliding windows depend only on those), so every session's output equals its output
alone up to float rounding. After the forward, each session's cache gets its own new keys and values appended.

Steps are merged only when they run the same blocks of the same span with the same number of new tokens and no
deep prompts (``can_merge``); the caller groups them and applies the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from corolla.models.span import SpanInputs, SpanModel


@dataclass(kw_only=True)
class SessionStep:
    """One session's step: its validated inputs and its cache (already cropped to the step's position)."""

    inputs: SpanInputs
    cache: DynamicCache

    @property
    def rows(self) -> int:
        return self.inputs.hidden_states.shape[0]

    @property
    def new_tokens(self) -> int:
        return self.inputs.hidden_states.shape[1]


def can_merge(steps: list[SessionStep]) -> bool:
    """Whether ``steps`` can run as one forward: same number of new tokens, same number of cache layers."""
    return (
        len(steps) > 1
        and len({step.new_tokens for step in steps}) == 1
        and len({len(step.cache.layers) for step in steps}) == 1
    )


def run_merged(span: SpanModel, steps: list[SessionStep], *, start: int, end: int) -> list[torch.Tensor]:
    """Run ``steps`` (see ``can_merge``) through blocks ``start..end-1`` as one forward; each step's cache grows by
    its new tokens. Returns each step's output hidden states [rows, new_tokens, hidden], in order."""
    if not can_merge(steps):
        raise ValueError("these steps cannot be merged: they need the same number of new tokens and cache layers")
    new_tokens = steps[0].new_tokens
    pasts = [step.cache.get_seq_length() for step in steps]
    longest = max(pasts)
    hidden = torch.cat([step.inputs.hidden_states for step in steps])
    device = hidden.device
    masks, positions = [], []
    for step, past in zip(steps, pasts):
        mask = step.inputs.attention_mask
        if mask is None:
            mask = torch.ones(step.rows, past + new_tokens, dtype=torch.long, device=device)
        masks.append(torch.cat([torch.zeros(step.rows, longest - past, dtype=mask.dtype, device=device), mask], 1))
        position_ids = step.inputs.position_ids
        if position_ids is None:  # what transformers uses alone: consecutive positions after the cache
            position_ids = torch.arange(past, past + new_tokens, device=device).expand(step.rows, new_tokens)
        positions.append(position_ids)
    merged = span.new_cache(start, end)
    if longest > 0:
        for index, layer in enumerate(merged.layers):
            keys, values = (_left_padded(steps, index, name, longest) for name in ("keys", "values"))
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
    inputs = SpanInputs(hidden_states=hidden, attention_mask=torch.cat(masks), position_ids=torch.cat(positions))
    output = span(inputs, merged, start=start, end=end)
    outputs, row = [], 0
    for step in steps:
        rows = slice(row, row + step.rows)
        for index, layer in enumerate(merged.layers):
            keys, values = layer.keys[rows, ..., -new_tokens:, :], layer.values[rows, ..., -new_tokens:, :]
            step.cache.layers[index].update(keys.contiguous(), values.contiguous())
        outputs.append(output[rows])
        row += step.rows
    return outputs


def _left_padded(steps: list[SessionStep], index: int, name: str, length: int) -> torch.Tensor:
    """Layer ``index``'s ``name`` tensors ("keys"/"values") of every session, left-padded with zeros to ``length``
    positions and concatenated along the batch (a session with an empty cache is all padding)."""
    layers = [step.cache.layers[index] for step in steps]
    like = next(getattr(layer, name) for layer in layers if layer.get_seq_length() > 0)
    parts = []
    for step, layer in zip(steps, layers):
        held = (
            getattr(layer, name)
            if layer.get_seq_length() > 0
            else like[:0].new_zeros(step.rows, *like.shape[1:-2], 0, like.shape[-1])
        )
        pad = length - held.shape[-2]
        if pad:
            held = torch.cat([held.new_zeros(*held.shape[:-2], pad, held.shape[-1]), held], dim=-2)
        parts.append(held)
    return torch.cat(parts)
