"""benchmarks/exp_heterogeneous.py runs end to end (smoke preset) and writes a sane table, JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]


def test_heterogeneous_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = ROOT / "benchmarks" / "exp_heterogeneous.py"
    logs = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, str(script), "--preset", "smoke", "--out", str(tmp_path), "--log-dir", str(logs)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    table = (tmp_path / "heterogeneous_smoke.md").read_text()
    assert "- date: " in table and "- machine: " in table and "--preset smoke" in table and "- throttle: " in table
    png = tmp_path / "heterogeneous_smoke.png"
    assert png.stat().st_size > 5_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((tmp_path / "heterogeneous_smoke.json").read_text())
    results = data["results"]
    assert set(results) == {"auto", "naive"}
    for strategy, res in results.items():
        assert res["throttle"] in ("cgroup-v2", "cgroup-v1", "sigstop")
        assert res["forward_passes"] > 0 and res["timeline"], strategy
        (phase,) = res["phases"]
        assert 1 < phase["tokens_per_s"] < 1_000_000, phase
        spans = phase["spans"]
        assert set(spans) == {"fast0", "slow0", "slow1"}, spans
        covered = {b for start, end, _ in spans.values() for b in range(start, end)}
        assert covered == set(range(12)), spans  # every block of the 12-layer model is served
        assert all(end - start == 6 for start, end, _ in spans.values())
    # the naive split ignores speeds: server i gets tile i mod 2
    naive = results["naive"]["phases"][0]["spans"]
    assert naive["fast0"][:2] == [0, 6] and naive["slow0"][:2] == [6, 12] and naive["slow1"][:2] == [0, 6]
    # every covering placement of these servers is at least as good as the naive one (placements, not timings)
    auto_phase, naive_phase = results["auto"]["phases"][0], results["naive"]["phases"][0]
    assert auto_phase["announced_bottleneck"] >= naive_phase["announced_bottleneck"]
