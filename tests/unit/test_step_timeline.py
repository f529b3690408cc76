"""bench_step_timeline's cutting of a step into segments, on a hand-made event log of a client and two servers."""

from __future__ import annotations

import pytest
from benchmarks.bench_step_timeline import _segments, _steps, table

CLIENT, S0, S1 = 1, 10, 11
MS = 1_000_000  # ns


def _step(t0: int, *, s1_second_copy: bool = False) -> list[tuple[int, int, str]]:
    """One decode step starting at t0 (ms): client -> s0 -> push -> s1 -> client."""
    events = [
        (0, CLIENT, "C.step>"), (1, S0, "S.step>"), (2, S0, "S.model>"), (12, S0, "S.model<"),
        (12.5, S0, "S.pack_push>"), (13, S0, "S.pack_push<"), (13.5, S0, "S.pack_answer<"),
        (14, S1, "S.step>"), (15, S1, "S.model>"), (25, S1, "S.model<"), (26, S1, "S.pack_answer<"),
        (28, CLIENT, "C.step<"),
    ]  # fmt: skip
    if s1_second_copy:  # the client's copy reaches s1 while it computes the pushed one: skipped, not the start
        events.append((16, S1, "S.step>"))
    return sorted((int((t0 + at) * MS), pid, name) for at, pid, name in events)


def test_segments_follow_the_critical_path_and_add_up_to_the_step():
    events = _step(0, s1_second_copy=True)
    segments = _segments(events, 0, 28 * MS, [S0, S1])
    assert segments == pytest.approx(
        {
            "client → server 0": 1,
            "server 0: before the model": 1,
            "server 0: model": 10,
            "server 0: after the model": 1,
            "server 0 → server 1": 1,
            "server 1: before the model": 1,
            "server 1: model": 10,
            "server 1: after the model": 1,
            "server 1 → client (step returns)": 2,
            "whole step": 28,
        }  # fmt: skip
    )
    assert sum(v for k, v in segments.items() if k != "whole step") == pytest.approx(segments["whole step"])


def test_the_prefill_and_steps_outside_the_swarms_generations_are_left_out():
    events = sorted(_step(0) + _step(100) + _step(200) + _step(1000))
    steps = _steps(events, client=CLIENT, servers=[S0, S1], windows=[(0, 300 * MS)])
    assert len(steps) == 2  # the first step of the window is the prefill; the step at 1000 ms is outside it
    text = table({"timelines": [dict(label="after", segments=steps[0], swarm_ms_per_token=30.0,
                                     local_ms_per_token=25.0, ratio=1.2)]})  # fmt: skip
    assert "| **whole step** | 28.00 |" in text
    assert "| everything but the servers' model calls | 8.00 |" in text
