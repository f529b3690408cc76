"""One API request's generation: ``n`` choices of one prompt, run as rows of one inference session through the
swarm, turned into text pieces with stop sequences applied and a finish reason per choice."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from corolla.api.served_models import ServedModel
from corolla.api.text_stream import TextAssembler
from corolla.client.sampling import SamplingParams
from corolla.client.text_generation import generate_tokens


@dataclass(frozen=True, kw_only=True)
class ChoiceDelta:
    """New text of one choice; ``finish_reason`` ("stop" or "length") once the choice has ended."""

    index: int
    text: str
    finish_reason: str | None = None


class Completion:
    """Generates the choices of one request; ``completion_tokens`` counts the tokens generated so far."""

    def __init__(
        self,
        served: ServedModel,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        params: SamplingParams,
        n: int = 1,
        stop: Sequence[str] = (),
        seed: int | None = None,
        lookup_tokens: int = 0,
    ):
        self.served, self.prompt_ids, self.max_new_tokens = served, list(prompt_ids), max_new_tokens
        self.lookup_tokens = lookup_tokens  # speculative decoding with prompt lookup (one choice only)
        self.params, self.n, self.stop = params, n, tuple(stop)
        self.generator = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        self.completion_tokens = 0
        self.response_id = ""  # set by the API for its response's envelope
        self.created = int(time.time())

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    async def deltas(self) -> AsyncIterator[list[ChoiceDelta]]:
        """For each generation step, what changed: a delta per choice that got text or ended at that step."""
        served, eos = self.served, set(self.served.eos_token_ids)
        texts = [TextAssembler(served.decode, self.stop) for _ in range(self.n)]
        reasons: list[str | None] = [None] * self.n
        input_ids = torch.tensor([self.prompt_ids] * self.n, dtype=torch.long)
        steps = generate_tokens(
            served.model, input_ids, max_new_tokens=self.max_new_tokens, params=self.params,
            eos_token_ids=served.eos_token_ids, generator=self.generator, lookup_tokens=self.lookup_tokens,
        )  # fmt: skip
        async with contextlib.aclosing(steps):
            async for step in steps:
                changed = []
                for i, text in enumerate(texts):
                    if reasons[i] is not None:
                        continue
                    token = int(step.tokens[i])
                    self.completion_tokens += 1
                    if token in eos:
                        piece, reasons[i] = text.finish(), "stop"
                    else:
                        piece = text.add(token)
                        if text.stopped:
                            reasons[i] = "stop"
                        elif bool(step.finished[i]):
                            piece, reasons[i] = piece + text.finish(), "length"
                    if piece or reasons[i] is not None:
                        changed.append(ChoiceDelta(index=i, text=piece, finish_reason=reasons[i]))
                yield changed
                if all(reason is not None for reason in reasons):
                    return
