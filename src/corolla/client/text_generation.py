"""Token-by-token generation for asyncio code: many generations share one event loop (a web server's), each with
its own inference session, none blocking a thread while it waits for the swarm.

The steps are those of transformers' ``generate`` with a server-side cache (the whole prompt first, then one token
per step, the full attention mask and the new tokens' position ids), so greedy output equals ``model.generate``;
with prompt lookup a step also carries guessed tokens (speculative decoding), and greedy output is still the same.
Local work (embeddings, final norm, LM head) runs in the default thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from corolla.algorithms.speculative import GuessBudget, accept_greedy, accept_sampled, lookup_guesses
from corolla.client.sampling import SamplingParams, next_tokens, probabilities


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
    lookup_tokens: int = 0,
) -> AsyncIterator[GenerationStep]:
    """Yield the next token of every row of ``input_ids`` [rows, prompt] until each row has produced an end token
    (``eos_token_ids``) or ``max_new_tokens`` tokens. ``model``: a distributed causal LM
    (``AutoDistributedModelForCausalLM``). The inference session is closed when the iteration ends, fails or is
    abandoned (a cancelled task included), so servers free its cache at once.

    ``lookup_tokens`` > 0 (one row only): speculative decoding with prompt lookup. Each step also sends up to that
    many guessed tokens (what followed the latest earlier occurrence of the text's last tokens; fewer, and less
    often, while guesses keep failing: ``GuessBudget``); the servers compute them all at once, the guesses the
    model agrees with are kept (greedy: exactly greedy decoding's tokens; sampling: speculative sampling, the
    model's own distribution) and the rest are dropped from their caches. Tokens are still yielded one by one.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if lookup_tokens < 0:
        raise ValueError(f"lookup_tokens must be >= 0, got {lookup_tokens}")
    rows, prompt_length = input_ids.shape
    lookup_tokens = lookup_tokens if rows == 1 else 0
    # guesses never reach past max_new_tokens, so the session needs no extra room for them
    session = model.inference_session(max_length=prompt_length + max_new_tokens)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
    finished = torch.zeros(rows, dtype=torch.bool)
    history = input_ids[0].tolist() if lookup_tokens else None  # the text so far, where guesses come from
    budget = GuessBudget(max_tokens=lookup_tokens) if lookup_tokens else None  # fewer guesses where they fail
    counts, produced, feed = None, 0, input_ids
    try:
        while True:
            guesses = []
            if budget is not None:
                allowed = min(budget.allowed(), max_new_tokens - produced - 1)
                guesses = lookup_guesses(history, num_tokens=allowed) if allowed > 0 else []
            step_ids = torch.cat([feed, torch.tensor([guesses], dtype=feed.dtype)], dim=1) if guesses else feed
            start = session.position
            total = start + step_ids.shape[1]
            hidden = await asyncio.to_thread(_embed, model, step_ids)
            positions = torch.arange(start, total).expand(rows, -1)
            mask = torch.ones(rows, total, dtype=torch.long)
            output = await session.astep(hidden, mask, positions)
            logits = await asyncio.to_thread(_logits, model, output, len(guesses) + 1)
            if guesses:
                emitted = _check_guesses(guesses, logits[0], params, counts, generator)
                budget.observe(len(guesses), len(emitted) - 1)
                session.rewind(start + feed.shape[1] + len(emitted) - 1)  # keep the guesses that were accepted
                chosen = [torch.tensor([token]) for token in emitted]
            else:
                chosen = [next_tokens(logits[:, -1], params, counts=counts, generator=generator)]
            for tokens in chosen:
                produced += 1
                if params.frequency_penalty or params.presence_penalty:
                    counts = _count(counts, tokens, logits.shape[-1])
                if history is not None:
                    history.append(int(tokens[0]))
                finished = finished | torch.isin(tokens, eos) | (produced == max_new_tokens)
                yield GenerationStep(tokens=tokens, finished=finished.clone())
                if bool(finished.all()):
                    return
            feed = chosen[-1][:, None]
    finally:
        await session.aclose()


def _check_guesses(guesses: list[int], logits: torch.Tensor, params: SamplingParams, counts, generator) -> list[int]:
    """The tokens to keep of one speculative step (``logits`` [len(guesses) + 1, vocab], one row): the accepted
    guesses plus the model's next token. The distribution at guess i counts the guesses before it as generated."""
    rows = []
    counts = None if counts is None else counts.clone()  # the guesses count here only, not in the caller's counts
    for i in range(len(guesses) + 1):
        if i and (params.frequency_penalty or params.presence_penalty):
            counts = _count(counts, torch.tensor([guesses[i - 1]]), logits.shape[-1])
        rows.append(probabilities(logits[i : i + 1], params, counts=counts)[0])
    if params.greedy:
        return accept_greedy(guesses, [int(row.argmax()) for row in rows])
    return accept_sampled(guesses, torch.stack(rows), generator=generator)


def _embed(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model._base_model.embed_for_blocks(input_ids)


def _logits(model, hidden: torch.Tensor, positions: int) -> torch.Tensor:
    """The LM head's logits [rows, positions, vocab] for the last ``positions`` positions (after the final norm of
    all positions, as transformers does)."""
    with torch.no_grad():
        return model.lm_head(model._base_model.finish_blocks(hidden)[:, -positions:]).float()


def _count(counts: torch.Tensor | None, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.zeros(tokens.shape[0], vocab) if counts is None else counts
    counts[torch.arange(tokens.shape[0]), tokens] += 1
    return counts
