"""RTT tracking (pure parts of net/ping.py)."""

from __future__ import annotations

import pytest

from corolla.net.ping import RttTracker


def test_rtt_tracker_averages_and_orders():
    tracker = RttTracker(alpha=0.5)
    tracker.update({"b": 0.2, "a": 0.4})
    tracker.update({"a": 0.2})
    assert tracker.rtts == pytest.approx({"a": 0.3, "b": 0.2})
    assert list(tracker.snapshot()) == ["b", "a"]
    assert list(tracker.snapshot(limit=1)) == ["b"]


def test_rtt_tracker_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        RttTracker(alpha=0)
