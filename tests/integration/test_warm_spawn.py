"""corolla.warm_spawn: a child forked from the warm helper behaves like ``python -m corolla.cli.main ARGS`` started
by subprocess: output, exit codes (negative for a signal), its own process group, its environment; and nothing is left
running when the caller closes the helper. (Every LocalSwarm of the suite runs through it: COROLLA_WARM_SPAWN=1.)"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from corolla.local_swarm import wait_for
from corolla.warm_spawn import WarmSpawner, shared_spawner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LIGHT = ("corolla.cli.main", "corolla.cli.dht_cmd")  # enough for these commands; the suite's helper preloads more


@pytest.fixture(scope="module")
def spawner():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COROLLA_LOGLEVEL="WARNING")
    spawner = WarmSpawner(env, preload=LIGHT)
    yield spawner
    spawner.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_output_and_exit_codes_are_those_of_the_command(spawner, tmp_path):
    helped = spawner.spawn(["--help"], stdout=subprocess.PIPE, text=True)
    assert "`corolla COMMAND --help`" in helped.stdout.read()
    assert helped.wait(timeout=30) == 0

    log = tmp_path / "err.log"
    with open(log, "wb") as stderr:
        wrong = spawner.spawn(["dht", "--no-such-flag"], stdout=subprocess.DEVNULL, stderr=stderr)
    assert wrong.wait(timeout=30) == 2
    assert "--no-such-flag" in log.read_text()
    assert wrong.poll() == 2 and wrong.returncode == 2


def test_a_peer_runs_in_its_own_group_with_its_environment_and_stops_on_signals(spawner, tmp_path):
    with open(tmp_path / "dht.log", "wb") as stderr:
        peer = spawner.spawn(["dht"], stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert "--initial-peers" in peer.stdout.readline() + peer.stdout.readline()
        assert os.getpgid(peer.pid) == peer.pid and os.getsid(peer.pid) == peer.pid
        assert peer.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            peer.wait(timeout=0.3)
        peer.terminate()
        assert peer.wait(timeout=30) in (0, -signal.SIGTERM)
        # the helper's environment, also what was read as the libraries were imported: no INFO lines (cold, `corolla
        # dht` logs "DHT peer ... ready")
        assert " INFO [corolla" not in (tmp_path / "dht.log").read_text()
    finally:
        peer.kill()

    frozen = spawner.spawn(["dht"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    frozen.send_signal(signal.SIGSTOP)
    frozen.kill()
    assert frozen.wait(timeout=30) == -signal.SIGKILL


def test_closing_the_helper_stops_its_running_children(tmp_path):
    spawner = WarmSpawner(dict(os.environ, OMP_NUM_THREADS="1"), preload=LIGHT)
    try:
        peer = spawner.spawn(["dht"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert "--initial-peers" in peer.stdout.readline() + peer.stdout.readline()
        assert spawner.running == 1
    finally:
        spawner.close()
    wait_for(lambda: not _alive(peer.pid), timeout_s=20, what="the child to be killed with its helper")


def test_one_shared_helper_per_environment(monkeypatch):
    """Variables that libraries read at import time are the helper's: another environment gets another helper;
    pytest's PYTEST_CURRENT_TEST, which changes with every test, does not count."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COROLLA_LOGLEVEL="WARNING")
    first = shared_spawner(dict(env, PYTEST_CURRENT_TEST="a"))
    assert shared_spawner(dict(env, PYTEST_CURRENT_TEST="b")) is first
    assert "PYTEST_CURRENT_TEST" not in first.env


def test_a_helper_that_cannot_start_says_why():
    with pytest.raises(RuntimeError, match="no_such_module_here"):
        WarmSpawner(dict(os.environ), preload=("no_such_module_here",))
