"""``corolla serve MODEL``: host a span of the model's blocks."""

from __future__ import annotations

from collections.abc import Sequence

from corolla.cli.flags import parse_flags
from corolla.server.config import ServerConfig


def parse(argv: Sequence[str]) -> ServerConfig:
    return parse_flags(ServerConfig, argv, prog="corolla serve")


def run(argv: Sequence[str], *, command: str = "serve", **server_hooks) -> int:
    """``server_hooks``: ``handler_wrapper`` or ``on_span_loaded`` of ``corolla.server.server.Server`` (tests build
    misbehaving servers with them)."""
    from corolla.errors import AdapterError
    from corolla.server.server import Server

    config = parse(argv)
    try:
        Server(config, **server_hooks).run()
    except AdapterError as e:
        raise SystemExit(f"corolla serve: {e}") from None
    return 0
