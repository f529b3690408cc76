"""Pure helpers of benchmarks/exp_heterogeneous.py: the naive equal split, bottlenecks, rates."""

from __future__ import annotations

import pytest
from benchmarks.exp_heterogeneous import PRESETS, binned_rates, bottleneck, naive_spans, naive_tiles, rate


def test_naive_tiles_cut_the_model_into_equal_contiguous_spans():
    assert naive_tiles(30, 10) == [(0, 10), (10, 20), (20, 30)]
    assert naive_tiles(12, 6) == [(0, 6), (6, 12)]
    assert naive_tiles(5, 5) == [(0, 5)]
    assert naive_tiles(4, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_naive_tiles_shift_the_last_tile_when_the_span_length_does_not_divide_the_model():
    assert naive_tiles(30, 12) == [(0, 12), (12, 24), (18, 30)]
    for tile in naive_tiles(31, 8):
        assert tile[1] - tile[0] == 8 and 0 <= tile[0] and tile[1] <= 31


@pytest.mark.parametrize(("layers", "length"), [(30, 0), (30, 31), (0, 1)])
def test_naive_tiles_reject_bad_lengths(layers, length):
    with pytest.raises(ValueError):
        naive_tiles(layers, length)


def test_naive_spans_assign_tiles_round_robin_in_start_order():
    assert naive_spans(30, 10, 5) == [(0, 10), (10, 20), (20, 30), (0, 10), (10, 20)]
    assert naive_spans(12, 6, 3) == [(0, 6), (6, 12), (0, 6)]
    assert naive_spans(12, 6, 0) == []


def test_naive_spans_cover_the_model_once_there_are_enough_servers():
    spans = naive_spans(30, 10, 3)
    assert bottleneck([(s, e, 1.0) for s, e in spans], 30) == 1.0


def test_bottleneck_is_the_weakest_blocks_summed_throughput():
    # the full preset's naive split: fast0 0:10, fast1 10:20, slow0 20:30, slow1 0:10
    spans = [(0, 10, 100.0), (10, 20, 100.0), (20, 30, 10.0), (0, 10, 10.0)]
    assert bottleneck(spans, 30) == 10.0
    # auto's optimum for the same servers: the two slow ones share a tile
    assert bottleneck([(0, 10, 100.0), (10, 20, 100.0), (20, 30, 10.0), (20, 30, 10.0)], 30) == 20.0
    assert bottleneck([(0, 10, 5.0)], 30) == 0.0  # a hole
    assert bottleneck([(25, 40, 5.0), (0, 25, 1.0)], 30) == 1.0  # spans past the model are clipped


def test_rate_counts_completions_inside_the_window():
    done = [(0.5, 100), (1.0, 100), (1.9, 100), (2.0, 100)]
    assert rate(done, 0.0, 2.0) == pytest.approx(150.0)
    assert rate(done, 1.0, 2.0) == pytest.approx(200.0)
    assert rate([], 0.0, 1.0) == 0.0
    with pytest.raises(ValueError):
        rate(done, 1.0, 1.0)


def test_binned_rates_cover_the_run_and_drop_a_short_last_bin():
    done = [(10.0 + 0.5 * i, 64) for i in range(20)]  # 128 tokens/s from t=10 to t=20
    bins = binned_rates(done, 10.0, 20.2, 2.0)
    assert [t for t, _ in bins] == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert all(r == pytest.approx(128.0) for _, r in bins)
    assert len(binned_rates(done, 10.0, 21.5, 2.0)) == 6  # a partial bin of >= half a bin is kept
    with pytest.raises(ValueError):
        binned_rates(done, 0.0, 1.0, 0.0)


def test_presets_are_consistent():
    for preset in PRESETS.values():
        assert set(preset["initial"]) <= set(preset["servers"])
        joined = [p.action[1] for p in preset["phases"] if p.action and p.action[0] == "join"]
        killed = [p.action[1] for p in preset["phases"] if p.action and p.action[0] == "kill"]
        assert set(joined) <= set(preset["servers"]) - set(preset["initial"])
        assert set(killed) <= set(preset["initial"]) | set(joined)
        if isinstance(preset["throughput"], dict):
            assert set(preset["throughput"]) == set(preset["servers"])
        assert preset["throttle_at"] in ("spawn", "online")
