"""``corolla api``: an OpenAI-compatible HTTP API for the models a swarm serves (``--monitor`` adds the health
page at ``/``)."""

from __future__ import annotations

from collections.abc import Sequence

from corolla.api.config import ApiConfig
from corolla.cli.flags import parse_flags
from corolla.cli.http_serving import bind, serve


def run(argv: Sequence[str], *, command: str = "api") -> int:
    config = parse_flags(ApiConfig, argv, prog="corolla api")
    from corolla.api.app import create_app
    from corolla.api.served_models import load_models

    sock = bind(config.host, config.port, prog="corolla api")
    monitor = None
    models = load_models(config)
    try:
        app = create_app(config, models)
        lines = ["OpenAI-compatible API: {base}/v1 (models: " + ", ".join(models) + ")"]
        if config.monitor:
            from corolla.monitor.collector import SwarmCollector
            from corolla.monitor.service import MonitorService, add_monitor_routes

            monitor = MonitorService(SwarmCollector.connect(config.initial_peers, config.monitor_settings)).start()
            add_monitor_routes(app, monitor)
            lines.append("Swarm health page: {base}/")
        serve(app, sock, lines)
    finally:
        if monitor is not None:
            monitor.stop()
        for served in models.values():
            served.shutdown()
    return 0
