"""A process that runs a corolla DHT leaves nothing behind when it is killed (no orphaned DHT process or p2pd)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from corolla.local_swarm import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SCRIPT = """
import sys, time
from hivemind.utils.crypto import RSAPrivateKey
from corolla.net.dht_process import ParentBoundDHT
from corolla.net.identity import swarm_validators
dht = ParentBoundDHT(start=True, record_validators=swarm_validators(RSAPrivateKey()))
print("ready", flush=True)
time.sleep(600)
"""


def test_killed_owner_takes_its_dht_and_p2pd_along():
    owner = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        assert owner.stdout.readline().strip() == "ready"
        helpers = psutil.Process(owner.pid).children(recursive=True)
        assert any("p2pd" in " ".join(h.cmdline()) for h in helpers), "expected a p2pd among the helpers"
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        wait_for(lambda: not any(h.is_running() and h.status() != psutil.STATUS_ZOMBIE for h in helpers),
                 timeout_s=20, what="the DHT process and p2pd to exit")  # fmt: skip
    finally:
        try:
            os.killpg(owner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
