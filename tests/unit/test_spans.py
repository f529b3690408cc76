"""ServerSpan validation and the per-block swarm views (coverage, missing ranges)."""

from __future__ import annotations

import math

import pytest

from corolla.algorithms.spans import ServerSpan, compute_coverage, find_missing_ranges, uncovered_ranges


def span(peer_id: str = "a", start: int = 0, end: int = 4, throughput: float = 1.0, **kwargs) -> ServerSpan:
    return ServerSpan(peer_id=peer_id, start=start, end=end, throughput=throughput, inference_rps=10.0, **kwargs)


def test_valid_span_keeps_fields_and_length():
    s = span(start=2, end=7, throughput=3.5, cache_tokens_left=0, pings={"b": 0.02})
    assert (s.start, s.end, s.length, s.throughput, s.cache_tokens_left) == (2, 7, 5, 3.5, 0)
    assert dict(s.pings) == {"b": 0.02}


def test_pings_are_a_read_only_copy_and_span_is_hashable():
    pings = {"b": 0.1}
    s = span(pings=pings)
    pings["c"] = 0.2
    assert dict(s.pings) == {"b": 0.1}
    with pytest.raises(TypeError):
        s.pings["d"] = 0.3  # type: ignore[index]
    assert hash(s) == hash(span(pings={"b": 0.1}))
    assert s == span(pings={"b": 0.1}) and s != span(pings={"b": 0.2})


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"start": 3, "end": 3}, "start=3, end=3"),
        ({"start": 5, "end": 2}, "start=5, end=2"),
        ({"start": -1, "end": 2}, "start=-1"),
        ({"start": 0.0, "end": 2}, "start=0.0"),
        ({"throughput": -0.5}, "-0.5"),
        ({"throughput": math.nan}, "nan"),
        ({"throughput": math.inf}, "inf"),
        ({"throughput": True}, "True"),
        ({"cache_tokens_left": -3}, "-3"),
        ({"cache_tokens_left": 1.5}, "1.5"),
        ({"pings": {"b": -0.01}}, "-0.01"),
        ({"pings": {"b": math.inf}}, "inf"),
        ({"pings": [("b", 0.1)]}, "list"),
        ({"peer_id": ""}, "peer_id"),
    ],
)
def test_invalid_fields_raise_value_error_naming_the_bad_value(kwargs, needle):
    with pytest.raises(ValueError, match="Invalid ServerSpan") as info:
        span(**kwargs)
    assert needle in str(info.value)


def test_negative_inference_rps_rejected_and_zero_allowed():
    with pytest.raises(ValueError, match="inference_rps"):
        ServerSpan(peer_id="a", start=0, end=1, throughput=1.0, inference_rps=-1.0)
    assert ServerSpan(peer_id="a", start=0, end=1, throughput=0.0, inference_rps=0.0).inference_rps == 0.0


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as info:
        ServerSpan(peer_id="a", start=4, end=1, throughput=-1.0, inference_rps=-2.0)
    message = str(info.value)
    assert "start=4, end=1" in message and "-1.0" in message and "-2.0" in message


def test_coverage_sums_throughputs_per_block_and_clips():
    spans = [span("a", 0, 3, 1.0), span("b", 2, 5, 2.5), span("c", 4, 9, 0.5)]
    assert compute_coverage(spans, 6) == [1.0, 1.0, 3.5, 2.5, 3.0, 0.5]
    assert compute_coverage([span("z", 10, 12)], 6) == [0.0] * 6


def test_coverage_of_empty_swarm_and_zero_blocks():
    assert compute_coverage([], 3) == [0.0, 0.0, 0.0]
    assert compute_coverage([span()], 0) == []


@pytest.mark.parametrize("num_blocks", [-1, 2.0, True])
def test_bad_num_blocks_raise(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        compute_coverage([], num_blocks)
    with pytest.raises(ValueError, match="num_blocks"):
        find_missing_ranges([], num_blocks)


def test_missing_ranges_are_merged_and_sorted():
    spans = [span("a", 2, 4), span("b", 3, 5), span("c", 7, 8)]
    assert find_missing_ranges(spans, 10) == [(0, 2), (5, 7), (8, 10)]


def test_missing_ranges_edge_cases():
    assert find_missing_ranges([], 4) == [(0, 4)]
    assert find_missing_ranges([span("a", 0, 9)], 4) == []
    assert find_missing_ranges([span("a", 0, 2, throughput=0.0), span("b", 2, 4)], 4) == []
    assert find_missing_ranges([], 0) == []


def test_uncovered_ranges_offset():
    assert uncovered_ranges([True, False, False, True, False], offset=10) == [(11, 13), (14, 15)]
