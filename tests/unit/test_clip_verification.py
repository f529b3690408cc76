"""The projected fixed-point check of BTARD (algorithms/clip_verification.py): honest aggregates pass, forged ones
fail for almost every random direction, misreported projections are caught, directions are reproducible."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from corolla.algorithms.centered_clip import CenteredClipConfig, centered_clip, clip_factors, fixed_point_residual
from corolla.algorithms.clip_verification import (
    REPORT_RTOL,
    Projection,
    check_aggregate,
    check_projection,
    check_projection_along,
    default_tolerance,
    find_misreports,
    peer_projection,
    peer_projection_along,
    peer_projections,
    random_direction,
)

N = 16
VERIFIABLE_TOL = 1e-9  # the CenteredClip tolerance at which the check can catch 1e-3 forgeries (see below)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(gen: torch.Generator, d: int) -> torch.Tensor:
    u = torch.randn(d, generator=gen, dtype=torch.float64)
    return u / u.norm()


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double()))


def _swarm(
    gen: torch.Generator, d: int, *, byzantine: int = 3, tau_factor: float = 1.0, scale: float = 1.0
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One partition's parts g_1..g_16: honest ones at ~0.5·√d·scale from their mean μ (‖μ‖ ≈ √d·scale), the
    ``byzantine`` first ones 100·√d·scale away along a shared direction r; τ = tau_factor·√d·scale (at 1 the
    honest parts are unclipped, the far ones clipped). Returns (parts, τ, r)."""
    mu = scale * torch.randn(d, generator=gen, dtype=torch.float64)
    parts = mu + 0.5 * scale * torch.randn(N, d, generator=gen, dtype=torch.float64)
    r = _unit(gen, d)
    parts[:byzantine] = mu + 100 * scale * math.sqrt(d) * r
    return parts, tau_factor * scale * math.sqrt(d), r


def _verdict(parts: torch.Tensor, aggregate: torch.Tensor, tau: float, seed: int, tol: float) -> bool:
    z = random_direction(parts.shape[1], seed)
    projections = peer_projections(parts, aggregate, z, tau)
    return check_aggregate(projections, None, default_tolerance(aggregate, projections, tau=tau, tol=tol)).passed


def test_random_direction_is_a_reproducible_unit_vector():
    z = random_direction(1000, 42)
    assert z.dtype == torch.float64 and z.shape == (1000,)
    assert abs(_norm(z) - 1) < 1e-12
    assert torch.equal(z, random_direction(1000, 42))
    assert not torch.allclose(z, random_direction(1000, 43))
    assert torch.equal(random_direction(1000, 42, dtype=torch.float32), z.float())
    assert abs(float(random_direction(1, 2**64 - 1)[0])) == 1.0
    # roughly isotropic: the coordinates of many directions average to ~0 and have mean square 1/d
    many = torch.stack([random_direction(50, seed) for seed in range(400)])
    assert float(many.mean(0).abs().max()) < 0.05
    assert float((many**2).mean()) == pytest.approx(1 / 50, rel=0.05)
    for dim, seed in [(0, 1), (10, -1), (10, 2**64), (10, 1.5), (True, 1)]:
        with pytest.raises(ValueError, match="dim must be|seed must be"):
            random_direction(dim, seed)  # type: ignore[arg-type]


def test_a_direction_is_the_same_bits_whatever_kernels_torch_picks_for_the_cpu():
    """Peers on different CPUs must draw the very same directions (reports are compared to ~1e-12). torch picks
    vectorised kernels by CPU (its float32 normals differ between AVX2 and the scalar kernel); the directions must
    not depend on that: the scalar kernels, forced in a fresh process, give the same bytes."""
    code = (
        "import hashlib; from corolla.algorithms.clip_verification import random_direction; "
        "print(hashlib.sha256(random_direction(100_000, 2**63 + 5).numpy().tobytes()).hexdigest())"
    )
    here = hashlib.sha256(random_direction(100_000, 2**63 + 5).numpy().tobytes()).hexdigest()
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    scalar = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert scalar.returncode == 0, scalar.stderr[-2000:]
    assert scalar.stdout.strip() == here


def test_an_honest_aggregate_passes_in_1000_trials():
    """Random swarms (d in 100..1000, n = 16, 0..7 far parts, τ from heavy clipping to none, scales 1e-3..1e3,
    float64 and float32 parts), CenteredClip with its default tol = 1e-6, a fresh z each trial, the default
    tolerance: no false alarm. The largest |sum|/tolerance seen stays well below 1."""
    gen = _gen(0)
    worst = 0.0
    for trial in range(1000):
        d = int(torch.randint(100, 1001, (1,), generator=gen))
        tau_factor = (0.6, 1.0, 2.0, 1e6)[trial % 4]
        scale = 10.0 ** float(torch.randint(-3, 4, (1,), generator=gen))
        parts, tau, _ = _swarm(gen, d, byzantine=trial % 8, tau_factor=tau_factor, scale=scale)
        if trial % 5 == 4:
            parts = parts.float()
        result = centered_clip(parts, config=CenteredClipConfig(tau=tau, max_iters=500))
        assert result.converged
        z = random_direction(d, 1_000_000 + trial)
        projections = peer_projections(parts, result.value, z, tau)
        tolerance = default_tolerance(result.value, projections, tau=tau, tol=1e-6)
        check = check_aggregate(projections, None, tolerance)
        assert check.passed, (trial, check)
        worst = max(worst, abs(check.weighted_sum) / tolerance)
    assert worst < 0.5


def _least_sensitive_direction(parts: torch.Tensor, aggregate: torch.Tensor, tau: float) -> torch.Tensor:
    """The unit Δ that changes the residual least to first order: the eigenvector of the smallest eigenvalue of
    J = −dR/dv = (1/n)·(Σ_i c_i·I − Σ_{i clipped} c_i·u_i u_iᵀ), u_i the unit vector from v to g_i. It is the top
    eigenvector of U·C·Uᵀ (U: the clipped u_i, C: their c_i), found from the small matrix C^½·UᵀU·C^½."""
    diffs = parts - aggregate
    factors = clip_factors(parts, aggregate, tau)
    clipped = factors < 1
    units = (diffs[clipped] / diffs[clipped].norm(dim=1, keepdim=True)).T  # [d, k]
    root = factors[clipped].sqrt()
    _, vectors = torch.linalg.eigh(root[:, None] * (units.T @ units) * root[None, :])
    direction = units @ (root * vectors[:, -1])
    return direction / direction.norm()


def _forgeries_passing(
    parts: torch.Tensor,
    aggregate: torch.Tensor,
    tau: float,
    next_delta: Callable[[], torch.Tensor],
    trials: int,
    seed: int,
    tol: float,
) -> int:
    """How many of ``trials`` forgeries aggregate + next_delta() pass the check, each with a fresh z."""
    return sum(_verdict(parts, aggregate + next_delta(), tau, seed + trial, tol) for trial in range(trials))


def test_a_forged_aggregate_fails_for_at_least_999_of_1000_directions():
    """Regime (BTARD's, with a verifiable tolerance): n = 16, 13 honest parts unclipped at ĝ (τ ≈ 2× their distance),
    3 far Byzantine parts clipped, ‖ĝ‖ ≥ 1, float64 aggregate computed by CenteredClip to tol = 1e-9, the default
    check tolerance. A forgery ĝ + Δ, ‖Δ‖ = 1e-3·‖ĝ‖, has ‖R(ĝ + Δ)‖ ≥ (13/16)·‖Δ‖ − ‖R(ĝ)‖ and passes with
    probability ≤ 12.8·B/‖R(ĝ + Δ)‖ ≈ 12.8·1e-9/(0.81e-3) ≈ 2e-5 (module docstring). Random Δ (2,000 trials, fresh
    Δ and z) and two adversarial choices made without z (the Byzantine direction, which is what a colluding
    aggregator wants, and the direction in which the residual is least sensitive; 1,000 trials each)."""
    gen = _gen(1)
    random_passes = adversarial_passes = 0
    for k, d in enumerate((100, 300, 600, 1000)):
        parts, tau, attack = _swarm(gen, d)
        result = centered_clip(parts, config=CenteredClipConfig(tau=tau, tol=VERIFIABLE_TOL))
        honest = result.value
        assert result.converged and int((clip_factors(parts, honest, tau) == 1).sum()) == 13
        size = 1e-3 * _norm(honest)
        least = _least_sensitive_direction(parts, honest, tau)
        for direction in (attack, least):  # the rigorous lower bound on the forged residual
            forged_residual = _norm(fixed_point_residual(parts, honest + size * direction, None, tau))
            assert forged_residual >= 13 / 16 * size - result.residual_norm
        seed = 10_000 * (k + 1)
        random_passes += _forgeries_passing(
            parts, honest, tau, lambda s=size, d=d: s * _unit(gen, d), 500, seed, VERIFIABLE_TOL
        )
        for j, direction in enumerate((attack, least)):
            fixed = size * direction
            adversarial_passes += _forgeries_passing(
                parts, honest, tau, lambda f=fixed: f, 250, seed + 1000 * (j + 1), VERIFIABLE_TOL
            )
    assert (2000 - random_passes) / 2000 >= 0.999
    assert (2000 - adversarial_passes) / 2000 >= 0.999


def test_with_the_default_clip_tolerance_a_1e_3_forgery_is_caught_only_about_98_percent_of_the_time():
    """The condition behind the 99.9 % claim: the check cannot be sharper than what an honest aggregator may leave,
    tol·max(1, ‖ĝ‖). With CenteredClip's default tol = 1e-6 a forgery of 1e-3·‖ĝ‖ passes with probability
    ≈ 12.8·1e-6/(0.81·1e-3) ≈ 1.6 % (all else as above); catching it 99.9 % of the time needs tol ≲ 6e-8, or
    forgeries ≳ 1.6e-2·‖ĝ‖."""
    gen = _gen(2)
    parts, tau, _ = _swarm(gen, 500)
    honest = centered_clip(parts, config=CenteredClipConfig(tau=tau)).value
    size = 1e-3 * _norm(honest)
    passes = _forgeries_passing(parts, honest, tau, lambda: size * _unit(gen, 500), 600, 0, 1e-6)
    assert 0.004 < passes / 600 < 0.05  # the 99.9 % claim is false here
    assert _forgeries_passing(parts, honest, tau, lambda: 10 * size * _unit(gen, 500), 600, 0, 1e-6) / 600 < 0.005


def test_a_float32_aggregate_needs_two_directions_to_catch_999_of_1000_forgeries():
    """BTARD's aggregates travel in float32 (the all-reduce's bytes). Rounding to float32 leaves a residual of up to
    u·‖ĝ‖ (u = 6e-8), which the tolerance must allow, so one random direction lets ~0.15 % of 1e-3 forgeries through,
    above the 0.1 % goal (module docstring). A forgery passes two independent directions only if it passes each:
    none of 2,000 does, and no honest float32 aggregate fails either (regime as above)."""
    gen = _gen(4)

    def passed(parts, aggregate, tau, seed) -> bool:
        return _verdict(parts, aggregate, tau, seed, VERIFIABLE_TOL)

    one = both = honest_failures = 0
    for d in (100, 300, 600, 1000):
        parts, tau, _ = _swarm(gen, d)
        honest = centered_clip(parts, config=CenteredClipConfig(tau=tau, tol=VERIFIABLE_TOL)).value
        size = 1e-3 * _norm(honest)
        for trial in range(500):
            forged = (honest + size * _unit(gen, d)).float()
            first = passed(parts, forged, tau, 10 * trial + 1 + d)
            one += first
            both += first and passed(parts, forged, tau, 10 * trial + 2 + d)
        honest_failures += sum(
            not (
                passed(parts, honest.float(), tau, 10 * t + 3 + d)
                and passed(parts, honest.float(), tau, 10 * t + 4 + d)
            )
            for t in range(100)
        )
    assert honest_failures == 0
    assert one >= 1  # one direction is not enough at this precision: some forgeries get through
    assert both / 2000 <= 0.001


def test_projections_along_several_directions_equal_one_at_a_time_and_a_lie_along_one_is_caught():
    gen = _gen(5)
    parts, tau, _ = _swarm(gen, 300)
    aggregate = centered_clip(parts, config=CenteredClipConfig(tau=tau, tol=1e-9)).value.float()
    directions = torch.stack([random_direction(300, seed) for seed in (11, 12, 13)])
    along = peer_projection_along(parts[4], aggregate, directions, tau)
    singles = [peer_projection(parts[4], aggregate, z, tau) for z in directions]
    for a, b in zip(along, singles):
        assert a.norm == b.norm and abs(a.s - b.s) <= 1e-12 * min(b.norm, tau)
    assert check_projection_along(parts[4], aggregate, directions, tau, along)
    assert check_projection_along(parts[4], aggregate, directions, tau, singles)  # within the accepted rounding
    lie = list(along)
    lie[2] = Projection(s=-along[2].s, norm=along[2].norm)
    assert not check_projection_along(parts[4], aggregate, directions, tau, lie)
    assert not check_projection_along(parts[4], aggregate, directions, tau, along[:2])  # a direction left out
    with pytest.raises(ValueError, match="shape \\[k, d\\]"):
        peer_projection_along(parts[4], aggregate, directions[0], tau)
    with pytest.raises(ValueError, match="unit norm"):
        peer_projection_along(parts[4], aggregate, 2 * directions, tau)
    with pytest.raises(ValueError, match="_along functions"):
        peer_projection(parts[4], aggregate, directions, tau)
    with pytest.raises(ValueError, match="_along functions"):
        check_projection(parts[4], aggregate, directions, tau, along[0])


def test_a_misreported_projection_is_caught_by_the_aggregator():
    gen = _gen(3)
    parts, tau, _ = _swarm(gen, 400)
    aggregate = centered_clip(parts, config=CenteredClipConfig(tau=tau, tol=1e-9)).value
    z = random_direction(400, 7)
    honest = [peer_projection(part, aggregate, z, tau) for part in parts]
    assert all(check_projection(part, aggregate, z, tau, p) for part, p in zip(parts, honest))
    assert find_misreports(parts, aggregate, z, tau, honest) == []
    batch = peer_projections(parts, aggregate, z, tau)  # computed another way: within the accepted rounding
    assert find_misreports(parts, aggregate, z, tau, batch) == []

    p = honest[5]
    scale = min(p.norm, tau)
    lies = [
        Projection(s=p.s + 1e-9 * scale, norm=p.norm),
        Projection(s=-p.s, norm=p.norm),
        Projection(s=0.0, norm=p.norm),
        Projection(s=p.s, norm=p.norm * (1 + 1e-9)),
        Projection(s=p.s, norm=0.5 * p.norm),
        Projection(s=float("nan"), norm=p.norm),
        Projection(s=p.s, norm=float("inf")),
    ]
    for lie in lies:
        assert not check_projection(parts[5], aggregate, z, tau, lie), lie
        claimed = list(honest)
        claimed[5] = lie
        assert find_misreports(parts, aggregate, z, tau, claimed) == [5]


def test_a_lie_fails_the_sum_but_the_aggregator_names_the_liar_and_tolerated_slack_flips_nothing():
    """An honest aggregate with one peer shifting its s to break the check: the check fails, and the aggregator
    finds the liar, so the failure is not pinned on the aggregator. Every peer lying by just under the slack
    ``check_projection`` lets through, all in the same direction, does not make the honest aggregate fail."""
    gen = _gen(4)
    parts, tau, _ = _swarm(gen, 300)
    aggregate = centered_clip(parts, config=CenteredClipConfig(tau=tau, tol=1e-9)).value
    z = random_direction(300, 11)
    honest = peer_projections(parts, aggregate, z, tau)
    tolerance = default_tolerance(aggregate, honest, tau=tau, tol=1e-9)
    assert check_aggregate(honest, None, tolerance).passed

    claimed = list(honest)
    claimed[9] = Projection(s=honest[9].s + 100 * N * tolerance, norm=honest[9].norm)
    assert not check_aggregate(claimed, None, default_tolerance(aggregate, claimed, tau=tau, tol=1e-9)).passed
    assert find_misreports(parts, aggregate, z, tau, claimed) == [9]

    sly = [Projection(s=p.s + 0.99 * REPORT_RTOL * min(p.norm, tau), norm=p.norm) for p in honest]
    assert find_misreports(parts, aggregate, z, tau, sly) == []
    assert check_aggregate(sly, None, default_tolerance(aggregate, sly, tau=tau, tol=1e-9)).passed


def test_check_aggregate_sums_with_weights_and_in_any_order():
    projections = [Projection(s=s, norm=1.0) for s in (0.5, -1.5, 0.25, 0.125)]
    check = check_aggregate(projections, [1.0, 1.0, 2.0, 2.0], 0.05)
    assert check.weighted_sum == -0.25 / 6 and check.passed and check.tolerance == 0.05
    assert check_aggregate(projections[::-1], torch.tensor([2.0, 2.0, 1.0, 1.0]), 0.05) == check
    assert not check_aggregate(projections, [1.0, 1.0, 2.0, 2.0], 0.04).passed
    # summed exactly: a naive left-to-right sum would give 0 in one order and 1 in another
    cancelling = [Projection(s=s, norm=1.0) for s in (1e16, 1.0, -1e16)]
    assert check_aggregate(cancelling, None, 0.0).weighted_sum == 1 / 3
    assert check_aggregate(cancelling[::-1], None, 0.0).weighted_sum == 1 / 3
    broken = [*projections[:3], Projection(s=float("inf"), norm=1.0)]
    assert not check_aggregate(broken, None, 1.0).passed
    with pytest.raises(ValueError, match="at least one"):
        check_aggregate([], None, 1.0)
    with pytest.raises(ValueError, match="one weight per projection"):
        check_aggregate(projections, [1.0], 1.0)
    with pytest.raises(ValueError, match="not all zero"):
        check_aggregate(projections, [0.0] * 4, 1.0)
    with pytest.raises(ValueError, match="tolerance must be"):
        check_aggregate(projections, None, float("nan"))


def test_default_tolerance_scales():
    gen = _gen(5)
    parts, tau, _ = _swarm(gen, 900)
    aggregate = centered_clip(parts, config=CenteredClipConfig(tau=tau, tol=1e-9)).value
    z = random_direction(900, 3)
    projections = peer_projections(parts, aggregate, z, tau)
    size = _norm(aggregate)
    base = default_tolerance(aggregate, projections, tau=tau, tol=1e-9)
    worst_case = default_tolerance(aggregate, projections, tau=tau, tol=1e-9, sigmas=None)
    # 2·(8/30·B + rounding) vs 2·(B + rounding), B ≈ 1e-9·‖ĝ‖
    assert base == pytest.approx(2 * 8 / 30 * 1e-9 * size, rel=0.05)
    assert worst_case == pytest.approx(2 * 1e-9 * size, rel=0.05)
    narrow = default_tolerance(aggregate.float(), projections, tau=tau, tol=1e-9)
    assert narrow == pytest.approx(2 * 8 / 30 * (1e-9 + 2**-24) * size, rel=0.05)  # float32 rounding counts
    tiny = default_tolerance(aggregate * 1e-6, projections, tau=tau, tol=1e-9)
    assert tiny >= 2 * 8 / 30 * 1e-9  # the absolute floor max(1, ‖ĝ‖)
    lying = [Projection(s=p.s, norm=float("nan")) for p in projections]  # counted at the cap τ
    assert base < default_tolerance(aggregate, lying, tau=tau, tol=1e-9) < base * 1.01
    with pytest.raises(ValueError, match="margin"):
        default_tolerance(aggregate, projections, tau=tau, margin=0.5)
    with pytest.raises(ValueError, match="sigmas"):
        default_tolerance(aggregate, projections, tau=tau, sigmas=0.0)
    with pytest.raises(ValueError, match="one weight per projection"):
        default_tolerance(aggregate, projections, [1.0, 2.0], tau=tau)


def test_projection_inputs_are_validated():
    part, aggregate, z = torch.ones(4), torch.zeros(4), random_direction(4, 0)
    assert peer_projection(aggregate, aggregate, z, 1.0) == Projection(s=0.0, norm=0.0)
    p = peer_projection(part, aggregate, z, 1.0)  # ν = 2 > τ = 1: halved
    assert p.norm == pytest.approx(2.0)
    assert p.s == pytest.approx(0.5 * float(z.sum()))
    with pytest.raises(ValueError, match=r"aggregate must have shape \[4\], got \[3\]"):
        peer_projection(part, torch.zeros(3), z, 1.0)
    with pytest.raises(ValueError, match="unit norm"):
        peer_projection(part, aggregate, 2 * z, 1.0)
    with pytest.raises(ValueError, match="own_part must be finite"):
        peer_projection(torch.tensor([1.0, float("nan"), 0.0, 0.0]), aggregate, z, 1.0)
    with pytest.raises(ValueError, match="tau must be"):
        peer_projection(part, aggregate, z, -1.0)
    with pytest.raises(ValueError, match=r"parts must have shape \[n, d\]"):
        peer_projections(part, aggregate, z, 1.0)
    with pytest.raises(ValueError, match="one claimed projection per part"):
        find_misreports(part.unsqueeze(0), aggregate, z, 1.0, [])
