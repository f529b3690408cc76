"""``corolla serve MODEL``: host a span of the model's blocks."""

from __future__ import annotations

import argparse

from corolla.cli.dataclass_args import add_dataclass_arguments, dataclass_from_args
from corolla.server.config import ServerConfig


def register(commands) -> None:
    parser = commands.add_parser(
        "serve",
        help="host a span of a model's blocks for the swarm",
        description="Host a span of a model's transformer blocks and announce it to the swarm.",
    )
    add_dataclass_arguments(parser, ServerConfig, positional=("model",))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, *, handler_wrapper=None) -> int:
    """``handler_wrapper``: see ``corolla.server.server.Server`` (tests build misbehaving servers with it)."""
    from corolla.errors import AdapterError
    from corolla.server.server import Server

    try:
        config = dataclass_from_args(ServerConfig, args)
    except ValueError as e:
        raise SystemExit(f"corolla serve: {e}") from None
    try:
        Server(config, handler_wrapper=handler_wrapper).run()
    except AdapterError as e:
        raise SystemExit(f"corolla serve: {e}") from None
    return 0
