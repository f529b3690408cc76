"""benchmarks/bench_span_loading.py runs end to end (smoke preset, tiny shapes): structure and sanity, no targets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.results import load

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def test_span_loading_bench_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = ROOT / "benchmarks" / "bench_span_loading.py"
    done = subprocess.run(
        [sys.executable, str(script), "--preset", "smoke", "--out", str(tmp_path), "--dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = load(tmp_path / "span_loading_smoke.json")
    assert data["preset"] == "smoke" and "--preset smoke" in data["command"]
    r = data["results"]
    assert len(r["rounds"]) == 1 and r["span_bytes"] > 0
    assert r["disk_gbps"] > 0 and r["load_gbps"] > 0 and r["memory_gbps"] > 0
    # the worker read about the span's bytes: never whole shards (headers and page rounding aside)
    assert r["read_over_span"] < r["whole_shards_over_span"]
    assert not list(tmp_path.glob("corolla-span-loading-*/checkpoint")), "the checkpoint was not deleted"
    png = tmp_path / "span_loading_smoke.png"
    assert png.stat().st_size > 5_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
