"""SWARM stage rebalancing (algorithms/stage_balance.py), including adversarial layouts."""

from __future__ import annotations

import itertools
import random

import pytest

from corolla.algorithms.stage_balance import (
    StagePeer,
    choose_move,
    choose_stage_for_joiner,
    pipeline_throughput,
    stage_capacities,
)


def _peers(layout: dict[int, list[float]]) -> list[StagePeer]:
    names = itertools.count()
    return [StagePeer(f"p{next(names):02d}", stage, t) for stage, speeds in layout.items() for t in speeds]


def test_capacity_and_pipeline_throughput():
    peers = _peers({0: [1, 2], 1: [4], 2: [0.5, 0.5]})
    assert stage_capacities(peers, 3) == [3, 4, 1]
    assert pipeline_throughput(peers, 3) == 1
    assert pipeline_throughput(peers, 4) == 0  # stage 3 has nobody
    with pytest.raises(ValueError, match="outside"):
        stage_capacities([StagePeer("x", 5, 1.0)], 3)


def test_a_peer_of_an_over_provisioned_stage_moves_to_the_bottleneck():
    peers = _peers({0: [1, 1, 1], 1: [1]})
    move = choose_move(peers, 2)
    assert move is not None and (move.from_stage, move.to_stage) == (0, 1)
    assert (move.throughput_before, move.throughput_after) == (1, 2)


def test_no_move_below_the_gain_threshold_and_none_in_a_balanced_swarm():
    assert choose_move(_peers({0: [1, 1], 1: [1, 1]}), 2) is None
    peers = _peers({0: [1.0, 1.05], 1: [1.0]})  # moving makes stage 0 the bottleneck at 1.0: no gain
    assert choose_move(peers, 2) is None
    peers = _peers({0: [1, 1, 1], 1: [1, 1.5]})  # capacities 3, 2.5; a move gives 2, 3.5: the minimum falls
    assert choose_move(peers, 2, min_gain=0.1) is None


def test_the_last_peer_of_a_stage_never_moves_even_for_a_large_gain():
    peers = _peers({0: [100], 1: [1]})
    assert choose_move(peers, 2) is None
    peers = _peers({0: [100], 1: [1], 2: [3, 3]})
    move = choose_move(peers, 3)
    assert move is not None and move.from_stage == 2 and move.to_stage == 1


def test_an_empty_stage_is_refilled_first_from_the_stage_that_keeps_the_most():
    peers = _peers({0: [1, 1], 1: [5, 5, 5], 2: []})
    move = choose_move(peers, 3, min_gain=100)  # refilling ignores the threshold
    assert move is not None and move.to_stage == 2 and move.from_stage == 1
    peers = _peers({0: [1], 1: [1], 2: []})  # nobody can be spared: no move, a joiner must fill it
    assert choose_move(peers, 3) is None
    assert choose_stage_for_joiner(peers, 3) == 2


def test_the_slowest_peer_moves_when_the_gain_is_the_same_and_ties_go_to_the_lowest_id():
    peers = [StagePeer("b", 0, 3.0), StagePeer("a", 0, 3.0), StagePeer("c", 0, 9.0), StagePeer("d", 1, 1.0)]
    move = choose_move(peers, 2)
    assert move is not None and move.peer_id == "c"  # the largest gain: 1 -> min(6, 10) = 6
    peers = [StagePeer("b", 0, 2.0), StagePeer("a", 0, 2.0), StagePeer("c", 0, 2.0), StagePeer("d", 1, 1.0)]
    assert choose_move(peers, 2).peer_id == "a"


def test_every_peer_computes_the_same_move_whatever_the_order_of_the_records():
    rng = random.Random(0)
    for _ in range(200):
        layout = {s: [rng.choice([0.5, 1, 2, 4]) for _ in range(rng.randint(0, 4))] for s in range(4)}
        peers = _peers(layout)
        first = choose_move(peers, 4)
        for _ in range(3):
            rng.shuffle(peers)
            assert choose_move(peers, 4) == first


def test_a_move_never_empties_a_stage_and_never_lowers_the_pipeline_on_random_layouts():
    rng = random.Random(1)
    for _ in range(500):
        layout = {s: [rng.choice([0.5, 1, 2, 4]) for _ in range(rng.randint(1, 4))] for s in range(3)}
        peers = _peers(layout)
        move = choose_move(peers, 3, min_gain=0.0)
        if move is None:
            continue
        after = [
            StagePeer(p.peer_id, move.to_stage if p.peer_id == move.peer_id else p.stage, p.throughput) for p in peers
        ]
        assert all(any(p.stage == s for p in after) for s in range(3))
        assert pipeline_throughput(after, 3) >= pipeline_throughput(peers, 3)
        assert move.throughput_after == pytest.approx(pipeline_throughput(after, 3))


def test_stage_costs_scale_a_peer_s_throughput_at_its_new_stage():
    peers = _peers({0: [2, 2], 1: [1]})
    move = choose_move(peers, 2, costs=[1.0, 2.0])  # stage 1 costs twice as much per sample
    assert move is not None and move.throughput_after == pytest.approx(2.0)  # min(2, 1 + 2 * 1/2)
    with pytest.raises(ValueError, match="costs"):
        choose_move(peers, 2, costs=[1.0])


def test_peers_on_their_way_count_at_their_destination_and_are_not_moved_again():
    peers = _peers({0: [1, 1, 1, 1], 1: [1]})
    first = choose_move(peers, 2)
    assert first is not None
    second = choose_move(peers, 2, moving={first.peer_id: first.to_stage})
    assert second is None or second.peer_id != first.peer_id  # 3 vs 2: no further gain of 10 %
    assert second is None


def test_a_stage_that_just_gave_a_peer_gives_no_other_within_the_period():
    peers = _peers({0: [1, 1, 1, 1, 1, 1], 1: [1]})
    assert choose_move(peers, 2, cooling={0}) is None
    peers = _peers({0: [1, 1], 1: [5, 5], 2: []})
    assert choose_move(peers, 3, cooling={0, 1}) is not None  # an empty stage is refilled anyway


def test_a_joiner_takes_the_emptiest_or_weakest_stage():
    assert choose_stage_for_joiner(_peers({0: [1], 1: [3], 2: [0.5]}), 3) == 2
    assert choose_stage_for_joiner(_peers({0: [1], 1: [1]}), 3) == 2
    assert choose_stage_for_joiner(_peers({0: [1], 1: [1]}), 2) == 0


def test_a_peer_that_was_told_its_stage_counts_but_never_moves():
    fixed = [StagePeer("a", 0, 5.0, movable=False), StagePeer("b", 0, 5.0, movable=False), StagePeer("c", 1, 1.0)]
    assert choose_move(fixed, 2) is None  # only a and b could help stage 1, and neither may move
    assert choose_move([*fixed, StagePeer("d", 0, 4.0)], 2).peer_id == "d"
    emptied = [StagePeer("a", 0, 5.0, movable=False), StagePeer("b", 0, 1.0)]
    move = choose_move(emptied, 2)  # refilling the empty stage 1 takes the movable peer even if it is slower
    assert (move.peer_id, move.to_stage) == ("b", 1)
