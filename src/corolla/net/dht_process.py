"""A hivemind DHT whose background process, and the p2pd daemon it runs, exit when their creator dies.

hivemind runs the DHT in a forked process that starts ``p2pd``. If the process that created it is killed
(SIGKILL, OOM), both would live on as orphans holding the peer's identity: new streams to that peer id would then
reach a daemon whose RPC handlers are gone and be closed at once, even after the server restarts. Here the DHT
process watches its parent and, when it is gone, kills its own children and exits.

The DHT process also leads a process group of its own, which p2pd joins. Ctrl-C in a terminal signals the whole
foreground process group, and p2pd exits on SIGINT at once (it installs its own handler, so ignoring the signal
does not help): the creator could then not shut down in order, e.g. a server could not announce itself OFFLINE.
In a separate group only the creator gets the Ctrl-C; it shuts the DHT down, which stops p2pd.
"""

from __future__ import annotations

import os
import threading
import time

import psutil
from hivemind.dht import DHT

from corolla.log import get_logger

logger = get_logger(__name__)

PARENT_POLL_S = 0.2
KILL_AFTER_TERM_S = 1.0


def _kill_children(process: psutil.Process) -> None:
    for child in process.children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


def _exit_when_parent_dies(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        _kill_children(psutil.Process())
        os._exit(1)

    threading.Thread(target=watch, name="corolla-parent-watch", daemon=True).start()


class ParentBoundDHT(DHT):
    """``hivemind.dht.DHT`` that cannot outlive the process that created it."""

    def run(self) -> None:
        os.setpgid(0, 0)  # before p2pd starts: a terminal's Ctrl-C reaches the creator only (see above)
        _exit_when_parent_dies(self._parent_pid)
        super().run()

    def shutdown(self) -> None:
        """hivemind's shutdown, then SIGKILL for a DHT process that is still there (with p2pd gone, its shutdown
        can hang, and it then outlives SIGTERM too: the creator would wait for it forever at exit)."""
        super().shutdown()
        if self.is_alive():
            self.join(KILL_AFTER_TERM_S)
        if self.is_alive():
            logger.warning("The DHT process did not stop; killing it")
            try:
                _kill_children(psutil.Process(self.pid))
            except psutil.Error:
                pass
            self.kill()
            self.join(KILL_AFTER_TERM_S)


def client_dht(initial_peers, *, key=None, **kwargs) -> ParentBoundDHT:
    """A client-mode DHT peer (stores nothing for others) that validates records like every corolla node; ``key``
    (an RSAPrivateKey, default a fresh one) signs the records it writes under its ``owner_marker``."""
    from hivemind.utils.crypto import RSAPrivateKey

    from corolla.net.identity import swarm_validators

    return ParentBoundDHT(
        initial_peers=list(initial_peers),
        start=True,
        client_mode=True,
        record_validators=swarm_validators(key or RSAPrivateKey()),
        **kwargs,
    )
