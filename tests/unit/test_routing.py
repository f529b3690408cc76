"""Inference routing (exactness, preferences, failures, determinism) and throughput-proportional chains."""

from __future__ import annotations

import math
import pickle
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from corolla.algorithms.routing import (
    NoRouteError,
    RouteHop,
    RoutingCosts,
    estimate_route_time_s,
    find_inference_route,
    split_by_throughput,
)
from corolla.algorithms.spans import ServerSpan

ZERO = RoutingCosts(per_hop_overhead_s=0.0, default_rtt_s=0.0, cache_full_penalty_s=0.0)


def srv(peer_id: str, start: int, end: int, rps: float = 10.0, throughput: float = 1.0, **kwargs) -> ServerSpan:
    return ServerSpan(peer_id=peer_id, start=start, end=end, throughput=throughput, inference_rps=rps, **kwargs)


def hops(*triples: tuple[str, int, int]) -> list[RouteHop]:
    return [RouteHop(peer_id=p, start=a, end=b) for p, a, b in triples]


# ---------------------------------------------------------------------------------------------------------------
# Independent reference implementations
# ---------------------------------------------------------------------------------------------------------------


def reference_cost(
    route: Sequence[RouteHop],
    spans: Sequence[ServerSpan],
    pings: Mapping[str, float],
    costs: RoutingCosts,
    required: int,
) -> float:
    """The documented cost model, written out hop by hop."""
    by_peer = {s.peer_id: s for s in spans}
    total, prev = 0.0, None
    for hop in route:
        s = by_peer[hop.peer_id]
        rtt = pings.get(hop.peer_id, costs.default_rtt_s)
        if prev is not None and hop.peer_id in prev.pings:
            rtt = prev.pings[hop.peer_id]
        total += rtt / 2 + costs.per_hop_overhead_s + (hop.end - hop.start) / s.inference_rps
        if s.cache_tokens_left is not None and s.cache_tokens_left < required:
            total += costs.cache_full_penalty_s
        prev = s
    return total + pings.get(prev.peer_id, costs.default_rtt_s) / 2


def brute_force_best(spans, lo, hi, pings, costs, required) -> float:
    """Min cost over every chain of (server, sub-range) hops with no two consecutive hops on one peer."""
    best = math.inf
    usable = [s for s in spans if s.inference_rps > 0]

    def extend(block: int, prev: str | None, route: list[RouteHop]) -> None:
        nonlocal best
        if block == hi:
            best = min(best, reference_cost(route, spans, pings, costs, required))
            return
        for s in usable:
            if s.peer_id != prev and s.start <= block < s.end:
                for end in range(block + 1, min(s.end, hi) + 1):
                    route.append(RouteHop(peer_id=s.peer_id, start=block, end=end))
                    extend(end, s.peer_id, route)
                    route.pop()

    extend(lo, None, [])
    return best


def dense_dp_best(spans, lo, hi, pings, costs, required) -> float:
    """O(blocks * servers^2) dynamic programme over (boundary, server) states, for medium swarms."""
    spans = [s for s in spans if s.inference_rps > 0]
    n = len(spans)

    def enter_cost(t: ServerSpan) -> float:
        short = t.cache_tokens_left is not None and t.cache_tokens_left < required
        return costs.per_hop_overhead_s + (costs.cache_full_penalty_s if short else 0.0)

    def hosts(s: ServerSpan, block: int) -> bool:
        return s.start <= block < s.end

    on = [pings.get(t.peer_id, costs.default_rtt_s) / 2 + enter_cost(t) if hosts(t, lo) else math.inf for t in spans]
    for block in range(lo + 1, hi):
        done = [on[i] + 1 / spans[i].inference_rps for i in range(n)]
        new = []
        for j, t in enumerate(spans):
            if not hosts(t, block):
                new.append(math.inf)
                continue
            best = done[j]
            for i, s in enumerate(spans):
                if i != j and math.isfinite(done[i]):
                    rtt = s.pings.get(t.peer_id, pings.get(t.peer_id, costs.default_rtt_s))
                    best = min(best, done[i] + rtt / 2 + enter_cost(t))
            new.append(best)
        on = new
    return min(
        on[i] + 1 / spans[i].inference_rps + pings.get(spans[i].peer_id, costs.default_rtt_s) / 2 for i in range(n)
    )


def random_swarm(rng: np.random.Generator, num_servers: int, num_blocks: int, ping_prob: float):
    ids = [f"s{i:02d}" for i in range(num_servers)]
    spans = []
    for peer_id in ids:
        start = int(rng.integers(0, num_blocks))
        end = int(rng.integers(start + 1, num_blocks + 1))
        pings = {
            p: float(rng.choice([0.0, 0.01, 0.3, 2.0, rng.uniform(0, 0.5)])) for p in ids if rng.random() < ping_prob
        }
        spans.append(
            ServerSpan(
                peer_id=peer_id,
                start=start,
                end=end,
                throughput=1.0,
                inference_rps=float(rng.choice([0.0, 1.0, 5.0, rng.uniform(0.5, 20.0)], p=[0.05, 0.3, 0.3, 0.35])),
                cache_tokens_left=int(rng.integers(0, 10)) if rng.random() < 0.3 else None,
                pings=pings,
            )
        )
    client_pings = {p: float(rng.uniform(0.0, 0.5)) for p in ids if rng.random() < 0.6}
    costs = RoutingCosts(
        per_hop_overhead_s=float(rng.choice([0.0, 0.005, 0.05])),
        default_rtt_s=float(rng.choice([0.0, 0.1, 0.3])),
        cache_full_penalty_s=float(rng.choice([0.0, 5.0, 1000.0])),
    )
    return spans, client_pings, costs


def assert_valid_route(route, spans, lo, hi):
    by_peer = {s.peer_id: s for s in spans}
    assert route[0].start == lo and route[-1].end == hi
    for prev, hop in zip(route, route[1:], strict=False):
        assert prev.end == hop.start and prev.peer_id != hop.peer_id
    for hop in route:
        assert by_peer[hop.peer_id].start <= hop.start < hop.end <= by_peer[hop.peer_id].end


# ---------------------------------------------------------------------------------------------------------------
# Optimality
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_route_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        num_blocks = int(rng.integers(1, 7))
        spans, pings, costs = random_swarm(rng, int(rng.integers(1, 6)), num_blocks, ping_prob=0.5)
        lo = int(rng.integers(0, num_blocks))
        hi = int(rng.integers(lo + 1, num_blocks + 1))
        required = int(rng.integers(0, 10))
        expected = brute_force_best(spans, lo, hi, pings, costs, required)
        if math.isinf(expected):
            with pytest.raises(NoRouteError):
                find_inference_route(
                    spans,
                    start_block=lo,
                    end_block=hi,
                    client_pings=pings,
                    costs=costs,
                    required_cache_tokens=required,
                )
            continue
        route = find_inference_route(
            spans, start_block=lo, end_block=hi, client_pings=pings, costs=costs, required_cache_tokens=required
        )
        assert_valid_route(route, spans, lo, hi)
        got = reference_cost(route, spans, pings, costs, required)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert estimate_route_time_s(
            route, spans, client_pings=pings, costs=costs, required_cache_tokens=required
        ) == pytest.approx(got, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_route_is_optimal_against_dense_dp_on_medium_swarms(seed):
    rng = np.random.default_rng(1000 + seed)
    spans, pings, costs = random_swarm(rng, 25, 16, ping_prob=0.3)
    spans.extend(srv(f"z{b}", b, b + 1, rps=0.5) for b in range(16))  # every block hosted
    route = find_inference_route(spans, start_block=0, end_block=16, client_pings=pings, costs=costs)
    assert_valid_route(route, spans, 0, 16)
    expected = dense_dp_best(spans, 0, 16, pings, costs, 0)
    assert reference_cost(route, spans, pings, costs, 0) == pytest.approx(expected, rel=1e-12)


def test_switches_mid_span_when_that_is_faster():
    spans = [srv("a", 0, 10, rps=1.0), srv("b", 4, 7, rps=100.0)]
    route = find_inference_route(spans, start_block=0, end_block=10, client_pings={}, costs=ZERO)
    assert route == hops(("a", 0, 4), ("b", 4, 7), ("a", 7, 10))


# ---------------------------------------------------------------------------------------------------------------
# Preferences
# ---------------------------------------------------------------------------------------------------------------


def test_fast_server_behind_slow_client_link_is_avoided():
    spans = [srv("fast", 0, 8, rps=1000.0), srv("slow", 0, 8, rps=20.0)]
    route = find_inference_route(
        spans, start_block=0, end_block=8, client_pings={"fast": 2.0, "slow": 0.01}, costs=RoutingCosts()
    )
    assert route == hops(("slow", 0, 8))


def test_fast_server_behind_slow_server_link_is_avoided():
    spans = [
        srv("a", 0, 4, rps=100.0, pings={"fast": 3.0, "ok": 0.01}),
        srv("fast", 4, 8, rps=1000.0),
        srv("ok", 4, 8, rps=50.0, pings={"fast": 3.0}),
    ]
    pings = {"a": 0.01, "fast": 0.01, "ok": 0.01}
    route = find_inference_route(spans, start_block=0, end_block=8, client_pings=pings)
    assert route == hops(("a", 0, 4), ("ok", 4, 8))


def test_server_to_server_rtt_falls_back_to_client_ping_then_default():
    spans = [srv("a", 0, 2), srv("b", 2, 4)]
    costs = RoutingCosts(per_hop_overhead_s=0.0, default_rtt_s=0.4, cache_full_penalty_s=0.0)
    route = find_inference_route(spans, start_block=0, end_block=4, client_pings={"b": 0.2}, costs=costs)
    # client->a: default 0.4/2; a->b: client's ping to b 0.2/2; b->client 0.2/2; compute 4 blocks at 10/s.
    assert estimate_route_time_s(route, spans, client_pings={"b": 0.2}, costs=costs) == pytest.approx(
        0.2 + 0.1 + 0.1 + 0.4
    )


def test_cache_full_server_is_avoided_but_used_when_it_is_the_only_one():
    full = srv("a-full", 0, 4, rps=100.0, cache_tokens_left=10)
    roomy = srv("b-roomy", 0, 4, rps=10.0, cache_tokens_left=5000)
    unknown = srv("c-unknown", 0, 4, rps=5.0)
    assert find_inference_route(
        [full, roomy], start_block=0, end_block=4, client_pings={}, required_cache_tokens=100
    ) == hops(("b-roomy", 0, 4))
    assert find_inference_route(
        [full, unknown], start_block=0, end_block=4, client_pings={}, required_cache_tokens=100
    ) == hops(("c-unknown", 0, 4))
    assert find_inference_route(
        [full], start_block=0, end_block=4, client_pings={}, required_cache_tokens=100
    ) == hops(("a-full", 0, 4))
    assert find_inference_route([full, roomy], start_block=0, end_block=4, client_pings={}) == hops(("a-full", 0, 4))


def test_heterogeneous_speeds_pick_the_faster_chain():
    spans = [srv("a", 0, 6, rps=2.0), srv("b", 0, 3, rps=50.0), srv("c", 3, 6, rps=50.0)]
    route = find_inference_route(spans, start_block=0, end_block=6, client_pings={})
    assert route == hops(("b", 0, 3), ("c", 3, 6))
    # With a large per-hop overhead one slow hop beats two fast ones.
    slow_hops = RoutingCosts(per_hop_overhead_s=5.0)
    assert find_inference_route(spans, start_block=0, end_block=6, client_pings={}, costs=slow_hops) == hops(
        ("a", 0, 6)
    )


def test_ties_go_to_lowest_peer_id_and_fewest_hops():
    spans = [srv("b", 0, 4), srv("a", 0, 4), srv("c", 0, 2), srv("d", 2, 4)]
    assert find_inference_route(spans, start_block=0, end_block=4, client_pings={}, costs=ZERO) == hops(("a", 0, 4))


def test_sub_range_of_the_model():
    spans = [srv("a", 0, 10), srv("b", 5, 20)]
    assert find_inference_route(spans, start_block=7, end_block=9, client_pings={}) == hops(("a", 7, 9))
    assert find_inference_route(spans, start_block=12, end_block=15, client_pings={}) == hops(("b", 12, 15))


# ---------------------------------------------------------------------------------------------------------------
# Exclusions and failures
# ---------------------------------------------------------------------------------------------------------------


def test_banned_servers_are_excluded():
    spans = [srv("best", 0, 4, rps=1000.0), srv("other", 0, 4, rps=1.0)]
    route = find_inference_route(spans, start_block=0, end_block=4, client_pings={}, banned={"best"})
    assert route == hops(("other", 0, 4))


def test_banning_the_only_host_reports_missing_blocks():
    spans = [srv("a", 0, 4), srv("b", 3, 8)]
    with pytest.raises(NoRouteError) as info:
        find_inference_route(spans, start_block=0, end_block=8, client_pings={}, banned=frozenset({"b"}))
    assert info.value.missing == [(4, 8)]
    assert isinstance(info.value, ValueError)
    assert "4:8" in str(info.value)


def test_missing_ranges_are_reported_in_absolute_blocks():
    spans = [srv("a", 0, 3), srv("b", 5, 8)]
    with pytest.raises(NoRouteError) as info:
        find_inference_route(spans, start_block=1, end_block=10, client_pings={})
    assert info.value.missing == [(3, 5), (8, 10)]


def test_zero_speed_servers_are_not_used():
    spans = [srv("a", 0, 4, rps=0.0), srv("b", 0, 4, rps=1.0)]
    assert find_inference_route(spans, start_block=0, end_block=4, client_pings={}) == hops(("b", 0, 4))
    with pytest.raises(NoRouteError) as info:
        find_inference_route(spans[:1], start_block=0, end_block=4, client_pings={})
    assert info.value.missing == [(0, 4)]


def test_empty_swarm_and_empty_range():
    with pytest.raises(NoRouteError) as info:
        find_inference_route([], start_block=0, end_block=3, client_pings={})
    assert info.value.missing == [(0, 3)]
    assert find_inference_route([], start_block=2, end_block=2, client_pings={}) == []


@pytest.mark.parametrize(("lo", "hi"), [(3, 2), (-1, 2), (0.0, 2)])
def test_bad_block_range_raises(lo, hi):
    with pytest.raises(ValueError, match="start_block"):
        find_inference_route([srv("a", 0, 4)], start_block=lo, end_block=hi, client_pings={})


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="required_cache_tokens"):
        find_inference_route([srv("a", 0, 4)], start_block=0, end_block=4, client_pings={}, required_cache_tokens=-1)
    with pytest.raises(ValueError, match="two spans"):
        find_inference_route([srv("a", 0, 2), srv("a", 2, 4)], start_block=0, end_block=4, client_pings={})
    with pytest.raises(ValueError, match="default_rtt_s"):
        RoutingCosts(default_rtt_s=-0.1)
    with pytest.raises(ValueError, match="per_hop_overhead_s"):
        RoutingCosts(per_hop_overhead_s=math.nan)


def test_no_route_error_survives_pickling():
    error = pickle.loads(pickle.dumps(NoRouteError([(1, 3), (5, 6)], " (detail)")))
    assert error.missing == [(1, 3), (5, 6)] and "1:3, 5:6 (detail)" in str(error)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_bad_client_pings_raise(bad):
    with pytest.raises(ValueError, match="client_pings"):
        find_inference_route([srv("a", 0, 2)], start_block=0, end_block=2, client_pings={"a": bad})


def test_estimate_rejects_broken_routes():
    spans = [srv("a", 0, 4), srv("b", 2, 6)]
    assert estimate_route_time_s([], spans, client_pings={}) == 0.0
    with pytest.raises(ValueError, match="does not continue"):
        estimate_route_time_s(hops(("a", 0, 2), ("b", 3, 6)), spans, client_pings={})
    with pytest.raises(ValueError, match="does not continue"):
        estimate_route_time_s(hops(("a", 0, 2), ("a", 2, 4)), spans, client_pings={})
    with pytest.raises(ValueError, match="not served"):
        estimate_route_time_s(hops(("b", 0, 6)), spans, client_pings={})
    with pytest.raises(ValueError, match="not served"):
        estimate_route_time_s(hops(("x", 0, 1)), spans, client_pings={})


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


def test_same_input_in_any_order_gives_the_same_route():
    rng = np.random.default_rng(7)
    spans, pings, costs = random_swarm(rng, 30, 12, ping_prob=0.2)
    spans.extend(srv(f"z{b}", b, b + 1, rps=0.5) for b in range(12))
    first = find_inference_route(spans, start_block=0, end_block=12, client_pings=pings, costs=costs)
    shuffled = list(spans)
    random.Random(3).shuffle(shuffled)
    assert find_inference_route(shuffled, start_block=0, end_block=12, client_pings=pings, costs=costs) == first
    assert find_inference_route(spans, start_block=0, end_block=12, client_pings=pings, costs=costs) == first


def test_large_swarm_gives_a_valid_route():
    rng = np.random.default_rng(11)
    ids = [f"p{i:04d}" for i in range(300)]
    spans = []
    for i, peer_id in enumerate(ids):
        length = int(rng.integers(2, 12))
        start = min(i, 40 - length) if i < 40 else int(rng.integers(0, 40 - length + 1))
        pings = {ids[j]: float(rng.uniform(0.001, 0.3)) for j in rng.choice(300, size=8, replace=False)}
        spans.append(srv(peer_id, start, start + length, rps=float(rng.uniform(5, 100)), pings=pings))
    route = find_inference_route(spans, start_block=0, end_block=40, client_pings={ids[0]: 0.01})
    assert_valid_route(route, spans, 0, 40)


def test_thousand_server_route_is_not_quadratic():
    # The benchmark (benchmarks/bench_routing.py) measures ~15 ms; a dense servers x servers graph takes seconds.
    rng = np.random.default_rng(3)
    ids = [f"p{i:04d}" for i in range(1000)]
    spans = []
    for i, peer_id in enumerate(ids):
        length = int(rng.integers(4, 25))
        start = min(i, 80 - length) if i < 80 else int(rng.integers(0, 80 - length + 1))
        pings = {ids[j]: float(rng.uniform(0.001, 0.3)) for j in rng.choice(1000, size=16, replace=False)}
        spans.append(srv(peer_id, start, start + length, rps=float(rng.uniform(5, 100)), pings=pings))
    started = time.perf_counter()
    route = find_inference_route(spans, start_block=0, end_block=80, client_pings={})
    assert time.perf_counter() - started < 2.0
    assert_valid_route(route, spans, 0, 80)


# ---------------------------------------------------------------------------------------------------------------
# split_by_throughput
# ---------------------------------------------------------------------------------------------------------------


def test_split_is_proportional_to_throughput():
    spans = [srv("a", 0, 8, throughput=1.0), srv("b", 0, 8, throughput=3.0), srv("c", 0, 8, throughput=0.0)]
    routes = split_by_throughput(spans, start_block=0, end_block=8, num_items=4000, rng=np.random.default_rng(0))
    counts = Counter(route[0].peer_id for route in routes)
    assert all(route == hops((route[0].peer_id, 0, 8)) for route in routes)
    assert counts["c"] == 0
    assert counts["b"] / 4000 == pytest.approx(0.75, abs=0.03)


def test_split_chains_cover_the_range_and_go_to_span_ends():
    spans = [srv("a", 0, 5, throughput=2.0), srv("b", 0, 3, throughput=1.0), srv("c", 3, 9, throughput=1.0)]
    routes = split_by_throughput(spans, start_block=1, end_block=8, num_items=200, rng=np.random.default_rng(1))
    assert {tuple(r) for r in routes} == {
        tuple(hops(("a", 1, 5), ("c", 5, 8))),
        tuple(hops(("b", 1, 3), ("c", 3, 8))),
        tuple(hops(("b", 1, 3), ("a", 3, 5), ("c", 5, 8))),
    }
    share_a = sum(r[0].peer_id == "a" for r in routes) / 200
    assert share_a == pytest.approx(2 / 3, abs=0.1)


def test_split_is_reproducible_with_the_same_seed():
    spans = [srv(f"s{i}", i % 4, i % 4 + 4, throughput=float(i + 1)) for i in range(12)]
    spans.append(srv("head", 0, 1))

    def run(seed):
        return split_by_throughput(spans, start_block=0, end_block=7, num_items=50, rng=np.random.default_rng(seed))

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_split_uses_uniform_choice_when_all_hosts_have_zero_throughput():
    spans = [srv("a", 0, 2, throughput=0.0), srv("b", 0, 2, throughput=0.0)]
    routes = split_by_throughput(spans, start_block=0, end_block=2, num_items=1000, rng=np.random.default_rng(2))
    share_a = sum(r[0].peer_id == "a" for r in routes) / 1000
    assert share_a == pytest.approx(0.5, abs=0.06)


def test_split_excludes_banned_and_reports_missing():
    spans = [srv("a", 0, 4, throughput=5.0), srv("b", 0, 4, throughput=1.0), srv("c", 4, 6)]
    routes = split_by_throughput(
        spans, start_block=0, end_block=6, num_items=20, rng=np.random.default_rng(0), banned={"a"}
    )
    assert all(r == hops(("b", 0, 4), ("c", 4, 6)) for r in routes)
    with pytest.raises(NoRouteError) as info:
        split_by_throughput(spans, start_block=0, end_block=6, num_items=1, rng=np.random.default_rng(0), banned={"c"})
    assert info.value.missing == [(4, 6)]


def test_split_edge_cases():
    rng = np.random.default_rng(0)
    assert split_by_throughput([srv("a", 0, 2)], start_block=0, end_block=2, num_items=0, rng=rng) == []
    assert split_by_throughput([], start_block=1, end_block=1, num_items=2, rng=rng) == [[], []]
    with pytest.raises(NoRouteError):
        split_by_throughput([], start_block=0, end_block=1, num_items=1, rng=rng)
    with pytest.raises(ValueError, match="num_items"):
        split_by_throughput([srv("a", 0, 2)], start_block=0, end_block=2, num_items=-1, rng=rng)
