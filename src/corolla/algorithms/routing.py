"""Choosing which servers a client sends its hidden states through.

Two choosers, both pure (no I/O, no clock, no global randomness):

* ``find_inference_route``: the fastest chain of servers for one-token inference steps: an exact shortest path
  over states (block boundary, server you are on). Every edge moves forward in blocks, so the graph is a DAG and
  the shortest path is computed boundary by boundary (Dijkstra's result, in topological order, without a heap).
  The graph is never materialised: "stay on the server for one more block" is one vectorised step per boundary,
  and the dense "leave server s, enter server t" switches are evaluated as one shared fallback-RTT minimum plus
  the sparse list of published pings, so the work is O(blocks * servers + usable pings), not O(servers^2).
* ``split_by_throughput``: random chains for forward/backward passes that spread sub-batches over servers in
  proportion to their throughput.

Cost model of an inference route ``hop_1 .. hop_k`` (seconds, one step of one token)::

    rtt(client, p_1) / 2                                     # client -> first server
  + sum_i [per_hop_overhead_s + blocks_i / inference_rps_i   # each hop's fixed overhead and compute
           + cache_full_penalty_s if p_i is short of cache]
  + sum_{i<k} rtt(p_i, p_{i+1}) / 2                          # server -> server
  + rtt(p_k, client) / 2                                     # last server -> client

``rtt(client, p)`` is ``client_pings[p]``; ``rtt(p, q)`` is ``p.pings[q]``, falling back to ``client_pings[q]``;
any RTT still unknown is ``costs.default_rtt_s``. Two consecutive hops never use the same peer.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np

from corolla.algorithms.spans import ServerSpan, uncovered_ranges

__all__ = [
    "NoRouteError",
    "RouteHop",
    "RoutingCosts",
    "estimate_route_time_s",
    "find_inference_route",
    "split_by_throughput",
]


class NoRouteError(ValueError):
    """Some blocks of the requested range are hosted by no usable server.

    ``missing`` holds the merged half-open block ranges that nobody usable hosts.
    """

    def __init__(self, missing: list[tuple[int, int]], detail: str = "") -> None:
        self.missing = list(missing)
        self.detail = detail
        ranges = ", ".join(f"{a}:{b}" for a, b in self.missing)
        super().__init__(
            f"No usable server hosts blocks {ranges}{detail}. Start a server for them or un-ban a server that "
            f"hosts them."
        )

    def __reduce__(self) -> tuple[type[NoRouteError], tuple[list[tuple[int, int]], str]]:
        """Pickle by constructor arguments, so ``missing`` survives crossing a process boundary."""
        return type(self), (self.missing, self.detail)


@dataclass(frozen=True, kw_only=True)
class RouteHop:
    """One hop of a route: send the hidden states through blocks ``[start, end)`` of server ``peer_id``."""

    peer_id: str
    start: int
    end: int


@dataclass(frozen=True, kw_only=True)
class RoutingCosts:
    """Knobs of the inference-route cost model, all in seconds and all finite and >= 0.

    Fields:
        per_hop_overhead_s: fixed cost of each hop (serialisation, scheduling), paid once per server used.
        default_rtt_s: round-trip time assumed when no ping between two parties is known.
        cache_full_penalty_s: added once per hop on a server whose ``cache_tokens_left`` is below the tokens the
            session needs; large enough to avoid such servers unless they are the only way through.

    Raises ValueError (naming the bad values) on construction when a field is negative, NaN or infinite.
    """

    per_hop_overhead_s: float = 0.005
    default_rtt_s: float = 0.1
    cache_full_penalty_s: float = 1000.0

    def __post_init__(self) -> None:
        values = {
            name: getattr(self, name) for name in ("per_hop_overhead_s", "default_rtt_s", "cache_full_penalty_s")
        }
        bad = {name: value for name, value in values.items() if not _is_seconds(value)}
        if bad:
            raise ValueError(f"RoutingCosts fields must be finite numbers >= 0 seconds, got {bad!r}")


def _is_seconds(value: object) -> bool:
    """True for a finite real number >= 0 that is not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(value) and value >= 0


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_block_range(start_block: int, end_block: int) -> None:
    """Raise ValueError unless ``0 <= start_block <= end_block`` are integers."""
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start_block, end_block))
    if not ints or not 0 <= start_block <= end_block:
        raise ValueError(f"need integers 0 <= start_block <= end_block, got {start_block!r}, {end_block!r}")


def _usable_sorted(
    spans: Iterable[ServerSpan], start_block: int, end_block: int, keep: Callable[[ServerSpan], bool]
) -> list[ServerSpan]:
    """Spans that overlap ``[start_block, end_block)`` and pass ``keep``, sorted by peer id (the tie-break order).

    Raises ValueError when two such spans share a peer id (a peer announces one span per model).
    """
    usable = sorted(
        (s for s in spans if s.start < end_block and s.end > start_block and keep(s)), key=lambda s: s.peer_id
    )
    for prev, cur in zip(usable, usable[1:], strict=False):
        if prev.peer_id == cur.peer_id:
            raise ValueError(
                f"peer {cur.peer_id!r} announces two spans, {prev.start}:{prev.end} and {cur.start}:{cur.end}"
            )
    return usable


def _bounds(usable: Sequence[ServerSpan]) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the spans as int64 arrays."""
    starts = np.fromiter((s.start for s in usable), dtype=np.int64, count=len(usable))
    ends = np.fromiter((s.end for s in usable), dtype=np.int64, count=len(usable))
    return starts, ends


def _raise_if_missing(starts: np.ndarray, ends: np.ndarray, start_block: int, end_block: int, detail: str) -> None:
    """Raise NoRouteError listing the blocks of ``[start_block, end_block)`` hosted by no span ``[starts, ends)``."""
    size = end_block - start_block
    first = np.clip(starts, start_block, end_block) - start_block
    last = np.clip(ends, start_block, end_block) - start_block
    hosts = np.cumsum(np.bincount(first, minlength=size + 1) - np.bincount(last, minlength=size + 1))[:size]
    missing = uncovered_ranges(hosts > 0, offset=start_block)
    if missing:
        raise NoRouteError(missing, detail)


# ----------------------------------------------------------------------------------------------------------------
# Inference routing: exact DP over block boundaries
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Swarm:
    """Array view of the usable servers for one route request; index = position in peer-id order.

    The lower index wins every tie. Row ``k`` of per-boundary data is boundary ``b = start_block + k``.

    Fields: ``hosts[k, i]`` server i hosts block b; ``step_s[i]`` seconds per block on i; ``entry_s[i]`` per-hop
    overhead plus any cache penalty; ``half_client[i]`` half the client<->i RTT, also the fallback half RTT of a
    hop *into* i. Published pings s -> t that are usable at boundary b (s hosts b-1, t hosts b) are listed in
    ``ping_src/ping_dst/ping_half[ping_ptr[k]:ping_ptr[k+1]]``, sorted by (dst, src); ``seg_start[seg_ptr[k]:
    seg_ptr[k+1]]`` are the positions where a new destination starts within that boundary's slice.
    """

    peers: tuple[str, ...]
    hosts: np.ndarray
    step_s: np.ndarray
    entry_s: np.ndarray
    half_client: np.ndarray
    ping_src: np.ndarray
    ping_dst: np.ndarray
    ping_half: np.ndarray
    ping_ptr: np.ndarray
    seg_start: np.ndarray
    seg_ptr: np.ndarray

    def pings_at(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(src, dst, half RTT) of the published pings usable at boundary row k."""
        lo, hi = self.ping_ptr[k], self.ping_ptr[k + 1]
        return self.ping_src[lo:hi], self.ping_dst[lo:hi], self.ping_half[lo:hi]


def _build_swarm(
    usable: Sequence[ServerSpan],
    *,
    start_block: int,
    end_block: int,
    client_pings: Mapping[str, float],
    costs: RoutingCosts,
    required_cache_tokens: int,
) -> _Swarm:
    """Turn the usable spans (peer-id order, all hosting something in the range) into per-request arrays."""
    n = len(usable)
    starts, ends = _bounds(usable)
    blocks = np.arange(start_block, end_block)[:, None]
    step_s = 1.0 / np.fromiter((s.inference_rps for s in usable), dtype=np.float64, count=n)
    short = np.fromiter(
        (s.cache_tokens_left is not None and s.cache_tokens_left < required_cache_tokens for s in usable),
        dtype=bool,
        count=n,
    )
    return _Swarm(
        peers=tuple(s.peer_id for s in usable),
        hosts=(starts[None, :] <= blocks) & (blocks < ends[None, :]),
        step_s=step_s,
        entry_s=costs.per_hop_overhead_s + np.where(short, costs.cache_full_penalty_s, 0.0),
        half_client=_client_rtts(usable, client_pings, costs.default_rtt_s) / 2.0,
        **_pings_by_boundary(usable, starts, ends, start_block, end_block),
    )


def _client_rtts(usable: Sequence[ServerSpan], client_pings: Mapping[str, float], default_rtt_s: float) -> np.ndarray:
    """Client<->server RTT in seconds for each usable server; raises ValueError for a negative or non-finite ping."""
    rtts = np.fromiter(
        (client_pings.get(s.peer_id, default_rtt_s) for s in usable), dtype=np.float64, count=len(usable)
    )
    bad = ~(np.isfinite(rtts) & (rtts >= 0))
    if bad.any():
        examples = {usable[i].peer_id: float(rtts[i]) for i in np.flatnonzero(bad)[:5]}
        raise ValueError(f"client_pings must be finite seconds >= 0, got {examples!r}")
    return rtts


def _published_pings(usable: Sequence[ServerSpan]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All published pings between usable servers as (src, dst, rtt_s) arrays, sorted by (dst, src).

    Self-pings and pings to peers that are not usable are dropped.
    """
    index = {s.peer_id: i for i, s in enumerate(usable)}
    counts = np.fromiter((len(s.pings) for s in usable), dtype=np.int64, count=len(usable))
    total = int(counts.sum())
    src = np.repeat(np.arange(len(usable), dtype=np.int64), counts)
    keys = itertools.chain.from_iterable(s.pings for s in usable)
    dst = np.fromiter(map(index.get, keys, itertools.repeat(-1)), dtype=np.int64, count=total)
    rtt = np.fromiter(itertools.chain.from_iterable(s.pings.values() for s in usable), dtype=np.float64, count=total)
    known = (dst >= 0) & (dst != src)
    src, dst, rtt = src[known], dst[known], rtt[known]
    order = _stable_argsort(dst, len(usable))  # src is already ascending, so this sorts by (dst, src)
    return src[order], dst[order], rtt[order]


def _stable_argsort(keys: np.ndarray, bound: int) -> np.ndarray:
    """Stable argsort of non-negative integer ``keys`` < ``bound``; uses numpy's radix sort when keys fit 16 bits."""
    return np.argsort(keys.astype(np.uint16) if bound <= 1 << 16 else keys, kind="stable")


def _pings_by_boundary(
    usable: Sequence[ServerSpan], starts: np.ndarray, ends: np.ndarray, start_block: int, end_block: int
) -> dict[str, np.ndarray]:
    """Expand each published ping s -> t into one entry per boundary b where it can be used (s hosts block b-1 and t
    hosts block b, start_block < b < end_block); group the entries by boundary, then (dst, src)."""
    src, dst, rtt = _published_pings(usable)
    first = np.maximum(np.maximum(starts[src] + 1, starts[dst]), start_block + 1)
    last = np.minimum(np.minimum(ends[src], ends[dst] - 1), end_block - 1)
    lengths = np.maximum(last - first + 1, 0)
    edge = np.repeat(np.arange(src.size), lengths)
    offset = np.arange(edge.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    row = first[edge] + offset - start_block
    order = _stable_argsort(row, end_block - start_block)  # stable: keeps (dst, src) order within a boundary
    edge, row = edge[order], row[order]
    ping_dst = dst[edge]
    new_segment = np.r_[True, (row[1:] != row[:-1]) | (ping_dst[1:] != ping_dst[:-1])] if edge.size else []
    seg_start = np.flatnonzero(new_segment)
    ping_ptr = np.searchsorted(row, np.arange(end_block - start_block + 1))
    return {
        "ping_src": src[edge],
        "ping_dst": ping_dst,
        "ping_half": rtt[edge] / 2.0,
        "ping_ptr": ping_ptr,
        "seg_start": seg_start,
        "seg_ptr": np.searchsorted(seg_start, ping_ptr),
    }


def _smallest_allowed(done: np.ndarray, excluded: Sequence[set[int]]) -> list[float]:
    """For each set in ``excluded``: the smallest ``done[s]`` over servers s not in that set (inf if none).

    Looks only at the k smallest entries, k = 1 + the largest set: one of them is always allowed, and it has the
    smallest allowed value.
    """
    k = 1 + max(len(x) for x in excluded)
    if k < done.size:
        top = np.argpartition(done, k - 1)[:k]
        top = top[np.argsort(done[top], kind="stable")].tolist()
    else:
        top = np.argsort(done, kind="stable").tolist()
    values = []
    for banned in excluded:
        allowed = next((s for s in top if s not in banned), None)
        values.append(math.inf if allowed is None else float(done[allowed]))
    return values


def _best_switch_in(sw: _Swarm, done: np.ndarray, k: int) -> np.ndarray:
    """For each server t: min over other servers s of ``done[s] + rtt(s, t) / 2`` at boundary row k.

    ``done[s]`` is the cost of having computed up to this boundary on s (inf where s cannot exit here). The
    fallback RTT into t does not depend on s, so one argmin s1 serves every t except s1 itself and the targets of
    s1's usable pings; those few are fixed up from the next-cheapest exits. Usable pings are reduced per
    destination. Every candidate is the float ``done[s] + half``, so backtracking can reproduce it exactly.
    Entries for servers not hosting this boundary's block are meaningless; callers mask them.
    """
    s1 = int(np.argmin(done))
    if not math.isfinite(done[s1]):
        return np.full(done.size, np.inf)
    best = done[s1] + sw.half_client
    src, dst, half = sw.pings_at(k)
    cand = done[src] + half
    if src.size:
        seg = sw.seg_start[sw.seg_ptr[k] : sw.seg_ptr[k + 1]]
        targets = sw.ping_dst[seg]
        best[targets] = np.minimum(best[targets], np.minimum.reduceat(cand, seg - sw.ping_ptr[k]))
    special = [t for t in (s1, *dst[src == s1].tolist()) if sw.hosts[k, t]]
    if special:
        # dst is sorted within the boundary, so each special t's incoming pings are one slice of it.
        firsts = np.searchsorted(dst, special).tolist()
        lasts = np.searchsorted(dst, special, side="right").tolist()
        excluded = [{t, *src[a:b].tolist()} for t, a, b in zip(special, firsts, lasts, strict=True)]
        fallbacks = _smallest_allowed(done, excluded)
        for t, a, b, fallback in zip(special, firsts, lasts, fallbacks, strict=True):
            best[t] = min(fallback + sw.half_client[t], cand[a:b].min() if b > a else math.inf)
    return best


def _forward(sw: _Swarm) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fill ``on[k][i]`` = cheapest cost to be on server i ready to compute block ``start_block + k``.

    Also returns ``entered[k][i]``: whether that cheapest way enters i there rather than continuing on i (ties
    continue, so routes switch no more often than needed).
    """
    on = np.where(sw.hosts[0], sw.half_client + sw.entry_s, np.inf)
    on_rows, entered_rows = [on], [sw.hosts[0]]
    for k in range(1, sw.hosts.shape[0]):
        done = on + sw.step_s
        enter = _best_switch_in(sw, done, k) + sw.entry_s
        cont = np.where(sw.hosts[k], done, np.inf)
        entered = sw.hosts[k] & (enter < cont)
        on = np.where(entered, enter, cont)
        on_rows.append(on)
        entered_rows.append(entered)
    return on_rows, entered_rows


def _predecessor(sw: _Swarm, done: np.ndarray, k: int, t: int) -> int:
    """The server a cheapest route leaves at boundary row k to enter t (lowest index on ties)."""
    half = np.full(done.size, sw.half_client[t])
    src, dst, ping_half = sw.pings_at(k)
    into_t = dst == t
    half[src[into_t]] = ping_half[into_t]
    cand = done + half
    cand[t] = np.inf
    return int(np.argmin(cand))


def _backtrack(
    sw: _Swarm, start_block: int, on_rows: list[np.ndarray], entered_rows: list[np.ndarray]
) -> list[RouteHop]:
    """Recover the hops of the cheapest route from the DP tables, ending with the cheapest way back to the client."""
    cur = int(np.argmin(on_rows[-1] + sw.step_s + sw.half_client))
    hop_end, hops = start_block + len(on_rows), []
    for k in range(len(on_rows) - 1, 0, -1):
        if entered_rows[k][cur]:
            hops.append(RouteHop(peer_id=sw.peers[cur], start=start_block + k, end=hop_end))
            cur, hop_end = _predecessor(sw, on_rows[k - 1] + sw.step_s, k, cur), start_block + k
    hops.append(RouteHop(peer_id=sw.peers[cur], start=start_block, end=hop_end))
    return hops[::-1]


def find_inference_route(
    spans: Iterable[ServerSpan],
    *,
    start_block: int,
    end_block: int,
    client_pings: Mapping[str, float],
    costs: RoutingCosts = RoutingCosts(),
    required_cache_tokens: int = 0,
    banned: AbstractSet[str] = frozenset(),
) -> list[RouteHop]:
    """The fastest chain of servers for one inference step through blocks ``[start_block, end_block)``.

    Minimises the cost model in this module's docstring exactly, over every chain where each hop uses any
    sub-range of its server's span and hops may switch at any block boundary. Servers in ``banned`` and servers
    with ``inference_rps == 0`` are not used; servers short of cache are used only at ``cache_full_penalty_s``.
    Ties go to the route found first when servers are ordered by peer id (and to fewer switches), so the same
    input always gives the same route.

    Cost: O(total published pings) Python work to read the pings, then per block boundary O(servers + pings usable
    there) numpy work and a small Python loop over the pings of the cheapest server to leave. Designed for servers
    publishing a bounded number of pings each; with every server pinging every other it degrades to O(servers^2).

    Returns [] for an empty range. Raises NoRouteError (``.missing`` = uncovered ranges) when some block is hosted
    by no usable server; ValueError for a bad range, negative ``required_cache_tokens``, a negative or non-finite
    client ping, or a peer id with two spans.
    """
    _check_block_range(start_block, end_block)
    if isinstance(required_cache_tokens, bool) or not isinstance(required_cache_tokens, (int, np.integer)):
        raise ValueError(f"required_cache_tokens must be an integer >= 0, got {required_cache_tokens!r}")
    if required_cache_tokens < 0:
        raise ValueError(f"required_cache_tokens must be an integer >= 0, got {required_cache_tokens!r}")
    if start_block == end_block:
        return []
    usable = _usable_sorted(spans, start_block, end_block, lambda s: s.peer_id not in banned and s.inference_rps > 0)
    _raise_if_missing(*_bounds(usable), start_block, end_block, " (banned and zero-speed servers excluded)")
    sw = _build_swarm(
        usable,
        start_block=start_block,
        end_block=end_block,
        client_pings=client_pings,
        costs=costs,
        required_cache_tokens=required_cache_tokens,
    )
    on_rows, entered_rows = _forward(sw)
    return _backtrack(sw, start_block, on_rows, entered_rows)


def estimate_route_time_s(
    route: Sequence[RouteHop],
    spans: Iterable[ServerSpan],
    *,
    client_pings: Mapping[str, float],
    costs: RoutingCosts = RoutingCosts(),
    required_cache_tokens: int = 0,
) -> float:
    """Seconds one inference step takes along ``route`` under this module's cost model (0.0 for an empty route).

    Raises ValueError when the hops are not contiguous, a hop is empty, a hop's peer is unknown, has no inference
    speed, or does not host the hop's blocks, or two consecutive hops use the same peer.
    """
    by_peer = {s.peer_id: s for s in spans}
    total, prev = 0.0, None
    for i, hop in enumerate(route):
        span = _check_hop(hop, by_peer, route[i - 1] if i else None)
        rtt = client_pings.get(hop.peer_id, costs.default_rtt_s)
        if prev is not None:
            rtt = prev.pings.get(hop.peer_id, rtt)
        short = span.cache_tokens_left is not None and span.cache_tokens_left < required_cache_tokens
        total += rtt / 2 + costs.per_hop_overhead_s + (hop.end - hop.start) / span.inference_rps
        total += costs.cache_full_penalty_s if short else 0.0
        prev = span
    if prev is not None:
        total += client_pings.get(prev.peer_id, costs.default_rtt_s) / 2
    return total


def _check_hop(hop: RouteHop, by_peer: Mapping[str, ServerSpan], before: RouteHop | None) -> ServerSpan:
    """The span serving ``hop``; raises ValueError when the hop is not a valid continuation of ``before``."""
    span = by_peer.get(hop.peer_id)
    if span is None or span.inference_rps <= 0 or not span.start <= hop.start < hop.end <= span.end:
        raise ValueError(f"hop {hop} is not served: peer's span is {span}")
    if before is not None and (before.end != hop.start or before.peer_id == hop.peer_id):
        raise ValueError(f"hop {hop} does not continue {before} (need a different peer starting at {before.end})")
    return span


# ----------------------------------------------------------------------------------------------------------------
# Throughput-proportional chains for forward/backward passes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Choices:
    """Servers hosting one block, in peer-id order, with cumulative sampling weights (last one = total > 0)."""

    indices: list[int]
    cumulative: list[float]


def _choices_at(starts: np.ndarray, ends: np.ndarray, throughputs: np.ndarray, block: int) -> _Choices:
    """Who can take block ``block``: weights are throughputs, or uniform when every host has throughput 0."""
    indices = np.flatnonzero((starts <= block) & (block < ends))
    weights = throughputs[indices]
    if not weights.sum() > 0:
        weights = np.ones(indices.size)
    return _Choices(indices=indices.tolist(), cumulative=np.cumsum(weights).tolist())


def _sample(choices: _Choices, rng: np.random.Generator) -> int:
    """Index (into the usable spans) of one host drawn with probability proportional to its weight."""
    k = bisect.bisect_right(choices.cumulative, float(rng.random()) * choices.cumulative[-1])
    # A draw rounded up to the total lands past the end: step back to the last host with a positive weight.
    while k >= len(choices.indices) or (k > 0 and choices.cumulative[k] == choices.cumulative[k - 1]):
        k -= 1
    return choices.indices[k]


def split_by_throughput(
    spans: Iterable[ServerSpan],
    *,
    start_block: int,
    end_block: int,
    num_items: int,
    rng: np.random.Generator,
    banned: AbstractSet[str] = frozenset(),
) -> list[list[RouteHop]]:
    """One random chain through ``[start_block, end_block)`` per sub-batch, spreading load by throughput.

    For each of ``num_items`` chains: at the current block, draw one of the non-banned servers hosting it with
    probability proportional to its throughput (uniformly if all of them have throughput 0), send that hop as far
    as the server's span goes (capped at ``end_block``), and repeat from there. Randomness comes only from ``rng``
    (one ``rng.random()`` per hop), so a seeded generator gives reproducible chains.

    Returns ``num_items`` routes ([] routes for an empty range). Raises NoRouteError when some block is hosted by
    no non-banned server, ValueError for a bad range, ``num_items < 0`` or a peer id with two spans.
    """
    _check_block_range(start_block, end_block)
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 0:
        raise ValueError(f"num_items must be an integer >= 0, got {num_items!r}")
    usable = _usable_sorted(spans, start_block, end_block, lambda s: s.peer_id not in banned)
    if start_block == end_block:
        return [[] for _ in range(num_items)]
    starts, ends = _bounds(usable)
    _raise_if_missing(starts, ends, start_block, end_block, " (banned servers excluded)")
    throughputs = np.fromiter((s.throughput for s in usable), dtype=np.float64, count=len(usable))
    cache: dict[int, _Choices] = {}
    routes = []
    for _ in range(num_items):
        block, route = start_block, []
        while block < end_block:
            if block not in cache:
                cache[block] = _choices_at(starts, ends, throughputs, block)
            span = usable[_sample(cache[block], rng)]
            route.append(RouteHop(peer_id=span.peer_id, start=block, end=min(span.end, end_block)))
            block = route[-1].end
        routes.append(route)
    return routes
