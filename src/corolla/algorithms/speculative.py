"""Speculative decoding: guess several next tokens cheaply, have the model check them all in one step, keep the
longest correct prefix plus one token of the model's own.

Over a swarm every step costs a round trip through the whole chain of servers, so a step that checks k guesses
and keeps several of them saves round trips; the rejected guesses are dropped from the servers' caches.

- ``lookup_guesses``: prompt lookup (n-gram matching): the tokens that followed the most recent earlier occurrence
  of the text's last n tokens. No draft model; strong on rewriting, extraction and code edits, which copy the
  prompt.
- ``accept_greedy``: with greedy decoding the kept tokens are exactly greedy decoding's.
- ``accept_sampled``: standard speculative sampling (Leviathan et al., 2023; Chen et al., 2023): every kept token
  is distributed exactly as if sampled from the model, for any draft distribution (a deterministic guess, such as
  prompt lookup's, is a draft that puts all its mass on the guess).
- ``GuessBudget``: how many tokens to guess next, from how many guesses were accepted lately. A rejected guess
  costs compute for nothing, so where guesses keep failing (text written from scratch) it guesses fewer and less
  often, and where they succeed (text copied from the prompt) it guesses the most.

Pure functions: the random generator is an argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def lookup_guesses(tokens: Sequence[int], *, num_tokens: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Up to ``num_tokens`` guesses for what follows ``tokens``: for n from ``max_ngram`` down to ``min_ngram``,
    find the most recent earlier occurrence of the last n tokens and return the tokens after it (as many as there
    are, up to ``num_tokens``). No occurrence: no guesses."""
    if num_tokens <= 0 or min_ngram < 1 or max_ngram < min_ngram:
        return []
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = list(tokens[length - n :])
        for start in range(length - n - 1, -1, -1):  # latest first; the suffix itself (start = length - n) excluded
            if list(tokens[start : start + n]) == suffix:
                follow = tokens[start + n : start + n + num_tokens]
                return [int(t) for t in follow]
    return []


def accept_greedy(guesses: Sequence[int], target_tokens: Sequence[int]) -> list[int]:
    """The tokens greedy decoding emits: ``target_tokens[i]`` is the model's argmax after the guesses before i
    (``len(guesses) + 1`` of them). Keeps guesses while they equal the model's choice, then the model's next token."""
    if len(target_tokens) != len(guesses) + 1:
        raise ValueError(f"{len(guesses)} guesses need {len(guesses) + 1} target tokens, got {len(target_tokens)}")
    emitted = []
    for guess, target in zip(guesses, target_tokens):
        emitted.append(int(target))
        if int(target) != int(guess):
            return emitted
    emitted.append(int(target_tokens[-1]))
    return emitted


def accept_sampled(
    guesses: Sequence[int],
    target_probs: torch.Tensor,
    *,
    generator: torch.Generator | None,
    draft_probs: torch.Tensor | None = None,
) -> list[int]:
    """Speculative sampling. ``target_probs`` [len(guesses) + 1, vocab]: the model's distribution at each guess's
    position and after the last guess; ``draft_probs`` [len(guesses), vocab]: the distribution each guess was drawn
    from (None: deterministic guesses). Guess i is kept with probability min(1, p(g)/q(g)); at the first rejection
    a token is drawn from the normalized residual max(p - q, 0); if all are kept, one more from the last target row.
    Every emitted token is then distributed as a sample from the model."""
    k = len(guesses)
    if target_probs.dim() != 2 or target_probs.shape[0] != k + 1:
        raise ValueError(f"{k} guesses need target_probs of shape [{k + 1}, vocab], got {tuple(target_probs.shape)}")
    if draft_probs is not None and tuple(draft_probs.shape) != (k, target_probs.shape[1]):
        raise ValueError(f"draft_probs must have shape [{k}, {target_probs.shape[1]}], got {tuple(draft_probs.shape)}")
    target_probs = target_probs.double()
    emitted = []
    for i, guess in enumerate(guesses):
        p = target_probs[i]
        q = _one_hot(guess, p) if draft_probs is None else draft_probs[i].double()
        q_guess = float(q[guess])
        accept = 1.0 if q_guess <= 0 else min(1.0, float(p[guess]) / q_guess)
        if q_guess > 0 and float(torch.rand((), generator=generator, dtype=torch.float64)) < accept:
            emitted.append(int(guess))
            continue
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q: cannot happen after a rejection, unless rounding; p is right then
            residual = p
        emitted.append(_draw(residual, generator))
        return emitted
    emitted.append(_draw(target_probs[k], generator))
    return emitted


@dataclass
class GuessBudget:
    """The number of tokens to guess at each step, adapted to the guesses' fate.

    The length starts at ``max_tokens``; after all guesses of a step are accepted it grows by 2 (up to
    ``max_tokens``), after a rejection it becomes one more than the number accepted. A step whose guesses are all
    rejected also pauses guessing: for 1 step after the first such step in a row, then 2, 4, ... up to ``max_skip``
    steps; any accepted guess ends the pause sequence.
    """

    max_tokens: int
    max_skip: int = 16
    length: int = field(init=False)
    failures: int = field(default=0, init=False)  # steps in a row whose guesses were all rejected
    skip: int = field(default=0, init=False)  # steps left without guessing

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.length = self.max_tokens

    def allowed(self) -> int:
        """How many tokens the coming step may guess (0 while paused); call once per step."""
        if self.skip > 0:
            self.skip -= 1
            return 0
        return self.length

    def observe(self, proposed: int, accepted: int) -> None:
        """The fate of a step's guesses: ``accepted`` of the ``proposed`` were kept."""
        if proposed <= 0:
            return
        if accepted >= proposed:
            self.length = min(self.max_tokens, self.length + 2)
        else:
            self.length = max(1, min(self.max_tokens, accepted + 1))
        if accepted == 0:
            self.failures += 1
            self.skip = min(self.max_skip, 2 ** (self.failures - 1))
        else:
            self.failures = 0


def _one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
