"""Prompt lookup for transformers' ``generate`` (``prompt_lookup_num_tokens=N``) on a distributed model: the guesses
come from ``corolla.algorithms.speculative`` and their number adapts to how many the model accepts.

transformers' own prompt-lookup generator guesses N tokens whenever an n-gram matches. Over a swarm a rejected guess
costs the servers compute for nothing, so this one guesses fewer, and less often, while guesses keep failing
(``GuessBudget``); its guesses also never reach past ``max_length``, so a session needs no extra room for them.
"""

from __future__ import annotations

import torch
from transformers.generation.candidate_generator import CandidateGenerator

from corolla.algorithms.speculative import GuessBudget, lookup_guesses


class LookupCandidates(CandidateGenerator):
    """Guesses for one row: what followed the latest earlier occurrence of the text's last 2-3 tokens, cut before
    an end token."""

    def __init__(self, *, num_tokens: int, max_length: int, eos_token_ids: torch.Tensor | None):
        self.budget = GuessBudget(max_tokens=num_tokens)
        self.max_length = max_length
        self.eos_token_ids = set() if eos_token_ids is None else set(eos_token_ids.flatten().tolist())
        self._proposed = 0

    @property
    def num_drafting_tokens(self) -> int:
        return self.budget.max_tokens

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, None]:
        if input_ids.shape[0] != 1:
            raise ValueError("prompt lookup works on one sequence at a time, not a batch")
        allowed = min(self.budget.allowed(), self.max_length - input_ids.shape[1] - 1)
        guesses = lookup_guesses(input_ids[0].tolist(), num_tokens=allowed) if allowed > 0 else []
        for i, token in enumerate(guesses):
            if token in self.eos_token_ids:
                guesses = guesses[:i]
                break
        self._proposed = len(guesses)
        if not guesses:
            return input_ids, None
        extra = torch.tensor([guesses], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, extra], dim=1), None

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches) -> None:
        self.budget.observe(self._proposed, int(num_matches))
