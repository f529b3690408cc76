"""What the paper's experiments in miniature (``benchmarks/exp_*.py``) share: their common command-line options, the
machine line of their result tables, and how they save a plot."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE = "2-core shared dev VM, CPU only, loaded by concurrent jobs"


def experiment_parser(
    doc: str | None, presets: Iterable[str], *, log_dir: str | None = None
) -> argparse.ArgumentParser:
    """``--preset`` (default smoke), ``--out`` (default docs/results), ``--machine``; ``--log-dir`` when an
    experiment keeps server logs (``log_dir`` is its help text)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default="smoke")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="folder for the table and plot")
    parser.add_argument("--machine", default=MACHINE, help="machine description written into the table")
    if log_dir is not None:
        parser.add_argument("--log-dir", type=Path, help=log_dir)
    return parser


def machine_line(machine: str) -> str:
    """The machine as a result table names it: the description given, plus host name and architecture."""
    return f"{machine} ({platform.node()}, {platform.machine()})"


def save_figure(fig, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
