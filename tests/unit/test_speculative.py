"""Speculative decoding's pure parts: prompt lookup, greedy acceptance, and speculative sampling keeping the
model's distribution (chi-square tests over 10^4 draws)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from corolla.algorithms.speculative import GuessBudget, accept_greedy, accept_sampled, lookup_guesses


def test_lookup_finds_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    # "1 2 3" occurs at 0 and 4; the latest earlier one (4) is followed by 7 8 5
    assert lookup_guesses(tokens, num_tokens=3) == [7, 8, 5]
    assert lookup_guesses(tokens, num_tokens=10) == [7, 8, 5, 1, 2, 3]  # as many as follow it
    assert lookup_guesses(tokens, num_tokens=2, max_ngram=1, min_ngram=1) == [7, 8]  # "3" last occurred at 6
    assert lookup_guesses([4, 5, 6], num_tokens=3) == []
    assert lookup_guesses([], num_tokens=3) == [] and lookup_guesses([4], num_tokens=3) == []
    assert lookup_guesses(tokens, num_tokens=0) == []


def test_lookup_prefers_a_longer_match():
    # the last token 3 followed 3 at index 1 (-> 4); but "2 3" occurred at 5..6, followed by 8
    tokens = [3, 3, 4, 0, 0, 2, 3, 8, 1, 2, 3]
    assert lookup_guesses(tokens, num_tokens=1, max_ngram=2) == [8]
    assert lookup_guesses(tokens, num_tokens=1, max_ngram=1, min_ngram=1) == [8]  # the latest 3 is at index 6 too
    assert lookup_guesses([5, 1, 6, 2, 1], num_tokens=1, max_ngram=3, min_ngram=1) == [6]  # falls back to n = 1
    assert lookup_guesses([5, 1, 6, 2, 1], num_tokens=1) == []  # by default a single token is not matched


def test_accept_greedy_keeps_the_matching_prefix_plus_one():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept_greedy([5, 6, 7], [5, 1, 7, 8]) == [5, 1]
    assert accept_greedy([5, 6, 7], [2, 6, 7, 8]) == [2]
    assert accept_greedy([], [4]) == [4]
    with pytest.raises(ValueError, match="need 3 target tokens"):
        accept_greedy([1, 2], [1, 2])


def _distribution(seed: int, vocab: int) -> torch.Tensor:
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 1.5
    return torch.softmax(logits, dim=0)


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    probs = probs.double() / probs.double().sum()
    expected = probs * counts.sum()
    keep = expected > 5  # chi-square needs enough expected counts per cell; pool the rest
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]]).double()
    expected = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


@pytest.mark.parametrize("draft", ["draft model", "deterministic guess"])
def test_speculative_sampling_keeps_the_target_distribution(draft):
    """The first two emitted tokens: the first is distributed as p0, the second (given the first) as the model's
    next distribution, whatever the draft proposes. Over 10^4 draws, chi-square p-values stay above 0.001."""
    vocab, draws = 6, 10_000
    p0, p1_after = _distribution(1, vocab), {t: _distribution(10 + t, vocab) for t in range(vocab)}
    q0, q1_after = _distribution(2, vocab), {t: _distribution(20 + t, vocab) for t in range(vocab)}
    rng = torch.Generator().manual_seed(0)
    first, second_after_0 = torch.zeros(vocab), torch.zeros(vocab)
    accepted = 0
    for _ in range(draws):
        if draft == "draft model":
            g0 = int(torch.multinomial(q0, 1, generator=rng))
            g1 = int(torch.multinomial(q1_after[g0], 1, generator=rng))
            draft_probs = torch.stack([q0, q1_after[g0]])
        else:
            g0, g1, draft_probs = 0, 3, None
        target = torch.stack([p0, p1_after[g0], _distribution(99, vocab)])
        emitted = accept_sampled([g0, g1], target, generator=rng, draft_probs=draft_probs)
        assert 1 <= len(emitted) <= 3
        accepted += len(emitted) - 1
        first[emitted[0]] += 1
        if emitted[0] == 0 and len(emitted) >= 2:
            second_after_0[emitted[1]] += 1
    assert _chi_square_p(first, p0) > 1e-3
    # given the first token 0, the second must follow p1_after[0] (when a second token was emitted at all: it is
    # emitted exactly when the first was an accepted guess equal to 0, which does not bias its value)
    if second_after_0.sum() > 500:
        assert _chi_square_p(second_after_0, p1_after[0]) > 1e-3
    if draft == "draft model":  # the expected acceptance of the first guess is sum(min(p, q))
        rate = torch.minimum(p0, q0).sum().item()
        assert accepted / draws >= 0.8 * rate


def test_speculative_sampling_with_a_perfect_draft_accepts_everything():
    p = _distribution(3, 5)
    target = torch.stack([p, p, p])
    draft = torch.stack([p, p])
    rng = torch.Generator().manual_seed(0)
    lengths = [len(accept_sampled([1, 2], target, generator=rng, draft_probs=draft)) for _ in range(200)]
    assert all(length == 3 for length in lengths)


def test_speculative_sampling_rejects_a_guess_the_model_never_picks():
    p = torch.tensor([0.5, 0.5, 0.0])
    target = torch.stack([p, p])
    rng = torch.Generator().manual_seed(0)
    for _ in range(100):
        emitted = accept_sampled([2], target, generator=rng)
        assert len(emitted) == 1 and emitted[0] in (0, 1)


def test_speculative_sampling_checks_shapes():
    with pytest.raises(ValueError, match="target_probs of shape"):
        accept_sampled([1, 2], torch.ones(2, 4) / 4, generator=None)
    with pytest.raises(ValueError, match="draft_probs must have shape"):
        accept_sampled([1], torch.ones(2, 4) / 4, generator=None, draft_probs=torch.ones(2, 4) / 4)


def test_guess_budget_guesses_most_while_guesses_are_accepted():
    budget = GuessBudget(max_tokens=8)
    assert budget.allowed() == 8
    budget.observe(proposed=8, accepted=8)
    assert budget.allowed() == 8
    budget.observe(proposed=8, accepted=3)  # a rejection: one more than was accepted
    assert budget.allowed() == 4
    budget.observe(proposed=4, accepted=4)
    assert budget.allowed() == 6
    budget.observe(proposed=0, accepted=0)  # nothing guessed (no match): nothing learned
    assert budget.allowed() == 6


def test_guess_budget_backs_off_where_guesses_fail():
    """Text written from scratch: each step whose guesses all fail doubles the pause (1, 2, 4, ... 16 steps), so
    at most about one step in 16 carries a (single) wasted guess; one accepted guess ends the back-off."""
    budget = GuessBudget(max_tokens=8)
    proposals, wasted = [], 0
    for step in range(200):
        allowed = budget.allowed()
        if allowed:
            proposals.append(step)
            wasted += allowed
            budget.observe(proposed=allowed, accepted=0)
    assert proposals[:6] == [0, 2, 5, 10, 19, 36]
    assert all(b - a == 17 for a, b in zip(proposals[5:], proposals[6:]))  # then every 17th step
    assert wasted == 8 + len(proposals) - 1  # a full guess once, single tokens afterwards
    budget.skip = 0
    budget.observe(proposed=1, accepted=1)
    assert budget.failures == 0 and budget.allowed() == 3


def test_guess_budget_checks_its_size():
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        GuessBudget(max_tokens=0)
