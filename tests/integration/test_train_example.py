"""The SWARM training example, shortened: it trains on Python's help text through its own local swarm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_swarm.py"


def test_short_swarm_training_run(smollm2_path, tmp_path):
    command = [sys.executable, str(EXAMPLE), "--steps", "6", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage peers online" in done.stdout and "plot:" in done.stdout
    steps = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(6)) and all(s["failed_microbatches"] == 0 for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"], f"the loss did not fall: {[s['loss'] for s in steps]}"
    assert (tmp_path / "loss.png").stat().st_size > 10_000
