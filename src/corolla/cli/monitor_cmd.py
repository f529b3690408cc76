"""``corolla monitor``: the swarm health page, ``/api/v1/state`` and ``/metrics``."""

from __future__ import annotations

from collections.abc import Sequence

from corolla.cli.flags import parse_flags
from corolla.cli.http_serving import bind, serve
from corolla.monitor.config import MonitorCommandConfig


def run(argv: Sequence[str], *, command: str = "monitor") -> int:
    config = parse_flags(MonitorCommandConfig, argv, prog="corolla monitor")
    from fastapi import FastAPI

    from corolla import __version__
    from corolla.errors import SwarmConnectionError
    from corolla.monitor.collector import SwarmCollector
    from corolla.monitor.service import MonitorService, add_monitor_routes

    sock = bind(config.host, config.port, prog="corolla monitor")
    try:
        collector = SwarmCollector.connect(config.initial_peers, config)
    except Exception as e:
        raise SwarmConnectionError(
            f"Could not join the swarm through {list(config.initial_peers)} ({type(e).__name__}: {e}). Check the "
            "addresses and that those peers are running."
        ) from e
    service = MonitorService(collector).start()
    app = FastAPI(title="corolla monitor", version=__version__)
    add_monitor_routes(app, service)
    try:
        serve(app, sock, ["Swarm health page: {base}/", "State: {base}/api/v1/state  Metrics: {base}/metrics"])
    finally:
        service.stop()
    return 0
