"""``corolla serve MODEL``: host a span of the model's blocks."""

from __future__ import annotations

from collections.abc import Sequence

from corolla.cli.flags import parse_flags
from corolla.server.config import ServerConfig


def parse(argv: Sequence[str]) -> ServerConfig:
    return parse_flags(ServerConfig, argv, prog="corolla serve")


def run(argv: Sequence[str], *, command: str = "serve", handler_wrapper=None) -> int:
    """``handler_wrapper``: see ``corolla.server.server.Server`` (tests build misbehaving servers with it)."""
    from corolla.errors import AdapterError
    from corolla.server.server import Server

    config = parse(argv)
    try:
        Server(config, handler_wrapper=handler_wrapper).run()
    except AdapterError as e:
        raise SystemExit(f"corolla serve: {e}") from None
    return 0
