"""The fine-tuning example, shortened: it trains SmolLM2 through its own local swarm and its loss falls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

EXAMPLE = Path(__file__).parents[2] / "examples" / "finetune_smollm2.py"


def test_short_prompt_tuning_run(smollm2_path, tmp_path):
    command = [sys.executable, str(EXAMPLE), "--steps", "8", "--eval-size", "32", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out accuracy" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    losses = results["losses"]
    assert len(losses) == 8 and all(loss > 0 for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2, f"the loss did not fall: {losses}"
    assert (tmp_path / "loss.png").stat().st_size > 10_000
