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
    verbose = "show the full traceback of an error"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from corolla.cli import demo_cmd, dht_cmd, generate_cmd, serve_cmd

    serve_cmd.register(commands)
    dht_cmd.register(commands)
    generate_cmd.register(commands)
    demo_cmd.register(commands)
    for command in {id(c): c for c in commands.choices.values()}.values():  # `corolla serve ... --verbose` too
        if "--verbose" not in command._option_string_actions:  # generate's own --verbose also logs routes
            command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose)
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from corolla.errors import CorollaError

        if args.verbose or not isinstance(e, CorollaError):
            raise  # a bug: the traceback is what a report needs
        # a user's mistake (a wrong model name, unreachable peers, ...): its message says what to do next
        sys.stderr.write(f"corolla {args.command}: error: {' '.join(str(e).split())}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
