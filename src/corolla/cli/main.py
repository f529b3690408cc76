"""The ``corolla`` command: serve blocks, run a bootstrap DHT peer, generate and chat through a swarm."""

from __future__ import annotations

import argparse
import sys

# name -> (module under corolla.cli, one-line help); each module's ``run(argv)`` parses its own flags
COMMANDS = {
    "serve": ("serve_cmd", "host a span of a model's blocks for the swarm"),
    "dht": ("dht_cmd", "start a bootstrap DHT peer"),
    "generate": ("generate_cmd", "generate text through a swarm"),
    "chat": ("generate_cmd", "interactive chat through a swarm"),
    "demo": ("demo_cmd", "run a local swarm of the bundled model and chat through it"),
    "stage": ("stage_cmd", "serve a pipeline stage of a model trained by a SWARM"),
    "train": ("train_cmd", "train a model through a SWARM's stage peers"),
    "api": ("api_cmd", "an OpenAI-compatible HTTP API for the swarm's models"),
    "monitor": ("monitor_cmd", "a web page showing whether the swarm can serve its models"),
    "btard": ("btard_cmd", "one peer of a Byzantine-tolerant (BTARD-SGD) data-parallel run"),
}
VERBOSE_HELP = "show the full traceback of an error"


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<10}{text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="corolla",
        description="Run large language models on a swarm of computers that nobody fully controls.",
        epilog=f"commands:\n{listing}\n\n`corolla COMMAND --help` lists a command's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP + " (also after COMMAND)")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's flags")
    return parser


def main(argv: list[str] | None = None) -> int:
    from corolla import startup

    startup.install()  # before anything imports hivemind or transformers: a server must start in seconds
    args = _parser().parse_args(argv)
    import importlib

    module = importlib.import_module(f"corolla.cli.{COMMANDS[args.command][0]}")
    verbose = args.verbose or "--verbose" in args.args
    command_args = list(args.args)
    if not getattr(module, "HAS_VERBOSE_FLAG", False):  # generate/chat's own --verbose also logs routes
        command_args = [a for a in command_args if a != "--verbose"]
    try:
        return module.run(command_args, command=args.command) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from corolla.errors import CorollaError

        if verbose or not isinstance(e, CorollaError):
            raise  # a bug: the traceback is what a report needs
        # a user's mistake (a wrong model name, unreachable peers, ...): its message says what to do next
        sys.stderr.write(f"corolla {args.command}: error: {' '.join(str(e).split())}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
