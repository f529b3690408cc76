"""CenteredClip (algorithms/centered_clip.py): reference values, bounded influence, convergence, determinism,
weights, the median start and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from corolla.algorithms.centered_clip import (
    CenteredClipConfig,
    _sorted_rows,
    centered_clip,
    clip_factors,
    fixed_point_residual,
    weighted_median,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _unit(gen: torch.Generator, d: int) -> torch.Tensor:
    u = _randn(gen, d)
    return u / u.norm()


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double()))


def _mixed(gen: torch.Generator, n: int = 16, d: int = 40, byzantine: int = 4) -> torch.Tensor:
    """Honest rows around a common point (≈ 0.65 from their mean when d = 40) plus a few far rows: at τ = 1 the far
    rows are clipped, at τ = 0.5 nearly all."""
    x = 3 + 0.1 * _randn(gen, n, d)
    x[:byzantine] += 50 * _unit(gen, d)
    return x


@pytest.mark.parametrize("weighted", [False, True])
def test_a_large_tau_gives_the_weighted_mean(weighted):
    gen = _gen(0)
    x = 5 + _randn(gen, 16, 50)
    w = torch.rand(16, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    mean = x.mean(0) if w is None else (w @ x) / w.sum()
    result = centered_clip(x, w, CenteredClipConfig(tau=1e6))
    assert result.converged
    assert _norm(result.value - mean) <= 1e-9 * _norm(mean)


@pytest.mark.parametrize("distance", [1e3, 1e6, 1e9, 1e300])
def test_one_input_moves_the_result_by_at_most_tau_over_n_minus_1(distance):
    """Bound from the fixed-point equation. Let H be the n − 1 honest inputs (weight W_H = W − w_b), m_H their mean,
    and suppose they are unclipped at the result v (‖h_i − v‖ ≤ τ, asserted below). Then

        W·R(v) = Σ_H w_i (h_i − v) + w_b·P = W_H·(m_H − v) + w_b·P,   ‖P‖ = min(‖b − v‖, τ) ≤ τ,

    so v − m_H = (w_b·P − W·R(v)) / W_H and ‖v − m_H‖ ≤ τ·w_b/W_H + W·‖R(v)‖/W_H
    = (τ·w_b/W)/(1 − w_b/W) + …: τ/(n − 1) for unit weights, however far the outlier b is. For a far outlier P is
    τ times a unit vector, so the bound is also (nearly) attained."""
    gen = _gen(1)
    n, d, tau = 16, 64, 1.0
    honest = 2 + 0.01 * _randn(gen, n - 1, d)
    far = honest.mean(0) + distance * _unit(gen, d)
    x = torch.cat([honest, far.unsqueeze(0)])
    result = centered_clip(x, config=CenteredClipConfig(tau=tau))
    v = result.value
    assert result.converged and torch.isfinite(v).all()
    assert torch.equal(clip_factors(honest, v, tau), torch.ones(n - 1, dtype=torch.float64))  # the assumption
    residual = _norm(fixed_point_residual(x, v, None, tau))
    bound = tau / (n - 1) + n * residual / (n - 1)
    shift = _norm(v - honest.mean(0))
    assert shift <= bound
    assert shift >= 0.99 * tau / (n - 1)  # the bound is tight: the clipped outlier pulls with norm τ


def test_the_outliers_results_differ_by_at_most_twice_the_bound():
    gen = _gen(2)
    n, d, tau = 16, 32, 0.5
    honest = -1 + 0.01 * _randn(gen, n - 1, d)
    values = []
    for distance in (1e3, 1e6, 1e9):
        far = honest.mean(0) + distance * _unit(gen, d)
        values.append(centered_clip(torch.cat([honest, far.unsqueeze(0)]), config=CenteredClipConfig(tau=tau)).value)
    for a in values:
        for b in values:
            assert _norm(a - b) <= 2 * tau / (n - 1) * (1 + 1e-5)


def test_colluding_inputs_bias_it_by_their_weight_share():
    """7 of 16 inputs far away in one direction r: ‖v − m_H‖ ≤ τ·7/9 (the same bound with W − W_H = 7), attained
    up to the convergence tolerance: the known bounded but consistent bias of CenteredClip (reference §2.4)."""
    gen = _gen(3)
    d, tau = 48, 1.0
    honest = 0.005 * _randn(gen, 9, d)
    r = _unit(gen, d)
    x = torch.cat([honest, (1e6 * r).expand(7, d)])
    result = centered_clip(x, config=CenteredClipConfig(tau=tau))
    assert result.converged
    bias = result.value - honest.mean(0)
    assert torch.equal(clip_factors(honest, result.value, tau), torch.ones(9, dtype=torch.float64))
    slack = 16 / 9 * result.residual_norm
    assert _norm(bias) <= 7 / 9 * tau + slack
    assert float(bias @ r) >= 7 / 9 * tau - slack - 1e-3


def test_the_result_is_a_fixed_point_up_to_the_stopping_tolerance():
    gen = _gen(4)
    x = _mixed(gen)
    config = CenteredClipConfig(tau=1.0, tol=1e-6)
    result = centered_clip(x, config=config)
    assert result.converged and 1 <= result.iterations < config.max_iters
    residual = _norm(fixed_point_residual(x, result.value, None, config.tau))
    assert residual == pytest.approx(result.residual_norm, rel=1e-12, abs=1e-300)
    assert residual <= config.tol * max(1.0, _norm(result.value))
    # a reference run to (almost) the exact fixed point: strong monotonicity puts the result within
    # (W/W_u)·‖R(v)‖ of it, W_u the weight unclipped at both points
    exact = centered_clip(x, config=CenteredClipConfig(tau=1.0, tol=1e-14, max_iters=1000))
    assert exact.converged
    unclipped = int((clip_factors(x, exact.value, 1.0) == 1).sum())
    assert unclipped >= 8
    assert _norm(result.value - exact.value) <= 16 / unclipped * residual * (1 + 1e-6) + 1e-12


def test_more_iterations_never_increase_the_residual():
    """The iteration is gradient descent with step 1/W on a convex, W-smooth function (the Huber loss of the
    distances), so the update's norm is non-increasing: checked over 60 updates from the median."""
    gen = _gen(5)
    x = _mixed(gen, byzantine=6)
    norms = []
    for k in range(0, 60, 3):
        result = centered_clip(x, config=CenteredClipConfig(tau=0.5, tol=0.0, max_iters=k))
        assert result.iterations == k and not result.converged
        norms.append(_norm(fixed_point_residual(x, result.value, None, 0.5)))
    assert norms[0] > 1e-3 and norms[-1] < 1e-3 * norms[0]
    for before, after in zip(norms, norms[1:]):
        assert after <= before * (1 + 1e-9) + 1e-15


def test_the_same_inputs_give_bitwise_the_same_output_and_order_does_not_matter():
    gen = _gen(6)
    x = _mixed(gen)
    w = torch.randint(1, 4, (16,), generator=gen).double()
    first = centered_clip(x, w)
    again = centered_clip(x.clone(), w.clone())
    assert torch.equal(first.value, again.value) and first.iterations == again.iterations
    for _ in range(5):
        perm = torch.randperm(16, generator=gen)
        permuted = centered_clip(x[perm], w[perm])
        assert _norm(permuted.value - first.value) <= 1e-12 * max(1.0, _norm(first.value))
        assert torch.equal(weighted_median(x[perm], w[perm]), weighted_median(x, w))


def test_integer_weights_equal_repeated_rows_and_zero_weights_equal_removed_rows():
    gen = _gen(7)
    x = _mixed(gen, n=8, byzantine=2)
    counts = torch.tensor([1, 2, 3, 1, 4, 1, 2, 1])
    repeated = x.repeat_interleave(counts, dim=0)
    config = CenteredClipConfig(tau=1.0, tol=1e-12, max_iters=500)
    assert torch.equal(weighted_median(x, counts.double()), weighted_median(repeated))
    weighted = centered_clip(x, counts.double(), config)
    plain = centered_clip(repeated, config=config)
    assert weighted.converged and plain.converged
    assert _norm(weighted.value - plain.value) <= 1e-10 * _norm(plain.value)

    zero = counts.double().clone()
    zero[[1, 4]] = 0
    keep = zero > 0
    assert torch.equal(weighted_median(x, zero), weighted_median(x[keep], zero[keep]))
    without = centered_clip(x[keep], zero[keep], config).value
    assert _norm(centered_clip(x, zero, config).value - without) <= 1e-10 * _norm(without)


def test_the_weighted_median_convention():
    x = torch.tensor([[0.0], [1.0], [5.0], [2.0]])
    assert weighted_median(x).item() == 1.5  # even n: the mean of the two middle values
    assert weighted_median(x[:3]).item() == 1.0
    assert weighted_median(x[:3], torch.tensor([1.0, 1.0, 2.0])).item() == 3.0  # = median of 0, 1, 5, 5
    assert weighted_median(x[:3], torch.tensor([1.0, 0.0, 1.0])).item() == 2.5  # a zero weight is never chosen
    assert weighted_median(x, torch.tensor([10.0, 1.0, 1.0, 1.0])).item() == 0.0
    assert weighted_median(torch.full((5, 3), 7.0)).tolist() == [7.0, 7.0, 7.0]  # ties


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 16])
def test_equal_weights_take_the_plain_median_and_agree_with_the_general_rule(n):
    x = _randn(_gen(11 + n), n, 500)
    expected = torch.from_numpy(np.median(x.numpy(), axis=0))
    for weight in (1.0, 0.1, 3.0):
        assert torch.equal(weighted_median(x, torch.full((n,), weight)), expected)
    # the general rule (unequal weights) agrees when one weight is a hair off: same order statistics chosen
    nudged = torch.ones(n, dtype=torch.float64)
    nudged[0] += 1e-12
    general = weighted_median(x, nudged)
    if n % 2:  # an odd count has one middle value, which a tiny nudge does not move
        assert torch.equal(general, expected)


def test_the_sorting_network_sorts_every_column_like_msort():
    gen = _gen(5)
    for n in [*range(1, 20), 31, 64, 65]:
        x = _randn(gen, n, 37)
        x[:, :5] = torch.round(x[:, :5])  # ties
        assert torch.equal(_sorted_rows(x), torch.msort(x)), n


def test_the_median_start_lies_on_the_honest_side_with_7_of_16_far_inputs():
    gen = _gen(8)
    d = 200
    honest = _randn(gen, 9, d)
    far = (1e6 * _unit(gen, d)).expand(7, d)
    x = torch.cat([far, honest])  # the far rows first: order must not matter
    start = weighted_median(x)
    low, high = honest.min(0).values, honest.max(0).values
    assert bool(((start >= low) & (start <= high)).all())
    assert _norm(start - honest.mean(0)) < 3 * math.sqrt(d)  # while the mean is ~4e5 away
    assert _norm(x.mean(0) - honest.mean(0)) > 1e5


def test_narrow_dtypes_are_computed_in_float64_and_returned_as_given():
    gen = _gen(9)
    x = _mixed(gen).float()
    result = centered_clip(x)
    assert result.value.dtype == torch.float32 and result.converged
    reference = centered_clip(x.double())
    assert torch.equal(result.value, reference.value.float())
    # casting moves the value by at most u·‖v‖ and R is 1-Lipschitz
    residual = _norm(fixed_point_residual(x, result.value, None, 1.0))
    v = _norm(reference.value)
    assert residual <= 1e-6 * max(1.0, v) + 2**-24 * v
    assert centered_clip(x.bfloat16()).value.dtype == torch.bfloat16


def test_clip_factors_and_the_residual():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.3, 0.4], [-6.0, -8.0]])
    center = torch.zeros(2)
    factors = clip_factors(x, center, 1.0)
    assert factors.dtype == torch.float64
    assert factors.tolist() == pytest.approx([1.0, 0.2, 1.0, 0.1])
    # terms: 0, (0.6, 0.8), (0.3, 0.4), (-0.6, -0.8) → sum (0.3, 0.4), over 4
    assert fixed_point_residual(x, center, None, 1.0).tolist() == pytest.approx([0.075, 0.1])
    w = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert fixed_point_residual(x, center, w, 1.0).tolist() == pytest.approx([0.0, 0.0])
    single = centered_clip(torch.tensor([[1.0, 2.0]]))
    assert single.value.tolist() == [1.0, 2.0] and single.iterations == 0 and single.converged


def test_bad_inputs_raise_clear_errors():
    good = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"shape \[n, d\].*\(3,\)"):
        centered_clip(torch.zeros(3))
    with pytest.raises(ValueError, match=r"n >= 1 and d >= 1"):
        centered_clip(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"n >= 1 and d >= 1"):
        centered_clip(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="floating-point"):
        centered_clip(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="torch.Tensor"):
        centered_clip([[0.0, 1.0]])  # type: ignore[arg-type]
    bad = good.clone()
    bad[2, 1] = float("nan")
    bad[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[2, 3\] are not finite"):
        centered_clip(bad)
    with pytest.raises(ValueError, match=r"rows \[1\] exceed 2\*\*1000"):
        centered_clip(torch.tensor([[0.0], [1e305]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"rows \[1\] are negative"):
        centered_clip(good, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="all zero"):
        centered_clip(good, torch.zeros(4))
    with pytest.raises(ValueError, match=r"weights must be finite"):
        centered_clip(good, torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \[4\].*\(3,\)"):
        centered_clip(good, torch.ones(3))
    with pytest.raises(ValueError, match=r"center must be a tensor of shape \[3\]"):
        clip_factors(good, torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="center must be finite"):
        fixed_point_residual(good, torch.tensor([0.0, float("nan"), 0.0]), None, 1.0)
    with pytest.raises(ValueError, match="tau must be"):
        clip_factors(good, torch.zeros(3), 0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 0.0}, "tau must be a finite number > 0, got 0.0"),
        ({"tau": float("nan")}, "tau must be"),
        ({"tau": -1.0}, "tau must be"),
        ({"max_iters": -1}, "max_iters must be an int >= 0, got -1"),
        ({"max_iters": 2.5}, "max_iters must be"),
        ({"max_iters": True}, "max_iters must be"),
        ({"tol": -1e-6}, "tol must be a finite number >= 0"),
        ({"tol": float("inf")}, "tol must be"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        CenteredClipConfig(**kwargs)
