"""A hivemind DHT whose background process, and the p2pd daemon it runs, exit when their creator dies.

hivemind runs the DHT in a forked process that starts ``p2pd``. If the process that created it is killed
(SIGKILL, OOM), both would live on as orphans holding the peer's identity: new streams to that peer id would then
reach a daemon whose RPC handlers are gone and be closed at once, even after the server restarts. Here the DHT
process watches its parent and, when it is gone, kills its own children and exits.
"""

from __future__ import annotations

import os
import threading
import time

import psutil
from hivemind.dht import DHT

PARENT_POLL_S = 0.2


def _exit_when_parent_dies(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
        os._exit(1)

    threading.Thread(target=watch, name="corolla-parent-watch", daemon=True).start()


class ParentBoundDHT(DHT):
    """``hivemind.dht.DHT`` that cannot outlive the process that created it."""

    def run(self) -> None:
        _exit_when_parent_dies(self._parent_pid)
        super().run()


def client_dht(initial_peers, **kwargs) -> ParentBoundDHT:
    """A client-mode DHT peer (stores nothing) that validates records like every corolla node."""
    from hivemind.utils.crypto import RSAPrivateKey

    from corolla.net.identity import swarm_validators

    return ParentBoundDHT(
        initial_peers=list(initial_peers),
        start=True,
        client_mode=True,
        record_validators=swarm_validators(RSAPrivateKey()),
        **kwargs,
    )
