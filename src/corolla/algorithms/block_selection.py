"""Which blocks a server should host, so that the swarm's weakest block gets as much throughput as possible.

Pure functions (no I/O, no clock, no randomness) in the spirit of Petals' block selection:

* ``choose_best_start``: Petals' rule on a coverage vector - the window whose sorted throughputs are
  lexicographically smallest (so a window with a hole is taken first).
* ``choose_best_span``: where a server of a known throughput should go - the window that makes the swarm's sorted
  per-block throughputs lexicographically largest (the bottleneck first), ties broken by Petals' rule, then by the
  lowest start. This is a best response that never lowers the bottleneck.
* ``settle_swarm``: every server in turn moves to its best span given the others, until nobody moves.
* ``should_choose_other_blocks``: whether a server should move, judged by simulating the move and the swarm
  settling afterwards.

Throughputs are requests/s-ish numbers; coverage of a block is the sum of its hosts' throughputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from corolla.algorithms.spans import ServerSpan, compute_coverage

__all__ = [
    "SettleResult",
    "choose_best_span",
    "choose_best_start",
    "settle_swarm",
    "should_choose_other_blocks",
]

# Moves that improve a server's key by less than this (relative to the swarm's throughput scale) are not worth it.
# It absorbs floating-point noise, so a server never flips between two windows that are equal in exact arithmetic.
_RELATIVE_TOLERANCE = 1e-9


# ----------------------------------------------------------------------------------------------------------------
# Window keys
# ----------------------------------------------------------------------------------------------------------------


def _check_window(num_blocks: int, num_blocks_to_serve: int) -> None:
    """Raise ValueError unless ``1 <= num_blocks_to_serve <= num_blocks`` are integers."""
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (num_blocks, num_blocks_to_serve))
    if not ints or not 1 <= num_blocks_to_serve <= num_blocks:
        raise ValueError(
            f"need integers 1 <= num_blocks_to_serve <= num_blocks, got num_blocks_to_serve={num_blocks_to_serve!r}, "
            f"num_blocks={num_blocks!r}"
        )


def _check_throughput(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _petals_keys(coverage: np.ndarray, length: int) -> np.ndarray:
    """Row i: the sorted coverage of window ``[i, i + length)`` (Petals' key; smaller = weaker window)."""
    return np.sort(np.lib.stride_tricks.sliding_window_view(coverage, length), axis=1)


def _swarm_keys(others: np.ndarray, length: int, throughput: float) -> np.ndarray:
    """Row i: the negated, sorted per-block coverage of the whole swarm if the server sits at ``[i, i + length)``.

    Negated so that, like Petals' key, smaller is preferred: the lexicographically smallest row is the placement
    with the largest bottleneck, then the largest second-weakest block, and so on.
    """
    starts = np.arange(others.size - length + 1)[:, None]
    blocks = np.arange(others.size)[None, :]
    inside = (blocks >= starts) & (blocks < starts + length)
    return -np.sort(others[None, :] + np.where(inside, throughput, 0.0), axis=1)


def _lex_first(keys: Sequence[np.ndarray], tolerance: float = 0.0) -> int:
    """Row index that is lexicographically smallest by ``keys[0]``, then ``keys[1]``, ...; lowest index on ties.

    Values within ``tolerance`` of a column's minimum count as tied, so float noise cannot decide between rows that
    are equal in exact arithmetic.
    """
    candidates = np.arange(keys[0].shape[0])
    for key in keys:
        for column in key.T:
            values = column[candidates]
            candidates = candidates[values <= values.min() + tolerance]
            if candidates.size == 1:
                return int(candidates[0])
    return int(candidates[0])


def _clearly_smaller(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    """True iff vector ``a`` is lexicographically smaller than ``b``, ignoring differences up to ``tolerance``."""
    differs = np.flatnonzero(np.abs(a - b) > tolerance)
    return bool(differs.size) and a[differs[0]] < b[differs[0]]


def _tolerance(others: np.ndarray, throughput: float) -> float:
    """Absolute tolerance for comparing keys built from ``others`` and ``throughput``."""
    return _RELATIVE_TOLERANCE * (1.0 + float(np.max(np.abs(others), initial=0.0)) + throughput)


def _best_response(others: np.ndarray, length: int, throughput: float, current: int | None) -> int:
    """Best start for a server of ``length`` blocks and ``throughput``, given the others' coverage ``others``.

    Prefers the largest sorted swarm coverage, then Petals' weakest window, then the lowest start; values within
    the float tolerance count as equal. With ``current`` given, stays there unless the best start is clearly better.
    """
    keys = (_swarm_keys(others, length, throughput), _petals_keys(others, length))
    tolerance = _tolerance(others, throughput)
    best = _lex_first(keys, tolerance)
    if current is None or best == current:
        return best
    best_key = np.concatenate([k[best] for k in keys])
    current_key = np.concatenate([k[current] for k in keys])
    return best if _clearly_smaller(best_key, current_key, tolerance) else current


# ----------------------------------------------------------------------------------------------------------------
# Public choosers
# ----------------------------------------------------------------------------------------------------------------


def choose_best_start(coverage: Sequence[float], num_blocks_to_serve: int) -> int:
    """Start of the window of ``num_blocks_to_serve`` blocks where the swarm is weakest (Petals' rule).

    Among all windows of ``coverage`` (per-block throughputs), picks the one whose sorted throughputs are
    lexicographically smallest; ties go to the lowest start. A window containing a hole (0 throughput) therefore
    wins over any window without one. Raises ValueError unless ``1 <= num_blocks_to_serve <= len(coverage)`` or if
    a coverage value is negative or not finite.
    """
    values = np.asarray(coverage, dtype=np.float64)
    _check_window(values.size, num_blocks_to_serve)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"coverage must hold finite numbers >= 0, got {list(coverage)!r}")
    return _lex_first([_petals_keys(values, num_blocks_to_serve)])


def choose_best_span(
    spans: Iterable[ServerSpan], num_blocks: int, num_blocks_to_serve: int, own_throughput: float
) -> tuple[int, int]:
    """Blocks ``(start, end)`` a new server of throughput ``own_throughput`` should host, given the *other* servers.

    ``spans`` must not include the server itself. Picks the window that makes the swarm's sorted per-block
    coverage lexicographically largest once the server is added: the bottleneck is as large as possible, then the
    second-weakest block, and so on. Ties (e.g. ``own_throughput == 0``) go to Petals' weakest window
    (``choose_best_start``), then to the lowest start. Raises ValueError unless ``1 <= num_blocks_to_serve <=
    num_blocks`` and ``own_throughput`` is a finite number >= 0.
    """
    _check_window(num_blocks, num_blocks_to_serve)
    _check_throughput("own_throughput", own_throughput)
    others = np.asarray(compute_coverage(spans, num_blocks))
    start = _best_response(others, num_blocks_to_serve, float(own_throughput), current=None)
    return start, start + num_blocks_to_serve


# ----------------------------------------------------------------------------------------------------------------
# Local search
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SettleResult:
    """Outcome of ``settle_swarm``.

    Fields: ``spans`` the servers' final placements (input order; spans clipped to the model, see settle_swarm);
    ``rounds`` passes over all servers made; ``moves`` individual moves made; ``converged`` whether the last pass
    moved nobody (False only when ``max_rounds`` ran out).
    """

    spans: tuple[ServerSpan, ...]
    rounds: int
    moves: int
    converged: bool


def _clip(span: ServerSpan, num_blocks: int) -> ServerSpan | None:
    """``span`` cut to ``[0, num_blocks)``, or None when nothing of it is inside."""
    if span.start >= num_blocks:
        return None
    return span if span.end <= num_blocks else dataclasses.replace(span, end=num_blocks)


def _coverage_of(starts: np.ndarray, lengths: np.ndarray, throughputs: np.ndarray, num_blocks: int) -> np.ndarray:
    """Per-block throughput sums of servers at ``starts`` (recomputed from scratch, in index order)."""
    coverage = np.zeros(num_blocks)
    for start, length, throughput in zip(starts.tolist(), lengths.tolist(), throughputs.tolist(), strict=True):
        coverage[start : start + length] += throughput
    return coverage


def _settle_round(
    starts: np.ndarray, lengths: np.ndarray, throughputs: np.ndarray, order: Sequence[int], num_blocks: int
) -> int:
    """One pass: each server in ``order`` moves (in place, in ``starts``) to its best response. Returns #moves."""
    coverage = _coverage_of(starts, lengths, throughputs, num_blocks)
    moves = 0
    for i in order:
        start, length, throughput = int(starts[i]), int(lengths[i]), float(throughputs[i])
        others = coverage.copy()
        others[start : start + length] -= throughput
        new = _best_response(others, length, throughput, current=start)
        if new != start:
            others[new : new + length] += throughput
            coverage, starts[i], moves = others, new, moves + 1
    return moves


def settle_swarm(spans: Iterable[ServerSpan], num_blocks: int, *, max_rounds: int = 100) -> SettleResult:
    """Let every server move to its best span given the others (``choose_best_span``'s rule) until nobody moves.

    Servers take turns in peer-id order (ties by input position), keep their number of blocks and throughput,
    and move only for a clear improvement, so equal options never cause flip-flopping. A move raises the swarm's
    sorted coverage (bottleneck first) or, where that ties, takes a weaker window by Petals' rule; ``max_rounds``
    (passes over all servers) is a safety cap against cycles, which were not seen on random swarms.
    Spans are first clipped to ``[0, num_blocks)``; spans entirely outside are dropped from the result.
    Cost: O(rounds * servers * num_blocks^2 log num_blocks). Raises ValueError for ``num_blocks < 1`` or
    ``max_rounds < 1``.
    """
    _check_window(num_blocks, 1)
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    clipped = [c for c in (_clip(s, num_blocks) for s in spans) if c is not None]
    starts = np.array([s.start for s in clipped], dtype=np.int64)
    lengths = np.array([s.length for s in clipped], dtype=np.int64)
    throughputs = np.array([s.throughput for s in clipped], dtype=np.float64)
    order = sorted(range(len(clipped)), key=lambda i: (clipped[i].peer_id, i))
    rounds = moves = 0
    converged = False
    while rounds < max_rounds and not converged:
        moved = _settle_round(starts, lengths, throughputs, order, num_blocks)
        rounds, moves, converged = rounds + 1, moves + moved, moved == 0
    result = tuple(
        s if s.start == int(a) else dataclasses.replace(s, start=int(a), end=int(a) + s.length)
        for s, a in zip(clipped, starts.tolist(), strict=True)
    )
    return SettleResult(spans=result, rounds=rounds, moves=moves, converged=converged)


# ----------------------------------------------------------------------------------------------------------------
# Rebalancing decision
# ----------------------------------------------------------------------------------------------------------------


def _hosted(spans: Iterable[ServerSpan], num_blocks: int) -> np.ndarray:
    """Boolean per-block array: is the block hosted by at least one span (throughput ignored)."""
    counts = np.zeros(num_blocks + 1, dtype=np.int64)
    for span in spans:
        if span.start < num_blocks:
            counts[span.start] += 1
            counts[min(span.end, num_blocks)] -= 1
    return np.cumsum(counts[:-1]) > 0


def should_choose_other_blocks(
    own: ServerSpan,
    spans: Iterable[ServerSpan],
    num_blocks: int,
    *,
    balance_quality: float = 0.75,
    max_rounds: int = 100,
) -> bool:
    """Whether the server ``own`` should move to other blocks to balance the swarm.

    ``spans`` is the swarm as announced; entries with ``own.peer_id`` are ignored (``own`` stands for them).
    The server first finds its best span given the others (``choose_best_span``'s rule, staying put unless
    clearly better). If that is where it already is, the answer is False: a swarm at its optimum never moves.
    Otherwise the move is simulated, the whole swarm settles (``settle_swarm``), and the answer is True iff the
    current bottleneck (min per-block coverage) < ``balance_quality`` * the settled bottleneck, and moving does not
    leave any currently hosted block without a host (``own`` being its only host).

    Cost: one ``settle_swarm`` when a move is considered (about a second for 1,000 servers x 80 blocks, on one
    CPU core), otherwise one best-response evaluation (well under a millisecond).

    Raises ValueError for ``balance_quality`` not finite and > 0, ``num_blocks < 1``, or ``own`` not inside
    ``[0, num_blocks)``.
    """
    _check_window(num_blocks, 1)
    if isinstance(balance_quality, bool) or not (isinstance(balance_quality, (int, float)) and balance_quality > 0):
        raise ValueError(f"balance_quality must be a finite number > 0, got {balance_quality!r}")
    if not math.isfinite(balance_quality):
        raise ValueError(f"balance_quality must be a finite number > 0, got {balance_quality!r}")
    if own.end > num_blocks:
        raise ValueError(f"own span {own.start}:{own.end} does not fit the model's {num_blocks} blocks")
    others = [s for s in spans if s.peer_id != own.peer_id]
    others_coverage = np.asarray(compute_coverage(others, num_blocks))
    new_start = _best_response(others_coverage, own.length, float(own.throughput), current=own.start)
    if new_start == own.start:
        return False
    moved = dataclasses.replace(own, start=new_start, end=new_start + own.length)
    if np.any(_hosted([*others, own], num_blocks) & ~_hosted([*others, moved], num_blocks)):
        return False
    current_bottleneck = float(np.min(others_coverage + _window(own, num_blocks)))
    settled = settle_swarm([*others, moved], num_blocks, max_rounds=max_rounds)
    achievable = min(compute_coverage(settled.spans, num_blocks))
    return current_bottleneck < balance_quality * achievable


def _window(span: ServerSpan, num_blocks: int) -> np.ndarray:
    """Per-block array holding ``span.throughput`` on the span's blocks and 0 elsewhere."""
    values = np.zeros(num_blocks)
    values[span.start : span.end] = span.throughput
    return values
