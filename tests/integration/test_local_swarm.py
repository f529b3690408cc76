"""LocalSwarm, the test and benchmark harness: it refuses a second bootstrap peer, and stopping it leaves none of
its processes' helpers behind (a server's DHT process leads a process group of its own)."""

from __future__ import annotations

import os

import psutil
import pytest

from corolla.local_swarm import LocalSwarm, wait_for
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_a_second_bootstrap_is_refused_and_stop_takes_every_helper_along(tmp_path):
    with LocalSwarm(model=str(zoo_checkpoint("llama")), spans=["0:6"], log_dir=tmp_path) as swarm:
        with pytest.raises(RuntimeError, match="already has a bootstrap peer"):
            swarm.start_bootstrap()
        server = swarm.processes["server0"]
        helpers = psutil.Process(server.pid).children(recursive=True)
        assert any("p2pd" in h.name() for h in helpers), helpers
        groups = LocalSwarm.process_groups(server.pid)
        daemon_group = next(os.getpgid(h.pid) for h in helpers if "p2pd" in h.name())
        assert daemon_group != server.pid, "p2pd should be in its DHT process's group, away from a terminal's Ctrl-C"
        assert {server.pid, daemon_group} <= groups and {os.getpgid(h.pid) for h in helpers} <= groups, groups
    wait_for(
        lambda: not any(h.is_running() and h.status() != psutil.STATUS_ZOMBIE for h in helpers),
        timeout_s=30,
        what="the server's DHT process and p2pd to exit",
    )
