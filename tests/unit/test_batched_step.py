"""Steps of several sessions merged into one forward equal each session run alone, for every family.

Sessions of different lengths (one of them a padded batch of two rows with its own attention mask and position ids,
one that has seen nothing yet) decode together for several steps; each one's outputs and cache must equal what the
same span computes for that session alone, and a session that then continues alone must still be right.
"""

from __future__ import annotations

import functools

import pytest
import torch

from corolla.models.batched_step import SessionStep, can_merge, run_merged
from corolla.models.checkpoint import resolve_checkpoint
from corolla.models.span import SpanInputs, SpanModel, load_span
from tests.fixtures.zoo import FAMILIES, SLIDING_WINDOW, zoo_checkpoint

ATOL = RTOL = 1e-5
START, END = 1, 5


@functools.cache
def _span(family: str) -> SpanModel:
    return load_span(resolve_checkpoint(str(zoo_checkpoint(family))), START, END)


def _hidden(span: SpanModel, rows: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, tokens, span.config.hidden_size, generator=torch.Generator().manual_seed(seed))


class _Session:
    """A session's whole input sequence, fed to a span either alone (reference) or merged with others."""

    def __init__(self, span: SpanModel, *, rows: int, prompt: int, total: int, seed: int, padded: int = 0):
        self.span, self.prompt, self.total = span, prompt, total
        self.hidden = _hidden(span, rows, total, seed)
        self.mask = None
        if padded:  # row 0 is left-padded: its first `padded` positions are masked out, its positions start later
            self.mask = torch.ones(rows, total, dtype=torch.long)
            self.mask[0, :padded] = 0
        self.cache = span.new_cache(START, END)
        self.length = 0

    def inputs(self, tokens: int) -> SpanInputs:
        end = self.length + tokens
        mask = positions = None
        if self.mask is not None:
            mask = self.mask[:, :end]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, self.length : end]
        return SpanInputs(hidden_states=self.hidden[:, self.length : end], attention_mask=mask, position_ids=positions)

    def alone(self, tokens: int) -> torch.Tensor:
        output = self.span(self.inputs(tokens), self.cache, start=START, end=END)
        self.length += tokens
        return output

    def reference(self) -> torch.Tensor:
        """The whole sequence through a fresh cache, one forward (the exact-by-construction result)."""
        end, self.length = self.length, 0
        try:
            return self.span(self.inputs(self.total), start=START, end=END)
        finally:
            self.length = end


def _merged_step(sessions: list[_Session], tokens: int) -> list[torch.Tensor]:
    steps = [SessionStep(inputs=s.inputs(tokens), cache=s.cache) for s in sessions]
    outputs = run_merged(sessions[0].span, steps, start=START, end=END)
    for s in sessions:
        s.length += tokens
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_merged_decode_steps_equal_each_session_alone(family):
    span = _span(family)
    long = SLIDING_WINDOW + 3 if family == "mistral" else 7  # past the sliding window for the family that has one
    sessions = [
        _Session(span, rows=1, prompt=3, total=9, seed=1),
        _Session(span, rows=2, prompt=long, total=long + 6, seed=2, padded=2),
        _Session(span, rows=1, prompt=5, total=11, seed=3),
    ]
    prompts = [s.alone(s.prompt) for s in sessions]
    outputs = [[p] for p in prompts]
    for _ in range(4):  # four decode steps of all three sessions, merged
        for out, step in zip(outputs, _merged_step(sessions, 1)):
            out.append(step)
    outputs[0].append(sessions[0].alone(sessions[0].total - sessions[0].length))  # then one goes on alone
    for s, out in zip(sessions, outputs):
        got = torch.cat(out, dim=1)
        expected = s.reference()[:, : got.shape[1]]
        valid = slice(None) if s.mask is None else s.mask[:, : got.shape[1]].bool()
        torch.testing.assert_close(got[valid], expected[valid], atol=ATOL, rtol=RTOL)
        assert s.cache.get_seq_length() == s.length


@pytest.mark.parametrize("family", ["llama", "bloom"])
@torch.inference_mode()
def test_a_session_with_an_empty_cache_merges_with_longer_ones(family):
    span = _span(family)
    fresh, older = _Session(span, rows=1, prompt=0, total=6, seed=4), _Session(span, rows=1, prompt=4, total=6, seed=5)
    first = older.alone(4)
    got_fresh, got_older = _merged_step([fresh, older], 2)
    torch.testing.assert_close(got_fresh, fresh.reference()[:, :2], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat([first, got_older], 1), older.reference(), atol=ATOL, rtol=RTOL)


@torch.inference_mode()
def test_steps_of_different_lengths_are_not_merged():
    span = _span("llama")
    a, b = _Session(span, rows=1, prompt=2, total=6, seed=6), _Session(span, rows=1, prompt=2, total=6, seed=7)
    steps = [SessionStep(inputs=a.inputs(1), cache=a.cache), SessionStep(inputs=b.inputs(2), cache=b.cache)]
    assert not can_merge(steps) and not can_merge(steps[:1])
    with pytest.raises(ValueError, match="cannot be merged"):
        run_merged(span, steps, start=START, end=END)
