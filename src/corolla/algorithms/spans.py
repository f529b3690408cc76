"""What a server announces about the blocks it hosts, and per-block views of a swarm built from those announcements.

A model has ``num_blocks`` transformer blocks numbered ``0 .. num_blocks - 1``. Every server hosts one contiguous,
half-open range ``[start, end)`` of them. These helpers are pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

__all__ = ["ServerSpan", "compute_coverage", "count_hosts", "find_missing_ranges", "uncovered_ranges"]


def _is_non_negative_number(value: object) -> bool:
    """True for a finite real number >= 0 (bools are refused: ``True`` is not a throughput)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(value) and value >= 0


def _is_int(value: object) -> bool:
    """True for an integer that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class ServerSpan:
    """One server's announcement: which blocks it hosts and how fast it is.

    Fields:
        peer_id: the server's peer id (non-empty).
        start, end: the hosted blocks ``[start, end)``; ``0 <= start < end``.
        throughput: the server's overall throughput (requests/s-ish; higher is better, >= 0). 0 means "hosting but
            not taking load yet".
        inference_rps: one-token inference steps per second *per block* (>= 0). Computing ``k`` blocks of one step
            takes ``k / inference_rps`` seconds. 0 means "cannot run inference steps"; routing skips such servers.
        cache_tokens_left: attention-cache room left, in tokens, or None when unknown (treated as enough).
        pings: measured round-trip times in seconds from this server to other peer ids (>= 0 each). Stored as a
            read-only copy, so later changes to the caller's dict do not leak in.

    Raises ValueError (naming the bad values) on construction when any field is out of range.
    """

    peer_id: str
    start: int
    end: int
    throughput: float
    inference_rps: float
    cache_tokens_left: int | None = None
    pings: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        problems = _span_problems(self)
        if problems:
            raise ValueError(f"Invalid ServerSpan for peer {self.peer_id!r}: " + "; ".join(problems))
        object.__setattr__(self, "pings", MappingProxyType({str(k): float(v) for k, v in self.pings.items()}))

    @property
    def length(self) -> int:
        """Number of hosted blocks, ``end - start``."""
        return self.end - self.start


def _span_problems(span: ServerSpan) -> list[str]:
    """Every reason why ``span`` is invalid, each naming the offending value; empty when it is valid."""
    problems = []
    if not isinstance(span.peer_id, str) or not span.peer_id:
        problems.append(f"peer_id must be a non-empty string, got {span.peer_id!r}")
    if not _is_int(span.start) or not _is_int(span.end):
        problems.append(f"start and end must be integers, got start={span.start!r}, end={span.end!r}")
    elif not 0 <= span.start < span.end:
        problems.append(f"need 0 <= start < end, got start={span.start}, end={span.end}")
    for name in ("throughput", "inference_rps"):
        value = getattr(span, name)
        if not _is_non_negative_number(value):
            problems.append(f"{name} must be a finite number >= 0, got {value!r}")
    if span.cache_tokens_left is not None and not (_is_int(span.cache_tokens_left) and span.cache_tokens_left >= 0):
        problems.append(f"cache_tokens_left must be None or an integer >= 0, got {span.cache_tokens_left!r}")
    problems.extend(_ping_problems(span.pings))
    return problems


def _ping_problems(pings: object) -> list[str]:
    """Reasons why ``pings`` is not a mapping of peer id -> finite RTT seconds >= 0."""
    if not isinstance(pings, Mapping):
        return [f"pings must be a mapping of peer id to seconds, got {type(pings).__name__}"]
    bad = {k: v for k, v in pings.items() if not isinstance(k, str) or not _is_non_negative_number(v)}
    if bad:
        return [f"pings must map peer ids (str) to finite seconds >= 0, bad entries: {bad!r}"]
    return []


def _check_num_blocks(num_blocks: int) -> None:
    """Raise ValueError unless ``num_blocks`` is an integer >= 0."""
    if not _is_int(num_blocks) or num_blocks < 0:
        raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")


def compute_coverage(spans: Iterable[ServerSpan], num_blocks: int) -> list[float]:
    """Per-block sum of the throughputs of the servers that host each block.

    Returns a list of ``num_blocks`` floats (requests/s-ish). Spans reaching past ``num_blocks`` are clipped to
    ``[0, num_blocks)``. Sums are accumulated in the order the spans are given. Raises ValueError for a negative
    or non-integer ``num_blocks``.
    """
    _check_num_blocks(num_blocks)
    coverage = np.zeros(num_blocks, dtype=np.float64)
    for span in spans:
        # Adding each span to its own blocks (not a +/- difference array) keeps unhosted blocks at exactly 0.0.
        coverage[span.start : min(span.end, num_blocks)] += span.throughput
    return coverage.tolist()


def _host_counts(spans: Iterable[ServerSpan], num_blocks: int) -> np.ndarray:
    """How many spans host each block of ``[0, num_blocks)`` (int64 array)."""
    diff = np.zeros(num_blocks + 1, dtype=np.int64)
    for span in spans:
        if span.start < num_blocks:
            diff[span.start] += 1
            diff[min(span.end, num_blocks)] -= 1
    return np.cumsum(diff[:-1])


def count_hosts(spans: Iterable[ServerSpan], num_blocks: int) -> list[int]:
    """How many of ``spans`` host each block of ``[0, num_blocks)`` (spans past the end are clipped)."""
    _check_num_blocks(num_blocks)
    return _host_counts(spans, num_blocks).tolist()


def uncovered_ranges(hosted: Sequence[bool] | np.ndarray, offset: int = 0) -> list[tuple[int, int]]:
    """Merge the False positions of a per-block boolean array (True = hosted) into half-open ranges, shifted by
    ``offset``; [] when every block is hosted."""
    missing = np.flatnonzero(~np.asarray(hosted, dtype=bool))
    if missing.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(missing) > 1)
    starts = np.concatenate(([missing[0]], missing[breaks + 1]))
    ends = np.concatenate((missing[breaks], [missing[-1]])) + 1
    return [(int(a) + offset, int(b) + offset) for a, b in zip(starts, ends, strict=True)]


def find_missing_ranges(spans: Iterable[ServerSpan], num_blocks: int) -> list[tuple[int, int]]:
    """Merged, sorted half-open ranges of blocks in ``[0, num_blocks)`` that no span hosts.

    A block hosted only by zero-throughput servers still counts as hosted. Raises ValueError for a negative or
    non-integer ``num_blocks``.
    """
    _check_num_blocks(num_blocks)
    return uncovered_ranges(_host_counts(spans, num_blocks) > 0)
