"""Stochastic wiring (algorithms/stage_wiring.py): proportional shares, adaptation, exclusions, determinism."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from corolla.algorithms.stage_wiring import StageWiring, ThroughputEMA, WiringConfig


def test_the_ema_has_no_start_up_bias():
    ema = ThroughputEMA(alpha=0.1)
    assert ema.samples_per_second is None and not ema.measured
    ema.update(seconds=0.5, samples=1)  # a plain EMA from 0 would say 0.05 s per sample after one update
    assert ema.seconds_per_sample == pytest.approx(0.5) and ema.samples_per_second == pytest.approx(2.0)
    for _ in range(50):
        ema.update(seconds=1.0, samples=4)
    assert ema.seconds_per_sample == pytest.approx(0.25, rel=1e-2)
    with pytest.raises(ValueError):
        ema.update(seconds=1.0, samples=0)


def _serve(wiring: StageWiring, speeds: dict[str, float], tasks: int, free: dict | None = None) -> Counter:
    """One trainer keeps the stage busy: each task goes where the wiring says; peers run their calls in order
    (``free``: when each peer is done with its calls so far, carried from one call to the next)."""
    free = free if free is not None else dict.fromkeys(speeds, 0.0)
    shares: Counter = Counter()
    for _ in range(tasks):
        now = min(free.values())  # a call slot frees up
        peer = wiring.choose(1, now=now)
        start = max(now, free[peer])
        free[peer] = start + 1 / speeds[peer]
        wiring.record(peer, 1, 1 / speeds[peer])
        shares[peer] += 1
    return shares


def test_peers_of_speeds_1_2_4_get_work_in_proportion_within_5_percent():
    speeds = {"slow": 1.0, "mid": 2.0, "fast": 4.0}
    wiring = StageWiring(rng=random.Random(0))
    wiring.update_peers(dict.fromkeys(speeds, (None, 0.0)), now=0.0)  # nothing announced: all start equal
    shares = _serve(wiring, speeds, 7000)
    for peer, speed in speeds.items():
        assert shares[peer] / 7000 == pytest.approx(speed / 7, rel=0.05), shares


def test_when_a_peer_gets_twice_as_fast_its_share_follows_within_100_tasks():
    speeds = {"a": 1.0, "b": 1.0}
    wiring = StageWiring(rng=random.Random(0))
    wiring.update_peers(dict.fromkeys(speeds, (1.0, 0.0)), now=0.0)
    free = dict.fromkeys(speeds, 0.0)
    _serve(wiring, speeds, 500, free)
    speeds["b"] = 2.0
    _serve(wiring, speeds, 100, free)  # adapting
    shares = _serve(wiring, speeds, 600, free)
    assert shares["b"] / 600 == pytest.approx(2 / 3, rel=0.05), shares


def test_announced_throughput_and_backlog_steer_the_first_choices():
    wiring = StageWiring(rng=random.Random(0))
    wiring.update_peers({"fast": (10.0, 0.0), "slow": (1.0, 0.0)}, now=0.0)
    assert wiring.choose(1, now=0.0) == "fast"
    wiring.update_peers({"fast": (10.0, 1000.0), "slow": (1.0, 0.0)}, now=0.0)  # other trainers' queue there
    assert wiring.choose(1, now=0.0) == "slow"


def test_a_backward_call_costs_more_than_a_forward_call():
    wiring = StageWiring(WiringConfig(backward_cost=2.5), rng=random.Random(0))
    wiring.update_peers({"a": (1.0, 0.0)}, now=0.0)
    assert wiring.expected_finish("a", 2, now=0.0, backward=True) == pytest.approx(5.0)
    assert wiring.expected_finish("a", 2, now=0.0) == pytest.approx(2.0)


def test_excluded_or_unknown_peers_are_not_chosen_and_failure_frees_the_clock():
    wiring = StageWiring(rng=random.Random(0))
    assert wiring.choose(1, now=0.0) is None
    wiring.update_peers({"a": (1.0, 0.0), "b": (1.0, 0.0)}, now=0.0)
    assert wiring.choose(1, now=0.0, exclude=["a"]) == "b"
    assert wiring.choose(1, now=0.0, exclude=["a", "b"]) is None
    for _ in range(5):
        wiring.choose(1, now=0.0, exclude=["a"])
    assert wiring.expected_finish("b", 1, now=0.0) == pytest.approx(7.0)
    wiring.failed("b", now=1.0)  # its queued work is not coming back
    assert wiring.expected_finish("b", 1, now=1.0) == pytest.approx(2.0)
    wiring.update_peers({"a": (1.0, 0.0)}, now=2.0)  # b's record is gone
    assert wiring.peers == ["a"]


def test_ties_are_broken_by_the_given_random_generator():
    def picks(seed):
        wiring = StageWiring(rng=random.Random(seed))
        wiring.update_peers({name: (1.0, 0.0) for name in "abcdef"}, now=0.0)
        return [wiring.choose(1, now=0.0) for _ in range(12)]

    assert picks(1) == picks(1)
    assert picks(1) != picks(2)
    assert Counter(picks(3)) == Counter({name: 2 for name in "abcdef"})  # every peer gets its turn


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        WiringConfig(ema_alpha=0)
    with pytest.raises(ValueError):
        WiringConfig(backward_cost=-1)


def test_one_slow_first_measurement_does_not_starve_a_peer_past_the_measurement_ttl():
    """Both peers announce 100 samples/s; b's only call so far was a 50x slower warm-up. While that number is
    fresh, bursts of 8 calls all go to a (b would finish one call later than a finishes eight); once it is older
    than measurement_ttl_s, b is judged by its announcement again, gets work, and its next measurement starts a
    fresh average instead of being diluted into the old one."""
    wiring = StageWiring(WiringConfig(measurement_ttl_s=30.0), rng=random.Random(0))
    wiring.update_peers({"a": (100.0, 0.0), "b": (100.0, 0.0)}, now=0.0)
    wiring.record("a", 1, 0.01, now=0.0)
    wiring.record("b", 1, 0.5, now=0.0)

    def burst(now: float) -> Counter:
        return Counter(wiring.choose(1, now=now) for _ in range(8))

    for now in (1.0, 10.0, 29.0):
        assert burst(now) == Counter(a=8), now
        wiring.record("a", 1, 0.01, now=now)
    assert wiring.throughput("b", now=29.0) == pytest.approx(2.0)
    assert wiring.throughput("b", now=31.0) == pytest.approx(100.0)  # stale: the announced 100 samples/s
    assert burst(31.0)["b"] >= 3
    wiring.record("b", 1, 0.01, now=31.0)
    assert wiring.throughput("b", now=31.0) == pytest.approx(100.0)  # a fresh average, not 0.1*100 + 0.9*2
    assert wiring.throughput("b") == pytest.approx(100.0)  # without a time, the measurement is used as is


def test_the_measurement_ttl_must_be_positive():
    with pytest.raises(ValueError, match="measurement_ttl_s"):
        WiringConfig(measurement_ttl_s=0)
