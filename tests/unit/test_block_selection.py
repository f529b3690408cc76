"""Block selection: Petals' window rule, best spans, swarm settling and the rebalancing decision."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from corolla.algorithms.block_selection import (
    choose_best_span,
    choose_best_start,
    settle_swarm,
    should_choose_other_blocks,
)
from corolla.algorithms.spans import ServerSpan, compute_coverage


def srv(peer_id: str, start: int, end: int, throughput: float = 1.0) -> ServerSpan:
    return ServerSpan(peer_id=peer_id, start=start, end=end, throughput=throughput, inference_rps=10.0)


def bottleneck(spans, num_blocks: int) -> float:
    return min(compute_coverage(spans, num_blocks))


def random_swarm(rng: np.random.Generator, num_servers: int, num_blocks: int) -> list[ServerSpan]:
    spans = []
    for i in range(num_servers):
        length = int(rng.integers(1, num_blocks + 1))
        start = int(rng.integers(0, num_blocks - length + 1))
        throughput = float(rng.choice([0.0, 0.1, 1.0, 2.0, 0.3, rng.uniform(0.0, 10.0)]))
        spans.append(srv(f"p{i:02d}", start, start + length, throughput))
    return spans


def moved(span: ServerSpan, start: int) -> ServerSpan:
    return dataclasses.replace(span, start=start, end=start + span.length)


# ---------------------------------------------------------------------------------------------------------------
# choose_best_start
# ---------------------------------------------------------------------------------------------------------------


def test_best_start_takes_the_lexicographically_weakest_window():
    # Windows of 2, sorted: (1, 5), (1, 2), (1, 2), (1, 9); (1, 2) is smallest, first at start 1.
    assert choose_best_start([5.0, 1.0, 2.0, 1.0, 9.0], 2) == 1
    assert choose_best_start([5.0, 1.0, 3.0, 1.0, 2.0], 2) == 3


def test_hole_is_filled_first():
    assert choose_best_start([0.5, 0.5, 3.0, 0.0, 8.0, 8.0], 2) in (2, 3)
    assert choose_best_start([0.5, 0.5, 3.0, 0.0, 8.0, 8.0], 2) == 2  # (0, 3) < (0, 8)
    assert choose_best_start([1.0, 1.0, 1.0, 1.0, 0.0], 3) == 2


def test_ties_go_to_the_lowest_start():
    assert choose_best_start([1.0, 1.0, 1.0, 1.0], 2) == 0
    assert choose_best_start([2.0, 1.0, 2.0, 1.0, 2.0], 1) == 1


def test_window_as_long_as_the_model():
    assert choose_best_start([3.0, 0.0, 1.0], 3) == 0


@pytest.mark.parametrize(("coverage", "k"), [([1.0, 2.0], 0), ([1.0, 2.0], 3), ([], 1), ([1.0, -1.0], 1)])
def test_best_start_rejects_bad_input(coverage, k):
    with pytest.raises(ValueError):
        choose_best_start(coverage, k)


# ---------------------------------------------------------------------------------------------------------------
# choose_best_span
# ---------------------------------------------------------------------------------------------------------------


def test_new_server_fills_the_hole():
    others = [srv("a", 0, 4), srv("b", 6, 10)]
    assert choose_best_span(others, 10, 3, own_throughput=1.0) in {(3, 6), (4, 7)}
    assert choose_best_span(others, 10, 2, own_throughput=1.0) == (4, 6)


def test_empty_swarm_starts_at_block_zero():
    assert choose_best_span([], 8, 3, own_throughput=2.0) == (0, 3)


def test_zero_throughput_server_follows_petals_rule():
    others = [srv("a", 0, 3, 5.0), srv("b", 3, 6, 1.0)]
    coverage = compute_coverage(others, 6)
    start = choose_best_start(coverage, 2)
    assert choose_best_span(others, 6, 2, own_throughput=0.0) == (start, start + 2)


def test_heterogeneous_throughputs_send_the_server_to_the_weakest_blocks():
    others = [srv("a", 0, 4, 10.0), srv("b", 4, 8, 1.0), srv("c", 8, 12, 4.0)]
    assert choose_best_span(others, 12, 4, own_throughput=5.0) == (4, 8)


def test_best_span_covers_both_holes_to_lift_the_bottleneck():
    # Window 1-2 covers both holes and lifts the bottleneck to 1.0; windows 0-1 and 2-3 leave one hole at 0.
    others = [srv("a", 0, 1, 3.0), srv("b", 1, 2, 0.0), srv("c", 3, 4, 1.0)]
    coverage = compute_coverage(others, 4)
    assert coverage == [3.0, 0.0, 0.0, 1.0]
    start, end = choose_best_span(others, 4, 2, own_throughput=1.0)
    assert (start, end) == (1, 3)
    assert bottleneck([*others, srv("me", start, end, 1.0)], 4) == 1.0


def test_best_span_rejects_bad_input():
    with pytest.raises(ValueError):
        choose_best_span([], 4, 5, own_throughput=1.0)
    with pytest.raises(ValueError):
        choose_best_span([], 4, 2, own_throughput=-1.0)


@pytest.mark.parametrize("seed", range(30))
def test_chosen_span_never_lowers_the_bottleneck(seed):
    rng = np.random.default_rng(seed)
    num_blocks = int(rng.integers(1, 20))
    others = random_swarm(rng, int(rng.integers(0, 10)), num_blocks)
    length = int(rng.integers(1, num_blocks + 1))
    throughput = float(rng.uniform(0.0, 5.0))
    start, end = choose_best_span(others, num_blocks, length, own_throughput=throughput)
    chosen = bottleneck([*others, srv("me", start, end, throughput)], num_blocks)
    for other in range(num_blocks - length + 1):
        assert chosen >= bottleneck([*others, srv("me", other, other + length, throughput)], num_blocks) - 1e-9


# ---------------------------------------------------------------------------------------------------------------
# settle_swarm
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(30))
def test_local_search_terminates_at_a_fixed_point_without_lowering_the_bottleneck(seed):
    rng = np.random.default_rng(100 + seed)
    num_blocks = int(rng.integers(1, 24))
    spans = random_swarm(rng, int(rng.integers(1, 14)), num_blocks)
    result = settle_swarm(spans, num_blocks, max_rounds=50)
    assert result.converged and result.rounds <= 50
    assert [(s.peer_id, s.length, s.throughput) for s in result.spans] == [
        (s.peer_id, s.length, s.throughput) for s in spans
    ]
    assert bottleneck(result.spans, num_blocks) >= bottleneck(spans, num_blocks) - 1e-9
    again = settle_swarm(result.spans, num_blocks)
    assert again.spans == result.spans and again.moves == 0 and again.rounds == 1


def test_settle_is_deterministic_and_order_independent_for_distinct_peers():
    rng = np.random.default_rng(5)
    spans = random_swarm(rng, 12, 16)
    first = settle_swarm(spans, 16)
    by_peer = {s.peer_id: s for s in settle_swarm(list(reversed(spans)), 16).spans}
    assert [by_peer[s.peer_id] for s in first.spans] == list(first.spans)


def test_settle_clips_spans_to_the_model():
    result = settle_swarm([srv("a", 0, 10), srv("b", 12, 14)], 8)
    assert result.spans == (srv("a", 0, 8),)


def test_settle_cap_reports_not_converged():
    spans = [srv("a", 0, 2), srv("b", 0, 2), srv("c", 0, 2)]
    result = settle_swarm(spans, 6, max_rounds=1)
    assert result.rounds == 1 and result.moves > 0 and not result.converged
    with pytest.raises(ValueError, match="max_rounds"):
        settle_swarm(spans, 6, max_rounds=0)


# ---------------------------------------------------------------------------------------------------------------
# should_choose_other_blocks
# ---------------------------------------------------------------------------------------------------------------


def test_server_moves_into_a_hole_when_it_is_not_the_only_host():
    spans = [srv("a", 0, 4), srv("b", 0, 4)]
    assert bottleneck(spans, 8) == 0.0
    assert should_choose_other_blocks(spans[0], spans, 8)


def test_server_does_not_move_when_it_would_leave_its_blocks_unhosted():
    spans = [srv("a", 0, 4), srv("b", 4, 6)]  # blocks 6-8 are a hole, but "a" is the only host of 0-4
    assert not should_choose_other_blocks(spans[0], spans, 8)


def test_balanced_enough_swarm_does_not_move():
    # Coverage (7, 7, 3, 3): bottleneck 3; with "a" on blocks 2-3 it is (5, 5, 5, 5) -> quality 3 / 5 = 0.6.
    spans = [srv("a", 0, 2, 2.0), srv("b", 0, 2, 2.0), srv("c", 0, 4, 3.0), srv("d", 2, 4, 0.0)]
    assert bottleneck(spans, 4) == 3.0
    assert not should_choose_other_blocks(spans[0], spans, 4, balance_quality=0.55)
    assert should_choose_other_blocks(spans[0], spans, 4, balance_quality=0.65)


def test_own_may_be_missing_from_spans_and_its_announcement_is_replaced():
    spans = [srv("a", 0, 4), srv("b", 0, 4)]
    stale_own = srv("a", 4, 8)
    assert should_choose_other_blocks(spans[0], spans[1:], 8)
    assert should_choose_other_blocks(spans[0], [stale_own, spans[1]], 8)


@pytest.mark.parametrize("seed", range(20))
def test_swarm_at_its_optimum_never_moves(seed):
    rng = np.random.default_rng(200 + seed)
    num_blocks = int(rng.integers(1, 20))
    spans = list(settle_swarm(random_swarm(rng, int(rng.integers(1, 12)), num_blocks), num_blocks).spans)
    for own in spans:
        assert not should_choose_other_blocks(own, spans, num_blocks, balance_quality=1.5)


def test_no_oscillation_when_servers_follow_the_advice():
    rng = np.random.default_rng(9)
    num_blocks = 12
    spans = random_swarm(rng, 10, num_blocks)
    for _ in range(30):
        movers = 0
        for i, own in enumerate(spans):
            if should_choose_other_blocks(own, spans, num_blocks, balance_quality=0.95):
                others = spans[:i] + spans[i + 1 :]
                start, _ = choose_best_span(others, num_blocks, own.length, own_throughput=own.throughput)
                spans[i] = moved(own, start)
                movers += 1
                assert not should_choose_other_blocks(spans[i], spans, num_blocks, balance_quality=0.95)
        if movers == 0:
            break
    else:
        pytest.fail("servers kept moving")


def test_should_choose_rejects_bad_input():
    own = srv("a", 0, 4)
    with pytest.raises(ValueError, match="balance_quality"):
        should_choose_other_blocks(own, [], 8, balance_quality=0.0)
    with pytest.raises(ValueError, match="balance_quality"):
        should_choose_other_blocks(own, [], 8, balance_quality=float("inf"))
    with pytest.raises(ValueError, match="does not fit"):
        should_choose_other_blocks(own, [], 3)
