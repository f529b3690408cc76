"""corolla.algorithms.output_check: honest rounding passes, lies of each shape are caught, majorities decide."""

from __future__ import annotations

import pytest
import torch

from corolla.algorithms.output_check import agree, majority, token_error, tolerance


def _hidden(seed: int = 0, shape=(2, 16, 64)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_tolerance_is_that_of_the_coarsest_format_and_grows_with_the_blocks():
    fp32 = tolerance([("float32", "none"), ("float32", None)], 1)
    bf16 = tolerance([("torch.float32", "none"), ("bfloat16", "none")], 1)
    nf4 = tolerance([("float32", "none"), ("float16", "nf4")], 1)
    assert fp32 < bf16 < nf4 and fp32 <= 1e-3
    assert tolerance([("float32", "none"), (None, None)], 1) == bf16  # an unannounced dtype: as loose as bfloat16
    assert tolerance([("float32", "some-new-quant")], 1) == nf4  # an unknown quantization: as loose as nf4
    assert tolerance([("bfloat16", "none")], 30) == pytest.approx(bf16 * 30**0.75)
    # the measured rounding of honest servers (SmolLM2, 30 blocks) passes with room to spare
    assert tolerance([("bfloat16", "none")], 30) > 2 * 0.038 and tolerance([(None, "nf4")], 30) > 2 * 0.43


def test_rounding_to_another_dtype_agrees_and_noise_of_one_percent_does_not():
    exact = _hidden()
    assert token_error(exact, exact.clone()) == 0.0
    assert agree(exact.to(torch.bfloat16).float(), exact, tolerance([("bfloat16", "none")], 1))
    assert agree(exact.to(torch.float16).float(), exact, tolerance([("float16", "none")], 1))
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1))
    noisy = exact + 0.01 * noise * exact.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
    assert token_error(noisy, exact) == pytest.approx(0.01, rel=0.05)
    assert not agree(noisy, exact, tolerance([("float32", "none")], 10))


def test_a_lie_about_one_position_of_a_long_prefill_is_not_averaged_away():
    exact = _hidden(shape=(1, 512, 64))
    lie = exact.clone()
    lie[0, 300] += 0.05 * lie[0, 300].norm() / 8  # 5 % / sqrt(64) per unit: 5 % of one token's norm
    assert token_error(lie, exact) > 4e-2
    assert not agree(lie, exact, 1e-2)
    whole = (lie - exact).norm() / exact.norm()
    assert whole < 3e-3  # the same lie measured over the whole tensor would pass as rounding


def test_nan_inf_and_shape_mismatches_never_agree():
    exact = _hidden()
    for bad in (exact * float("nan"), exact.clone().fill_(float("inf")), exact[..., :-1]):
        assert token_error(bad, exact) == float("inf") and token_error(exact, bad) == float("inf")
    zeros = torch.zeros(1, 3, 8)
    assert token_error(zeros, zeros.clone()) == 0.0  # no division by zero


def test_the_majority_names_the_agreeing_answers():
    exact = _hidden()
    lie = exact + 0.1 * _hidden(seed=5)
    other_lie = exact - 0.1 * _hidden(seed=6)
    assert majority([lie, exact, exact.clone()], 1e-3) == [1, 2]
    assert majority([exact, lie, exact.clone()], 1e-3) == [0, 2]
    assert majority([exact, exact.clone(), exact.clone()], 1e-3) == [0, 1, 2]
    assert majority([exact, lie, other_lie], 1e-3) is None  # three different answers: nobody can tell
    assert majority([exact, lie], 1e-3) is None  # one against one is not a majority
    # two colluding liars that tell the same lie win: a majority of colluders is beyond any vote
    assert majority([exact, lie, lie.clone()], 1e-3) == [1, 2]
