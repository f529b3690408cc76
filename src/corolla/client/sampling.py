"""Choosing the next token from logits the way OpenAI's API defines its settings: greedy at temperature 0, else
temperature, nucleus (top-p) and top-k sampling, with frequency and presence penalties on the tokens generated so
far. The random generator is an argument (a request's ``seed`` makes its samples repeatable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens. ``temperature`` 0 is greedy (the other settings then only apply the penalties)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence of a token in the output
    presence_penalty: float = 0.0  # subtracted once if a token occurred in the output at all

    def __post_init__(self):
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, *, counts: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab]. ``counts`` [rows, vocab]: how often each token was generated
    so far in each row (for the penalties; None: no tokens yet)."""
    if params.greedy:
        return _penalized(logits, params, counts).argmax(dim=-1)
    probs = probabilities(logits, params, counts=counts)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, params: SamplingParams, *, counts: torch.Tensor | None) -> torch.Tensor:
    """The distribution ``next_tokens`` draws from, per row [rows, vocab] (greedy: all mass on the argmax)."""
    logits = _penalized(logits, params, counts)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if params.top_p < 1:
        logits = _nucleus(logits, params.top_p)
    return torch.softmax(logits, dim=-1)


def _penalized(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if counts is not None and (params.frequency_penalty or params.presence_penalty):
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities add up to ``top_p`` (always at least the most likely)."""
    ordered, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
    drop = cumulative - torch.softmax(ordered, dim=-1) >= top_p  # the mass before a token already reaches top_p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
