"""The SWARM simulator (algorithms/pipeline_sim.py) drives wiring and rebalancing through churn, deterministically.

Setup as in the reference experiment: 4 stages of 3 peers of speeds 1, 1 and 2.5 (forward samples/s), 48
micro-batches in flight, an hour simulated; a peer that dies comes back as a new peer after 60 s. Without
rebalancing it then serves a random stage (a volunteer picking one); with it, the stage ``choose_stage_for_joiner``
names. Numbers are means over 5 seeds.
"""

from __future__ import annotations

import statistics

import pytest

from corolla.algorithms.pipeline_sim import SimConfig, simulate

SEEDS = range(5)


def _mean_throughput(**kwargs) -> float:
    return statistics.mean(simulate(SimConfig(seed=seed, **kwargs)).throughput for seed in SEEDS)


def test_the_same_config_gives_the_same_run():
    config = SimConfig(mean_lifetime_s=300, rebalance=True, horizon_s=600, seed=3)
    first, second = simulate(config), simulate(config)
    assert first == second
    assert simulate(SimConfig(mean_lifetime_s=300, rebalance=True, horizon_s=600, seed=4)) != first


def test_throughput_aware_wiring_reaches_the_bottleneck_capacity_and_beats_uniform_choice():
    capacity = (1 + 1 + 2.5) / (1 + 2.5)  # micro-batches/s: a stage's forward + backward work per micro-batch
    wiring = _mean_throughput(horizon_s=1200)
    assert wiring == pytest.approx(capacity, rel=0.02)
    assert wiring > 1.3 * _mean_throughput(routing="random", horizon_s=1200)


def test_shares_follow_speeds_1_2_4_within_5_percent():
    result = simulate(SimConfig(speeds=((1.0, 2.0, 4.0),), in_flight=8, backward_cost=1.0, horizon_s=2000))
    total = sum(result.calls_per_peer.values())
    assert total >= 7000
    for peer, speed in zip(("p0", "p1", "p2"), (1, 2, 4)):
        assert result.calls_per_peer[peer] / total == pytest.approx(speed / 7, rel=0.05)


@pytest.mark.parametrize("rebalance", [False, True])
def test_no_micro_batch_is_lost_or_counted_twice_under_random_kills(rebalance):
    for seed in SEEDS:
        result = simulate(SimConfig(mean_lifetime_s=200, rebalance=rebalance, seed=seed))
        assert result.deaths > 20 and result.retries > 0
        in_flight = result.started - result.completed - result.failed
        assert 0 <= in_flight <= 48  # every micro-batch finished, was reported failed, or was still running
        # each completed micro-batch: one accepted forward and one accepted backward per stage, no more
        assert set(result.completions.values()) == {1}
        backward_done = {(mb, stage) for (mb, stage, kind) in result.completions if kind == "backward"}
        assert set(result.stage_accumulations) == backward_done
        assert set(result.stage_accumulations.values()) == {1}  # no stage accumulated a micro-batch twice


def test_rebalancing_raises_throughput_at_least_1_3x_when_peers_live_600_s():
    with_rebalancing = _mean_throughput(mean_lifetime_s=600, rebalance=True)
    without = _mean_throughput(mean_lifetime_s=600)
    assert with_rebalancing >= 1.3 * without, (with_rebalancing, without)


def test_rebalancing_costs_at_most_5_percent_without_churn():
    assert _mean_throughput(rebalance=True, horizon_s=1200) >= 0.95 * _mean_throughput(horizon_s=1200)


def test_moves_never_empty_a_stage_and_rebalancing_refills_empty_stages():
    empty_with, empty_without = [], []
    for seed in SEEDS:
        result = simulate(SimConfig(mean_lifetime_s=600, rebalance=True, seed=seed))
        assert result.moves and result.min_peers_left_by_a_move >= 1
        empty_with.append(result.empty_stage_seconds)
        empty_without.append(simulate(SimConfig(mean_lifetime_s=600, seed=seed)).empty_stage_seconds)
    # stages empty only when all their peers die before a joiner or a move refills them
    assert statistics.mean(empty_with) < 0.1 * statistics.mean(empty_without)


def test_at_most_one_move_per_stage_per_period():
    config = SimConfig(mean_lifetime_s=300, rebalance=True, seed=1)
    result = simulate(config)
    by_stage: dict[int, list[float]] = {}
    for time, _, from_stage, _ in result.moves:
        by_stage.setdefault(from_stage, []).append(time)
    for times in by_stage.values():
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(gap >= config.rebalance_period_s for gap in gaps), times


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="routing"):
        SimConfig(routing="fastest")
    with pytest.raises(ValueError, match="rejoin"):
        SimConfig(rejoin="anywhere")
