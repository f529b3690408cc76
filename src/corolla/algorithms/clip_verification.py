"""The projected fixed-point check of BTARD-SGD: did aggregator j really compute ĝ[j] = CenteredClip(g_1[j], …)?

**Protocol.** Once every ĝ[j] is committed, the peers draw a seed with the multi-party RNG. Each partition j gets its
own seed, from which everyone derives the same direction z[j] (``random_direction``: uniform on the unit sphere).
Every peer i computes, from its own part and the broadcast aggregate (``peer_projection``),

    s_i = ⟨(g_i[j] − ĝ[j])·min(1, τ/ν_i), z[j]⟩,   ν_i = ‖g_i[j] − ĝ[j]‖,

and broadcasts (s_i, ν_i). Everyone checks ``|Σ_i w_i s_i / Σ_i w_i| ≤ tolerance`` (``check_aggregate``): the sum
is ⟨R(ĝ[j]), z[j]⟩, where R is CenteredClip's fixed-point residual (``centered_clip.fixed_point_residual``), zero at
an exact fixed point. Aggregator j received every g_i[j], so it recomputes each (s_i, ν_i) and accuses a peer that
misreports (``check_projection``; ``find_misreports`` for all peers at once, ``peer_projections`` computes them
all); if all reports are right and the check still fails, the aggregator is accused. Weights are all 1 in BTARD.

**Honest aggregates pass** (``default_tolerance``). An aggregator that stopped at ‖R(v)‖ ≤ tol·max(1, ‖v‖) in
float64 and sent ĝ = v rounded to a dtype of unit roundoff u has, since R is 1-Lipschitz,

    ‖R(ĝ)‖ ≤ B = (tol·max(1, ‖ĝ‖) + u·‖ĝ‖ + √d·tiny) / (1 − u)      (tiny: the dtype's smallest normal).

For a unit z, |⟨R, z⟩| ≤ ‖R‖ always (``sigmas=None``: a worst-case bound). But z is drawn after ĝ is fixed, and for
z uniform on the sphere of R^d, P(|⟨R, z⟩| > ‖R‖·t/√d) ≤ 2·exp(−t²/2) (the cap bound; t = 8: 2.5e-14), so the
default accepts ``min(1, sigmas/√d)·B``: √d/8 times tighter for a large partition, at a false-alarm probability no
larger than that. To this come (i) the float64 rounding of the projections and of the aggregator's stopping test,
O(log d + n)·eps·S with S = Σ_i w_i min(ν_i, τ)/Σ w_i bounding the clipped terms (torch sums by cascade, O(log d)
per dot product; ν is capped at τ, so a lie about it cannot raise the tolerance further), and (ii) the discrepancy
``report_rtol·S`` that ``check_projection`` lets through. All of it is multiplied by ``margin`` (k = 2).

**Forgeries fail.** For ĝ + Δ, firm non-expansiveness of the clipping projection gives
‖R(ĝ + Δ)‖ ≥ (W_u/W)·‖Δ‖ − ‖R(ĝ)‖, with W_u the weight of the inputs within τ of both ĝ and ĝ + Δ (the others add
a clipped, smaller pull). The density of ⟨e, z⟩ is at most √((d − 1)/(2π)), so a forgery passes with probability

    P ≤ tolerance·√(2(d − 1)/π) / ‖R(ĝ + Δ)‖   ≈ margin·sigmas·√(2/π)·B / ‖R(ĝ + Δ)‖ = 12.8·B / ‖R(ĝ + Δ)‖.

Catching every ‖Δ‖ ≥ ε·‖ĝ‖ with probability ≥ 0.999 thus needs tol·max(1, ‖ĝ‖) + u·‖ĝ‖ ≲ (W_u/W)·ε·‖ĝ‖/12800.
For ε = 1e-3, ‖ĝ‖ ≥ 1 and 13 of 16 inputs unclipped that is tol ≲ 6e-8 with a float64 aggregate; CenteredClip's
default tol = 1e-6 catches such a forgery only ~98 % of the time, and a float32 aggregate (u = 6e-8) is at the edge
even with tol → 0 (measured: 99.85 % at ε = 1e-3, 99.95 % at ε = 2e-3). So aggregators whose results are verified
should run CenteredClip to tol ≈ 1e-9 (a few more float64 updates when most inputs are unclipped), and either
publish the float64 value or check along k independent directions (``peer_projection_along``,
``check_projection_along``): a fixed forgery passes all k with the k-th power of the probability above (for a
float32 aggregate and k = 2: none of 2,000 forgeries of ε = 1e-3 in the tests, half the bytes of float64). An
aggregate that did not converge may fail the check. When ‖ĝ‖ < 1 the absolute floor tol·1
governs. A Δ chosen with knowledge of z can be orthogonal to it: the check is only as good as the secrecy of z
until ĝ is committed.

Pure: tensors and floats in, values out; the direction's randomness comes from the seed passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "AggregateCheck",
    "Projection",
    "check_aggregate",
    "check_projection",
    "default_tolerance",
    "find_misreports",
    "peer_projection",
    "peer_projection_along",
    "check_projection_along",
    "peer_projections",
    "random_direction",
]

REPORT_RTOL = 1e-12  # the discrepancy, relative to min(ν, τ), that check_projection accepts by default
_EPS64 = torch.finfo(torch.float64).eps
_MAX_ABS = 2.0**1000
_UNIT_NORM_SLACK = 1e-6


def _projection_rounding(dim: int) -> float:
    """A bound on the float64 rounding of one projection, relative to min(ν, τ): the difference, the clip factor and
    the product add a few eps, the sum O(log d) (torch's reductions sum in a cascade on CPU, by a tree on GPU)."""
    return (4 * math.log2(dim) + 16) * _EPS64


@dataclass(frozen=True)
class Projection:
    s: float  # ⟨(g_i − ĝ)·min(1, τ/ν), z⟩
    norm: float  # ν = ‖g_i − ĝ‖


@dataclass(frozen=True)
class AggregateCheck:
    weighted_sum: float  # Σ_i w_i s_i / Σ_i w_i; nan when a report is not finite
    tolerance: float
    passed: bool


def random_direction(dim: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A unit vector of R^dim, uniform on the sphere: a float64 Gaussian from numpy's PCG64 generator seeded with
    ``seed`` (0 ≤ seed < 2**64, e.g. 64 bits of the MPRNG's output for this partition), normalised.

    Every peer must draw the same vector: the check compares reports to within ~1e-12 of their scale. numpy's
    generator is plain C whatever the CPU, so the same seed gives the same Gaussian bits on every peer with the same
    numpy version (the normalisation may differ by an ulp between SIMD widths, far below that). torch's samplers
    do not guarantee that: its float32 normals come from an approximate vectorised kernel on AVX2 CPUs and an
    exact scalar one elsewhere (values differing by ~1e-6), and its float64 normals, the same everywhere, take
    twice as long (every peer draws k directions per partition size and step)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    z = torch.from_numpy(np.random.Generator(np.random.PCG64(seed)).standard_normal(dim))
    norm = torch.linalg.vector_norm(z)
    if norm == 0:  # probability 0; keeps the result a unit vector whatever happens
        z[0], norm = 1.0, torch.ones((), dtype=torch.float64)
    return (z / norm).to(dtype)


def _checked(name: str, x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``x`` in float64 after checking that it is a 1-D float tensor of length ``dim`` (any d >= 1 if None) with
    finite values of at most 2**1000 in magnitude."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.numel() < 1 or (dim is not None and x.numel() != dim):
        raise ValueError(f"{name} must have shape [{'d' if dim is None else dim}], got {list(x.shape)}")
    return _finite(name, x)


def _checked_parts(parts: torch.Tensor) -> torch.Tensor:
    if not isinstance(parts, torch.Tensor):
        raise ValueError(f"parts must be a torch.Tensor of shape [n, d], got {type(parts).__name__}")
    if parts.dim() != 2 or parts.shape[0] < 1 or parts.shape[1] < 1:
        raise ValueError(f"parts must have shape [n, d] with n >= 1 and d >= 1, got {list(parts.shape)}")
    return _finite("parts", parts)


def _finite(name: str, x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    x = x.to(torch.float64)
    peak = float(x.abs().max())  # NaN if any is NaN
    if not peak <= _MAX_ABS:
        raise ValueError(f"{name} must be finite and at most 2**1000 in magnitude, got max |{name}| = {peak}")
    return x


def _tau(tau: float) -> float:
    if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    return float(tau)


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norms of the last axis without overflow or underflow: torch's (a sum of squares, one pass) where
    every norm lies in [2**-450, 2**500], where no square that matters can overflow or underflow; else scaled."""
    plain = torch.linalg.vector_norm(x, dim=-1)
    if bool(((plain >= 2.0**-450) & (plain <= 2.0**500)).all()):
        return plain
    scale = x.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.squeeze(-1) * torch.linalg.vector_norm(x / safe, dim=-1)


def _project(
    x: torch.Tensor, aggregate: torch.Tensor, direction: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, ν) of every row of the checked float64 ``x`` [n, d]: s float64 [n] for one ``direction`` [d], [n, k] for
    k directions [k, d] (the clipped differences computed once); ν float64 [n]."""
    d = x.shape[1]
    v = _checked("aggregate", aggregate, d).to(x.device)
    z = _directions(direction, d).to(x.device)
    tau = _tau(tau)
    diffs = x - v
    norms = _norms(diffs)
    factors = torch.where(norms > tau, tau / norms, 1.0)  # exactly 1 when ν ≤ τ (0 included)
    clipped = diffs * factors.unsqueeze(1)
    # a reduction (cascade summation, O(log d) rounding), not a BLAS dot product
    s = torch.stack([torch.sum(clipped * row, dim=1) for row in z], dim=1)
    return (s[:, 0] if direction.dim() == 1 else s), norms


def _directions(direction: torch.Tensor, d: int) -> torch.Tensor:
    """``direction`` [d] or [k, d] as float64 [k, d] after checking that each row is a finite unit vector."""
    if isinstance(direction, torch.Tensor) and direction.dim() == 2 and direction.shape[0] >= 1:
        if direction.shape[1] != d:
            raise ValueError(f"direction must have shape [{d}] or [k, {d}], got {list(direction.shape)}")
        rows = _finite("direction", direction)
    else:
        rows = _checked("direction", direction, d).unsqueeze(0)
    # no scaling needed (finite values of at most 2**1000 were checked): anything far from 1 is refused
    for z_norm in torch.linalg.vector_norm(rows, dim=1).tolist():
        if not abs(z_norm - 1.0) <= _UNIT_NORM_SLACK:
            raise ValueError(f"direction must have unit norm (within {_UNIT_NORM_SLACK}), got norm {z_norm!r}")
    return rows


def peer_projection(
    own_part: torch.Tensor, aggregate: torch.Tensor, direction: torch.Tensor, tau: float
) -> Projection:
    """(s_i, ν_i) of one peer for one partition, computed in float64 (module docstring). ``direction`` must be a
    unit vector (within 1e-6). Raises ValueError for mismatched shapes, non-finite values or a bad τ."""
    s, norms = _project(_checked("own_part", own_part).unsqueeze(0), aggregate, _one(direction), tau)
    return Projection(s=float(s[0]), norm=float(norms[0]))


def peer_projection_along(
    own_part: torch.Tensor, aggregate: torch.Tensor, directions: torch.Tensor, tau: float
) -> list[Projection]:
    """``peer_projection`` along each of k directions [k, d] (independent checks of one partition): k projections
    sharing one ν."""
    s, norms = _project(_checked("own_part", own_part).unsqueeze(0), aggregate, _as_rows(directions), tau)
    return [Projection(s=float(si), norm=float(norms[0])) for si in s[0]]


def _one(direction: torch.Tensor) -> torch.Tensor:
    if isinstance(direction, torch.Tensor) and direction.dim() != 1:
        raise ValueError(
            f"direction must have shape [d], got {list(direction.shape)} (several: the *_along functions)"
        )
    return direction


def _as_rows(directions: torch.Tensor) -> torch.Tensor:
    if not isinstance(directions, torch.Tensor) or directions.dim() != 2 or directions.shape[0] < 1:
        shape = list(directions.shape) if isinstance(directions, torch.Tensor) else type(directions).__name__
        raise ValueError(f"directions must have shape [k, d] with k >= 1, got {shape}")
    return directions


def peer_projections(
    parts: torch.Tensor, aggregate: torch.Tensor, direction: torch.Tensor, tau: float
) -> list[Projection]:
    """``peer_projection`` of every row of ``parts`` [n, d] at once (the aggregator's view of all peers)."""
    s, norms = _project(_checked_parts(parts), aggregate, _one(direction), tau)
    return [Projection(s=si, norm=ni) for si, ni in zip(s.tolist(), norms.tolist())]


def _weights(weights: Sequence[float] | torch.Tensor | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(w) != n:
        raise ValueError(f"need one weight per projection ({n}), got {len(w)}")
    if not all(math.isfinite(x) and x >= 0 for x in w) or not any(x > 0 for x in w):
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w}")
    return w


def check_aggregate(
    projections: Sequence[Projection], weights: Sequence[float] | torch.Tensor | None, tolerance: float
) -> AggregateCheck:
    """The verdict on one partition: passed iff |Σ_i w_i s_i / Σ_i w_i| ≤ tolerance (summed by math.fsum,
    correctly rounded, so the verdict does not depend on the peers' order). A non-finite report fails the check;
    the aggregator's ``check_projection`` then names the peer that sent it."""
    if not projections:
        raise ValueError("need at least one projection")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    w = _weights(weights, len(projections))
    if not all(math.isfinite(p.s) for p in projections):
        return AggregateCheck(weighted_sum=math.nan, tolerance=tolerance, passed=False)
    try:
        total = math.fsum(wi * p.s for wi, p in zip(w, projections)) / math.fsum(w)
    except OverflowError:  # reports near float64's largest values (lies: an honest one is at most tau)
        return AggregateCheck(weighted_sum=math.inf, tolerance=tolerance, passed=False)
    return AggregateCheck(weighted_sum=total, tolerance=tolerance, passed=abs(total) <= tolerance)


def _capped(norm: float, tau: float) -> float:
    return norm if 0 <= norm <= tau else tau  # a negative or NaN ν is a lie: count it at the cap


def default_tolerance(
    aggregate: torch.Tensor,
    projections: Sequence[Projection],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    tau: float,
    tol: float = 1e-6,
    margin: float = 2.0,
    sigmas: float | None = 8.0,
    report_rtol: float = REPORT_RTOL,
) -> float:
    """The acceptance bound for |Σ_i w_i s_i / Σ_i w_i| (module docstring):

        margin·(min(1, sigmas/√d)·B + (3·r_d + (n + 8)·eps64 + report_rtol)·S),   r_d = (4·log2(d) + 16)·eps64

    ``aggregate``: ĝ[j] as received (its dtype sets u); ``tol``: the CenteredClip tolerance the aggregators use;
    ``sigmas=None``: the worst case over z instead of the false-alarm bound 2·exp(−sigmas²/2)."""
    v = _checked("aggregate", aggregate)
    tau = _tau(tau)
    if not (math.isfinite(tol) and tol >= 0 and math.isfinite(margin) and margin >= 1):
        raise ValueError(f"need a finite tol >= 0 and margin >= 1, got tol={tol!r}, margin={margin!r}")
    if sigmas is not None and not (math.isfinite(sigmas) and sigmas > 0):
        raise ValueError(f"sigmas must be None or a finite number > 0, got {sigmas!r}")
    if not projections:
        raise ValueError("need at least one projection")
    d, n = v.numel(), len(projections)
    info = torch.finfo(aggregate.dtype)
    unit = info.eps / 2
    size = float(_norms(v))
    bound = (tol * max(1.0, size) + unit * size + math.sqrt(d) * info.smallest_normal) / (1 - unit)
    spread = 1.0 if sigmas is None else min(1.0, sigmas / math.sqrt(d))
    w = _weights(weights, n)
    scale = math.fsum(wi * _capped(p.norm, tau) for wi, p in zip(w, projections)) / math.fsum(w)
    # each accepted report may be off by 3·r_d + rtol (its rounding, the aggregator's, the slack check_projection
    # allows), the aggregator's stopping test by (n + 8)·eps (an n-term sum per coordinate); fsum is exact
    rounding = 3 * _projection_rounding(d) + (n + 8) * _EPS64 + report_rtol
    return margin * (spread * bound + rounding * scale)


def _misreported(
    x: torch.Tensor,
    aggregate: torch.Tensor,
    direction: torch.Tensor,
    tau: float,
    claimed: Sequence[Projection],
    rtol: float,
) -> list[int]:
    if not (math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol!r}")
    if len(claimed) != x.shape[0]:
        raise ValueError(f"need one claimed projection per part ({x.shape[0]}), got {len(claimed)}")
    s, norms = _project(x, aggregate, _one(direction), tau)
    slack = rtol + 2 * _projection_rounding(x.shape[1])  # the peer's rounding and ours
    return [
        i
        for i, (p, own_s, own_norm) in enumerate(zip(claimed, s.tolist(), norms.tolist()))
        if not _matches(p, own_s, own_norm, slack, tau)
    ]


def _matches(claimed: Projection, own_s: float, own_norm: float, slack: float, tau: float) -> bool:
    """A reported (s, ν) equals ours within ``slack`` times their scale (False for a NaN claim)."""
    return abs(claimed.s - own_s) <= slack * min(own_norm, tau) and abs(claimed.norm - own_norm) <= slack * own_norm


def check_projection(
    own_part: torch.Tensor,
    aggregate: torch.Tensor,
    direction: torch.Tensor,
    tau: float,
    claimed: Projection,
    rtol: float = REPORT_RTOL,
) -> bool:
    """The aggregator's check of one peer's report: it holds the peer's part (``own_part``, as received), so it
    recomputes (s, ν) and accepts iff both match within ``rtol`` times their scale (min(ν, τ) for s, ν for ν) plus
    the float64 rounding of the two computations. A non-finite claim is a lie. ``default_tolerance`` must be given
    the same ``rtol`` as ``report_rtol`` (what is let through here is allowed for there)."""
    part = _checked("own_part", own_part).unsqueeze(0)
    return not _misreported(part, aggregate, direction, tau, [claimed], rtol)


def check_projection_along(
    own_part: torch.Tensor,
    aggregate: torch.Tensor,
    directions: torch.Tensor,
    tau: float,
    claimed: Sequence[Projection],
    rtol: float = REPORT_RTOL,
) -> bool:
    """``check_projection`` of a report along k directions [k, d] (``claimed``: one projection per direction): true
    iff every one matches."""
    if len(claimed) != _as_rows(directions).shape[0]:
        return False  # a report of another length is no report of these directions
    part = _checked("own_part", own_part).unsqueeze(0)
    s, norms = _project(part, aggregate, directions, tau)
    slack = rtol + 2 * _projection_rounding(part.shape[1])
    return all(_matches(p, float(own_s), float(norms[0]), slack, tau) for p, own_s in zip(claimed, s[0]))


def find_misreports(
    parts: torch.Tensor,
    aggregate: torch.Tensor,
    direction: torch.Tensor,
    tau: float,
    claimed: Sequence[Projection],
    rtol: float = REPORT_RTOL,
) -> list[int]:
    """``check_projection`` for every row of ``parts`` [n, d] against ``claimed`` (one per row): the rows whose
    report is a lie, in order."""
    return _misreported(_checked_parts(parts), aggregate, direction, tau, claimed, rtol)
