"""benchmarks/exp_swarm_compression.py runs end to end (smoke preset) and writes a sane table, results and plot:
structure and sanity only, no convergence or speed targets. (bench_swarm_training.py's smoke preset is run by
test_swarm_training_bench_smoke.py.)"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.results import load

pytestmark = [pytest.mark.integration, pytest.mark.timeout(330)]

ROOT = Path(__file__).resolve().parents[2]


def test_swarm_compression_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "exp_swarm_compression.py"), "--preset", "smoke", "--out",
         str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "swarm_compression_smoke.md").read_text()
    assert "- date: " in table and "machine: " in table and "--preset smoke" in table
    png = tmp_path / "swarm_compression_smoke.png"
    assert png.stat().st_size > 5_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = load(tmp_path / "swarm_compression_smoke.json")
    assert data["preset"] == "smoke" and "--preset smoke" in data["command"]
    results, steps = data["results"], data["params"]["steps"]
    assert 0 < results["floor"] < math.log(data["params"]["markov_vocab_size"])
    settings = results["settings"]
    assert set(settings) == {
        "local (one process, exact)",
        "1 peer/stage, wire NONE",
        "1 peer/stage, wire 8-bit",
        "2 peers/stage, averaging size_adaptive",
    }
    for name, row in settings.items():
        assert len(row["losses"]) == steps and all(math.isfinite(x) for x in row["losses"]), name
        assert row["failed_microbatches"] == 0, name
        assert row["final_above_floor"] > -0.5, name  # nothing beats the floor by more than sampling noise
        assert row["losses"][-1] < row["losses"][0], name  # it learns something even in a few steps
    # no compression and one peer per stage, synchronous: exactly the training in one process
    assert results["max_diff_vs_local"] < 1e-4
    one = settings["1 peer/stage, wire NONE"]["stages"]
    assert [s["optimizer_steps"] for s in one.values()] == [steps] * len(one)
    for stage in settings["2 peers/stage, averaging size_adaptive"]["stages"].values():
        assert stage["rounds_averaged_with_2"] >= 1 and stage["stepped_alone"] == 0, stage
    sizes = results["bytes"]
    assert 0 < sizes["wire_ratio"] < 0.5  # 8-bit activations and gradients
    assert 0 < sizes["averaging_ratio"]["UNIFORM_8BIT"] < sizes["averaging_ratio"]["size_adaptive"] < 1
