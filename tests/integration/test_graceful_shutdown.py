"""A server stopped with Ctrl-C or SIGTERM announces itself OFFLINE, takes its helpers along and exits with 0; one
whose p2pd died under it still exits instead of hanging."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from corolla.local_swarm import LocalSwarm, wait_for
from corolla.models.checkpoint import default_dht_prefix
from corolla.net.dht_process import client_dht
from corolla.net.dht_records import fetch_block_records
from corolla.protocol.server_info import ServerState
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

EXIT_TIMEOUT_S = 30


def _helpers(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _p2pd(helpers: list[psutil.Process]) -> psutil.Process:
    (daemon,) = [h for h in helpers if "p2pd" in h.name()]
    return daemon


def _gone(helpers: list[psutil.Process]) -> bool:
    return not any(h.is_running() and h.status() != psutil.STATUS_ZOMBIE for h in helpers)


def _state_seen_by_the_swarm(swarm: LocalSwarm, model: str, peer_id: str) -> ServerState | None:
    dht = client_dht(swarm.initial_peers)
    try:
        (records,) = fetch_block_records(dht, dht_prefix=default_dht_prefix(model), num_blocks=1, blocks=[0])
    finally:
        dht.shutdown()
    return next((info.state for peer, info in records.items() if peer.to_base58() == peer_id), None)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_stopped_server_announces_offline_and_exits_cleanly(how, tmp_path):
    model = str(zoo_checkpoint("llama"))
    with LocalSwarm(model=model, spans=["0:6"], log_dir=tmp_path) as swarm:
        server, peer_id = swarm.processes["server0"], swarm.peer_ids["server0"]
        helpers = _helpers(server.pid)
        _p2pd(helpers)  # the server's DHT process runs one
        if how == "ctrl-c":  # a terminal signals its whole foreground process group, which the server leads
            os.killpg(server.pid, signal.SIGINT)
        else:
            server.terminate()
        assert server.wait(timeout=EXIT_TIMEOUT_S) == 0
        wait_for(lambda: _gone(helpers), timeout_s=EXIT_TIMEOUT_S, what="the DHT process and p2pd to exit")

        log = (tmp_path / "server0.log").read_text()
        assert "Stopped" in log and "Traceback" not in log and "Shutdown step" not in log, log
        # the bootstrap peer keeps the last record: clients see at once that the server is gone
        assert _state_seen_by_the_swarm(swarm, model, peer_id) == ServerState.OFFLINE


def test_a_server_whose_p2pd_died_still_stops(tmp_path):
    """p2pd killed under a server (e.g. by the OOM killer): Ctrl-C must still end the process, not hang it."""
    model = str(zoo_checkpoint("llama"))
    with LocalSwarm(model=model, spans=["0:6"], log_dir=tmp_path) as swarm:
        server = swarm.processes["server0"]
        helpers = _helpers(server.pid)
        daemon = _p2pd(helpers)
        daemon.kill()
        daemon.wait(timeout=EXIT_TIMEOUT_S)
        os.killpg(server.pid, signal.SIGINT)
        assert server.wait(timeout=EXIT_TIMEOUT_S) == 0
        wait_for(lambda: _gone(helpers), timeout_s=EXIT_TIMEOUT_S, what="the DHT process to exit")
        log = (tmp_path / "server0.log").read_text()
        # (hivemind's DHT process may still log tracebacks of its own about the lost daemon)
        assert "Shutdown step 'announce OFFLINE' failed" in log and "Stopped" in log, log
