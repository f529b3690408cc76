"""argparse flags generated from a config dataclass, so every default and help text lives in one place."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, *, positional: tuple[str, ...] = ()) -> None:
    """One flag per field (``--snake-case``); tuples take several values; bools are switches."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, is_tuple = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.name in positional:
            parser.add_argument(f.name, type=kind, help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        # the parser's own default stays None (= not given, so a --config file may set it); help shows the real one
        shown = help_text
        if default not in (None, ()):
            shown += f" (default: {' '.join(map(str, default)) if is_tuple else default})"
        flags = (flag, *f.metadata.get("aliases", ()))  # older spellings keep working
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            parser.add_argument(
                *flags, dest=f.name, required=True, nargs="+" if is_tuple else None, type=kind, help=shown
            )
        elif kind is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true", default=None, help=help_text)
        elif is_tuple:
            parser.add_argument(*flags, dest=f.name, nargs="+", type=kind, default=None, help=shown)
        else:
            parser.add_argument(*flags, dest=f.name, type=kind, default=None, help=shown)
    parser.add_argument("--config", type=Path, default=None, help="YAML file with any of these settings")


def dataclass_from_args(cls, args: argparse.Namespace):
    """Build ``cls`` from a YAML file (if ``--config``) overridden by the flags given on the command line."""
    values: dict = {}
    if getattr(args, "config", None) is not None:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
        names = {f.name: f.name for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):  # an older spelling of a setting (e.g. request_timeout) still works
            names.update({alias.lstrip("-").replace("-", "_"): f.name for alias in f.metadata.get("aliases", ())})
        unknown = set(k.replace("-", "_") for k in loaded) - set(names)
        if unknown:
            raise ValueError(f"{args.config}: unknown settings {sorted(unknown)}")
        values.update({names[k.replace("-", "_")]: v for k, v in loaded.items()})
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    for f in dataclasses.fields(cls):
        if isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def _base_type(hint) -> tuple[type, bool]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def config_or_exit(cls, args: argparse.Namespace, command: str):
    """``dataclass_from_args``, a bad value ending the command with its one-line message (exit status 1)."""
    try:
        return dataclass_from_args(cls, args)
    except ValueError as e:
        raise SystemExit(f"corolla {command}: {e}") from None
