"""benchmarks/bench_swarm_training.py runs end to end (smoke preset): structure and sanity, no speed targets."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.results import load

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def test_swarm_training_bench_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = ROOT / "benchmarks" / "bench_swarm_training.py"
    done = subprocess.run(
        [sys.executable, str(script), "--preset", "smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = load(tmp_path / "swarm_training_smoke.json")
    assert data["preset"] == "smoke" and "--preset smoke" in data["command"]
    png = tmp_path / "swarm_training_smoke.png"
    assert png.stat().st_size > 5_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    setups = data["results"]["setups"]
    assert set(setups) == {"local (transformers, 1 thread)", "swarm, 1 peer/stage", "swarm, 2 peers/stage"}
    for name, setup in setups.items():
        assert 0 < setup["samples_per_s"] < 100_000, name
        assert setup["ratio"] > 0 and not math.isnan(setup["ratio"]), name
        assert setup.get("failed_microbatches", 0) == 0, name
    stages = data["results"]["averaging"]["stages"]
    for name, stage in stages.items():
        if name.startswith("two"):  # two peers per stage really averaged, and never stepped alone
            assert stage["rounds_averaged_with_2"] >= 1 and stage["stepped_alone"] == 0, (name, stage)
