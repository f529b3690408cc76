"""How every benchmark (``benchmarks/bench_*.py``, ``benchmarks/exp_*.py``) records its results: one JSON file per
run with the date, the machine (CPU model, cores, RAM, torch version, load), the exact command line, the git
commit, the preset and its parameters, and the measured numbers.

Non-smoke presets write ``<out>/<name>.json`` (``--out`` defaults to ``docs/results``, where the committed results
live and from which ``benchmarks/make_tables.py`` builds the tables of ``docs/benchmarks.md``). The smoke preset
writes ``<out>/<name>_smoke.json`` and its ``--out`` defaults to a temporary folder, so tests and ``make
bench-smoke`` never touch the committed results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
SMOKE_DIR = Path(tempfile.gettempdir()) / "corolla-bench-smoke"
NOTE = "shared dev machine, CPU only, other jobs may run on the same cores"


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--out`` (where the JSON and any table or plot go) and ``--machine`` (a free-text note on the machine)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for the results (default: docs/results; for the smoke preset {SMOKE_DIR})",
    )
    parser.add_argument("--machine", default=NOTE, help="a note on the machine, written into the results")


def out_dir(args: argparse.Namespace) -> Path:
    """The folder this run writes to (created)."""
    default = SMOKE_DIR if getattr(args, "preset", None) == "smoke" else RESULTS_DIR
    out = args.out if args.out is not None else default
    out.mkdir(parents=True, exist_ok=True)
    return out


def stem(name: str, preset: str) -> str:
    """The file name (without suffix) of a run's outputs: ``name`` for a real run, ``name_smoke`` for a smoke run."""
    return f"{name}_smoke" if preset == "smoke" else name


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(note: str) -> dict:
    """What the results were measured on."""
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    return {
        "note": note,
        "cpu_model": _cpu_model(),
        "cpu_cores": cores,
        "cpu_cores_usable": usable,
        "ram_gib": _ram_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "hivemind": _version("hivemind"),
    }


def machine_summary(machine: dict) -> str:
    """One line for tables: ``<cores> cores (<model>), <RAM> GiB RAM, torch <version>``."""
    cpu = f"{machine['cpu_cores']} cores ({machine['cpu_model']})"
    return f"{cpu}, {machine['ram_gib']} GiB RAM, torch {machine['torch']}"


def git_commit() -> dict:
    """The commit the benchmark's code is at, and whether the code (tracked files under src/ and benchmarks/) differs
    from it."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks"))
        return {"commit": git("rev-parse", "HEAD"), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def command_line() -> str:
    """The command as it was run, relative to the repository root where possible."""
    argv = list(sys.argv)
    try:
        argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
    except ValueError:
        pass
    return shlex.join(["python", *argv])


class Run:
    """One benchmark run: made when it starts (date, load, git state), saved with the numbers when it ends."""

    def __init__(self, name: str, args: argparse.Namespace, *, preset: str | None = None):
        self.name = name
        self.preset = preset if preset is not None else args.preset
        self.out = out_dir(args)
        self.note = args.machine
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self._t0 = time.monotonic()
        self.load_at_start = _load()
        self.git = git_commit()
        self.command = command_line()

    @property
    def stem(self) -> str:
        return stem(self.name, self.preset)

    def path(self, suffix: str) -> Path:
        """``<out>/<stem><suffix>``, e.g. ``run.path(".png")`` for the run's plot."""
        return self.out / f"{self.stem}{suffix}"

    def record(self, *, params: dict, results: dict) -> dict:
        return {
            "benchmark": self.name,
            "date": self.started.isoformat(timespec="seconds"),
            "duration_s": round(time.monotonic() - self._t0, 1),
            "command": self.command,
            "git": self.git,
            "preset": self.preset,
            "params": params,
            "machine": machine_info(self.note),
            "load_avg": {"start": self.load_at_start, "end": _load()},
            "results": results,
        }

    def save(self, *, params: dict, results: dict) -> Path:
        """Write the JSON file and return its path."""
        path = self.path(".json")
        path.write_text(json.dumps(self.record(params=params, results=results), indent=1) + "\n")
        print(f"results written to {path}")
        return path


def load(path: Path) -> dict:
    """A results file, checked to have the fields every run records."""
    data = json.loads(Path(path).read_text())
    missing = {"benchmark", "date", "command", "git", "preset", "params", "machine", "results"} - set(data)
    if missing:
        raise ValueError(f"{path} is not a benchmark results file (missing {sorted(missing)})")
    return data


def save_figure(fig, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"plot written to {png}")
