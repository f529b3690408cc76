"""What the paper's experiments in miniature (``benchmarks/exp_*.py``) share: their common command-line options and
the machine line of their result tables. Results files, plots and output folders: :mod:`benchmarks.results`."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from benchmarks.results import add_output_args, machine_info, machine_summary, save_figure

__all__ = ["experiment_parser", "machine_line", "save_figure"]


def experiment_parser(
    doc: str | None, presets: Iterable[str], *, log_dir: str | None = None
) -> argparse.ArgumentParser:
    """``--preset`` (default smoke), ``--out``, ``--machine``; ``--log-dir`` when an experiment keeps server logs
    (``log_dir`` is its help text)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default="smoke")
    add_output_args(parser)
    if log_dir is not None:
        parser.add_argument("--log-dir", type=Path, help=log_dir)
    return parser


def machine_line(note: str) -> str:
    """The machine as a result table names it: the note given, plus cores, CPU model, RAM and torch version."""
    return f"{note}; {machine_summary(machine_info(note))}"
