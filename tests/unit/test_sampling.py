"""Choosing tokens from logits (``corolla.client.sampling``): greedy, temperature, top-k, nucleus, penalties."""

from __future__ import annotations

import pytest
import torch

from corolla.client.sampling import SamplingParams, next_tokens


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert next_tokens(logits, SamplingParams(temperature=0), counts=None, generator=None).tolist() == [1, 0]


def test_penalties_follow_openai_formula():
    logits = torch.tensor([[2.0, 1.8, 0.0]])
    counts = torch.tensor([[2.0, 0.0, 0.0]])  # token 0 generated twice
    # 2.0 - 2*0.1 - 0.1 = 1.7 < 1.8: the penalized token loses
    params = SamplingParams(temperature=0, frequency_penalty=0.1, presence_penalty=0.1)
    assert next_tokens(logits, params, counts=counts, generator=None).tolist() == [1]
    assert next_tokens(logits, SamplingParams(temperature=0), counts=counts, generator=None).tolist() == [0]


def draws(logits, params, count=4000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = logits.expand(count, -1)
    return next_tokens(rows, params, counts=None, generator=generator)


def test_seeded_sampling_repeats_and_follows_the_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    first, again = draws(logits, SamplingParams()), draws(logits, SamplingParams())
    assert torch.equal(first, again)
    freq = torch.bincount(first, minlength=3).float() / len(first)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


def test_low_temperature_sharpens():
    logits = torch.log(torch.tensor([[0.6, 0.4]]))
    freq = torch.bincount(draws(logits, SamplingParams(temperature=0.25)), minlength=2).float() / 4000
    expected = torch.softmax(logits[0] / 0.25, -1)  # 0.835 / 0.165
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set(draws(logits, SamplingParams(top_p=0.8)).tolist())
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8; the rest is never drawn
    assert set(draws(logits, SamplingParams(top_p=0.81)).tolist()) == {0, 1, 2}
    assert set(draws(logits, SamplingParams(top_p=0.01)).tolist()) == {0}  # the most likely always stays


def test_top_k():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]]))
    assert set(draws(logits, SamplingParams(top_k=2)).tolist()) == {1, 2}


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
     ({"presence_penalty": 3}, "presence_penalty")],
)  # fmt: skip
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
