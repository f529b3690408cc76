"""The ``corolla`` command: serve blocks, run a bootstrap DHT peer, generate and chat through a swarm."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from corolla import startup

    startup.install()  # before anything imports hivemind or transformers: a server must start in seconds
    parser = argparse.ArgumentParser(
        prog="corolla", description="Run large language models on a swarm of computers that nobody fully controls."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from corolla.cli import demo_cmd, dht_cmd, generate_cmd, serve_cmd

    serve_cmd.register(commands)
    dht_cmd.register(commands)
    generate_cmd.register(commands)
    demo_cmd.register(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
