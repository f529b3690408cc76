"""``corolla api``: an OpenAI-compatible HTTP API for the models a swarm serves."""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from corolla.api.config import ApiConfig
from corolla.cli.flags import parse_flags


def run(argv: Sequence[str], *, command: str = "api") -> int:
    config = parse_flags(ApiConfig, argv, prog="corolla api")
    import uvicorn

    from corolla.api.app import create_app
    from corolla.api.served_models import load_models

    try:
        sock = socket.create_server((config.host, config.port))
    except OSError as e:
        where = f"{config.host}:{config.port}"
        raise SystemExit(f"corolla api: cannot listen on {where} ({e.strerror}); pick another --port") from None
    models = load_models(config)
    try:
        host, port = sock.getsockname()[:2]
        app = create_app(config, models)
        print(f"OpenAI-compatible API: http://{host}:{port}/v1 (models: {', '.join(models)})", flush=True)
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, log_config=None, access_log=False)
        )
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        server.run(sockets=[sock])
    finally:
        for served in models.values():
            served.shutdown()
    return 0
