"""The SWARM experiments with real processes run end to end (their smoke presets) and write sane results: training
under churn with rebalancing on and off, and the square-cube law in the network lab (skipped, with the reason, where
the lab cannot run). Structure and sanity only: no speed targets."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.netlab import unavailable_reason
from benchmarks.results import load

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration]


def _run(script: str, out: Path, timeout_s: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--preset", "smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _check_png(path: Path) -> None:
    assert path.stat().st_size > 5_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_header(data: dict, table: str) -> None:
    assert data["preset"] == "smoke" and "--preset smoke" in data["command"]
    assert data["machine"]["cpu_cores"] >= 1 and data["git"]
    assert "- date: " in table and "machine: " in table and "--preset smoke" in table


@pytest.mark.timeout(400)
def test_swarm_churn_smoke(tmp_path):
    _run("exp_swarm_churn.py", tmp_path, timeout_s=380)
    data = load(tmp_path / "swarm_churn_smoke.json")
    _check_header(data, (tmp_path / "swarm_churn_smoke.md").read_text())
    _check_png(tmp_path / "swarm_churn_smoke.png")
    params, results = data["params"], data["results"]
    rows = results["rows"]
    assert [r["policy"] for r in rows] == params["policies"] == ["rebalance", "random stage"]
    assert len({r["seed"] for r in rows}) == 1  # both policies saw the same churn
    # the same churn: the same victims (names without the run's prefix "x<index>"), in the same order
    victims = [[e["name"][2:] for e in r["events"] if e["kind"] == "kill"] for r in rows]
    assert victims[0], "the churn driver killed nobody: the smoke run proved nothing"
    shorter = min(len(v) for v in victims)
    assert victims[0][:shorter] == victims[1][:shorter]
    for r in rows:
        assert sum(r["initial_stage_peers"]) == params["peers"] and min(r["initial_stage_peers"]) >= 1
        assert r["seconds"] >= params["window_s"] > 0
        assert r["samples"] > 0 and 0 < r["samples_per_s"] < 100_000
        assert r["samples"] % params["micro_batch_size"] == 0
        assert r["failed_microbatches"] >= 0 and r["retried_calls"] >= 0
        assert 0 <= r["empty_stage_s"] <= r["seconds"]
        assert r["kills"] == sum(e["kind"] == "kill" for e in r["events"]) >= 1
        assert r["restarts"] <= r["kills"]
        times = [x[0] for x in r["series"]]
        assert times == sorted(times) and r["series"][-1][1] == r["samples"]
        assert all(len(x) == 1 + params["stages"] for x in r["stage_peers"])
        assert not r["crashed"], r["crashed"]
        assert set(r["trainer_bans"]) == {"total", "moving_peer", "nan_answer"}
        assert r["trainer_bans"]["total"] >= r["trainer_bans"]["moving_peer"] + r["trainer_bans"]["nan_answer"]
    # the peers never told to stay put are the only ones that move
    assert rows[1]["moves"] == 0
    for policy, summary in results["summary"].items():
        assert summary["runs"] == 1 and summary["samples_per_s_mean"] > 0, policy


_LAB = unavailable_reason()


@pytest.mark.timeout(400)
@pytest.mark.skipif(_LAB is not None, reason=f"network lab unavailable: {_LAB}")
def test_square_cube_smoke(tmp_path):
    _run("exp_square_cube.py", tmp_path, timeout_s=380)
    data = load(tmp_path / "square_cube_smoke.json")
    _check_header(data, (tmp_path / "square_cube_smoke.md").read_text())
    _check_png(tmp_path / "square_cube_smoke.png")
    rows = data["results"]["rows"]
    assert [r["hidden"] for r in rows] == data["params"]["hiddens"]
    for r in rows:
        for codec in ("none", "uniform_8bit"):
            assert r[f"{codec}_failed_microbatches"] == 0, r
            assert 0 < r[f"{codec}_loopback_sps"] < 100_000 and 0 < r[f"{codec}_lab_sps"] < 100_000
            assert 0 < r[f"{codec}_ratio"] < 2 and not math.isnan(r[f"{codec}_ratio"])
        assert len(r["measurements"]) == 4 * data["params"]["repeats"]
        for m in r["measurements"]:
            assert m["loss_last"] < m["loss_first"] + 1.0  # trains, no divergence
    # bigger blocks (more compute per byte sent): each row moves 16x more compute per micro-batch than the last
    assert rows[-1]["block_parameters"] > rows[0]["block_parameters"]
    checks = data["results"]["checks"]
    shaped = [c for c in checks if c["link"] == "lab"]
    assert shaped and all(abs(c["probe_rtt_ms"] - data["params"]["rtt_ms"]) < 10 for c in shaped)
    assert any("probe_mbit_min" in c for c in shaped)
    assert all(c["probe_rtt_ms"] < 5 for c in checks if c["link"] == "loopback")


def test_square_cube_says_why_without_the_lab(tmp_path, monkeypatch, capsys):
    """Where the lab cannot run, the script exits with status 2 and one line saying why, writing nothing."""
    import benchmarks.exp_square_cube as experiment

    monkeypatch.setattr(experiment, "unavailable_reason", lambda: "the network lab needs root (test)")
    monkeypatch.setattr(sys, "argv", ["exp_square_cube.py", "--preset", "smoke", "--out", str(tmp_path)])
    assert experiment.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: cannot run the network lab here: the network lab needs root (test)"]
    assert not list(tmp_path.iterdir())
