"""Heterogeneous swarm: forward-pass throughput with automatic block choice vs a naive equal split.

Servers of different speeds serve one model on loopback (``LocalSwarm``); slow servers are emulated by a real CPU
throttle on the whole server process tree (server, its DHT process and ``p2pd``):

* ``cgroup-v2``: a child cgroup per slow server with ``cpu.max = quota period``;
* ``cgroup-v1``: the same with ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (this VM has only the v1 cpu controller);
* ``sigstop``: no writable cgroups (e.g. unprivileged CI): a thread of this script stops the server's process groups
  (its own and its DHT process's) with SIGSTOP for ``1 - cpu`` of every 100 ms and lets it run (SIGCONT) for the rest.

In the full preset every server starts with ``--throughput eval`` under its throttle, so it measures (and announces)
its own speed; the script reads the announced throughputs back from the DHT and reports them. The smoke preset
throttles slow servers only once they are ONLINE (at 0.1 CPU, importing torch alone takes a minute) and passes
explicit ``--throughput`` values instead. Two strategies run one after the other,
each with its own swarm, the same servers, the same throttles and the same timeline:

* ``auto``:  servers started without ``--blocks``, with ``--num-blocks M``, a short ``--balance-period`` and
  ``--join-jitter``: they choose their blocks and rebalance (server/rebalancer.py);
* ``naive``: ``--blocks a:b`` chosen without looking at speeds: the model is cut into equal contiguous tiles of M
  blocks and the i-th server started gets tile ``i mod tiles`` (``naive_spans``).

Workload: ``--clients`` threads of one client process, each running forward passes ``model(input_ids=ids,
logits_to_keep=1)`` (batch x tokens random ids, ``torch.no_grad()``) back to back; the client spreads sub-batches
over servers in proportion to their announced throughput. Only the last position's logits are computed, so the
client's LM head does not become the bottleneck. Throughput = input tokens of completed forward passes per second.

Timeline: the swarm starts with the preset's servers; once every block is served and the spans have stopped
changing, the phases run back to back with the workload running throughout: in the full preset a fast server joins
at the start of phase 2 and the first fast server is SIGKILLed at the start of phase 3.

    python benchmarks/exp_heterogeneous.py --preset smoke --out /tmp/exp
    python benchmarks/exp_heterogeneous.py --preset full             # -> docs/results/
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tests.fixtures` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.experiment import experiment_parser, machine_line, save_figure  # noqa: E402
from benchmarks.results import Run, load, out_dir  # noqa: E402
from benchmarks.results import stem as results_stem  # noqa: E402

STRATEGIES = ("auto", "naive")
LABELS = {"auto": "automatic block choice + rebalancing", "naive": "static equal split (--blocks)"}


@dataclass(frozen=True)
class Phase:
    """``duration_s`` of workload; at its start ``action`` happens: None, ("join", name) or ("kill", name)."""

    label: str
    duration_s: float
    action: tuple[str, str] | None = None


PRESETS = {
    "smoke": dict(
        model="zoo-llama-12",
        blocks_per_server=6,
        servers={"fast0": None, "slow0": 0.1, "slow1": 0.1},  # name -> CPU share (None: not throttled)
        initial=["fast0", "slow0", "slow1"],
        # throttled servers would take minutes to import torch at 0.1 CPU: the smoke preset throttles them once
        # they are ONLINE and gives all servers explicit throughputs instead of letting them measure
        throttle_at="online",
        throughput={"fast0": 1000.0, "slow0": 100.0, "slow1": 100.0},
        phases=[Phase("steady", 8.0)],
        batch=(4, 32),
        clients=4,
        balance_period=2.0,
        join_jitter=1.0,
        settle_s=4.0,
        bin_s=2.0,
    ),
    "full": dict(
        model="smollm2-135m",
        blocks_per_server=10,
        servers={"fast0": None, "fast1": None, "slow0": 0.1, "slow1": 0.1, "fast2": None},
        initial=["fast0", "fast1", "slow0", "slow1"],
        throttle_at="spawn",  # slow for their whole life: they measure (--throughput eval) under the throttle
        throughput="eval",
        phases=[
            Phase("4 servers", 60.0),
            Phase("fast2 joins", 60.0, ("join", "fast2")),
            Phase("fast0 killed", 60.0, ("kill", "fast0")),
        ],
        batch=(4, 32),
        clients=8,
        balance_period=5.0,
        join_jitter=3.0,
        settle_s=12.0,
        bin_s=5.0,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested in tests/unit/test_exp_heterogeneous.py)
# ----------------------------------------------------------------------------------------------------------------


def naive_tiles(num_layers: int, blocks_per_server: int) -> list[tuple[int, int]]:
    """Equal contiguous tiles of ``blocks_per_server`` blocks covering ``[0, num_layers)``, in order.

    When ``blocks_per_server`` does not divide ``num_layers`` the last tile is shifted left so that it ends at
    ``num_layers`` (every tile keeps ``blocks_per_server`` blocks, like every server's memory). ValueError unless
    ``1 <= blocks_per_server <= num_layers``.
    """
    if not 1 <= blocks_per_server <= num_layers:
        raise ValueError(f"need 1 <= blocks_per_server <= num_layers, got {blocks_per_server}, {num_layers}")
    count = math.ceil(num_layers / blocks_per_server)
    starts = [min(i * blocks_per_server, num_layers - blocks_per_server) for i in range(count)]
    return [(s, s + blocks_per_server) for s in starts]


def naive_spans(num_layers: int, blocks_per_server: int, num_servers: int) -> list[tuple[int, int]]:
    """The span of each of ``num_servers`` servers in start order: server i gets tile ``i mod tiles``."""
    tiles = naive_tiles(num_layers, blocks_per_server)
    return [tiles[i % len(tiles)] for i in range(num_servers)]


def bottleneck(spans: Sequence[tuple[int, int, float]], num_layers: int) -> float:
    """Min over blocks of the summed throughput of the servers hosting it (0 if a block has no host)."""
    coverage = [0.0] * num_layers
    for start, end, throughput in spans:
        for block in range(max(start, 0), min(end, num_layers)):
            coverage[block] += throughput
    return min(coverage)


def rate(done: Sequence[tuple[float, int]], start: float, end: float) -> float:
    """Tokens/s of the completions ``(time, tokens)`` with ``start <= time < end``."""
    if end <= start:
        raise ValueError(f"empty window {start}..{end}")
    return sum(n for t, n in done if start <= t < end) / (end - start)


def binned_rates(
    done: Sequence[tuple[float, int]], start: float, end: float, bin_s: float
) -> list[tuple[float, float]]:
    """``(bin middle - start, tokens/s)`` for consecutive bins of ``bin_s`` from ``start``; a last partial bin
    shorter than half a bin is dropped."""
    if bin_s <= 0:
        raise ValueError(f"bin_s must be > 0, got {bin_s}")
    out, t = [], start
    while t + bin_s / 2 <= end:
        right = min(t + bin_s, end)
        out.append(((t + right) / 2 - start, rate(done, t, right)))
        t += bin_s
    return out


# ----------------------------------------------------------------------------------------------------------------
# CPU throttles
# ----------------------------------------------------------------------------------------------------------------


class Throttle:
    """Makes some servers slow: a CPU share per server name (None: not throttled).

    cgroup modes: when ``at_spawn``, ``prefix(name)`` is a command prefix that moves the process into its own cgroup
    with its quota before it execs the server, so its children (DHT process, p2pd) are in it too; otherwise the
    server starts like any other (forked by the warm spawner when LocalSwarm uses one) and ``engage(name, pid)``
    moves its whole process tree (server, DHT process, p2pd) into its own cgroup with the quota.
    sigstop mode: ``engage`` starts a thread that stops and continues the process group.
    ``release(name)`` lifts the throttle (so that a slow server shuts down quickly).
    """

    PERIOD_US = 20_000  # short, so a short speed measurement cannot fit into one period's unthrottled burst

    def __init__(self, mode: str, shares: dict[str, float | None], *, at_spawn: bool, tag: str = ""):
        self.shares, self.at_spawn, self.tag = shares, at_spawn, tag
        self.mode = self.detect() if mode == "auto" else mode
        self.paths: dict[str, Path] = {}
        self._stops: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []

    @staticmethod
    def detect() -> str:
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "cpu" in v2.read_text().split() and os.access("/sys/fs/cgroup", os.W_OK):
            return "cgroup-v2"
        v1 = Path("/sys/fs/cgroup/cpu")
        if (v1 / "cpu.cfs_quota_us").exists() and os.access(v1, os.W_OK):
            return "cgroup-v1"
        return "sigstop"

    def _set(self, name: str, share: float | None) -> None:
        path = self.paths[name]
        quota = -1 if share is None else max(1000, int(share * self.PERIOD_US))
        if self.mode == "cgroup-v2":
            (path / "cpu.max").write_text(f"{'max' if quota < 0 else quota} {self.PERIOD_US}\n")
        else:
            (path / "cpu.cfs_period_us").write_text(f"{self.PERIOD_US}\n")
            (path / "cpu.cfs_quota_us").write_text(f"{quota}\n")

    def _make_cgroup(self, name: str) -> Path:
        root = Path("/sys/fs/cgroup") if self.mode == "cgroup-v2" else Path("/sys/fs/cgroup/cpu")
        path = root / f"corolla-hx-{os.getpid()}-{self.tag}{name}"
        path.mkdir()
        self.paths[name] = path
        self._set(name, self.shares[name])
        return path

    def prefix(self, name: str) -> list[str]:
        if self.shares.get(name) is None or self.mode == "sigstop" or not self.at_spawn:
            return []
        path = self._make_cgroup(name)
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(path / "cgroup.procs")]

    def _move_tree(self, path: Path, pid: int) -> None:
        """Move a running server and all its descendants into the cgroup at ``path``; rescan until none is left
        outside (a process forked by one not yet moved would stay behind)."""
        import psutil

        moved: set[int] = set()
        for _ in range(20):
            try:
                tree = {pid} | {child.pid for child in psutil.Process(pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                return
            if tree <= moved:
                return
            for member in sorted(tree - moved):
                try:
                    (path / "cgroup.procs").write_text(f"{member}\n")
                except ProcessLookupError:
                    pass
                moved.add(member)
        raise RuntimeError(f"could not move the process tree of {pid} into {path}")

    def engage(self, name: str, pid: int) -> None:
        share = self.shares.get(name)
        if share is None:
            return
        if self.mode != "sigstop":
            if name in self.paths:
                self._set(name, share)
            else:  # throttled once running: it was started outside any cgroup of ours
                self._move_tree(self._make_cgroup(name), pid)
            return
        stop = self._stops[name] = threading.Event()
        thread = threading.Thread(target=self._duty_cycle, args=(pid, share, stop), daemon=True)
        thread.start()
        self._threads.append(thread)

    @staticmethod
    def _duty_cycle(pid: int, share: float, stop: threading.Event, period_s: float = 0.1) -> None:
        from corolla.local_swarm import LocalSwarm

        cycle = 0
        while not stop.is_set():
            if cycle % 10 == 0:  # the DHT process leads a group of its own, with p2pd; rescan /proc once a second
                groups = LocalSwarm.process_groups(pid)
            cycle += 1
            try:
                for group in groups:
                    os.killpg(group, signal.SIGSTOP)
                time.sleep(period_s * (1 - share))
                for group in groups:
                    os.killpg(group, signal.SIGCONT)
            except ProcessLookupError:
                for group in groups:  # never leave part of a server stopped
                    try:
                        os.killpg(group, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                return
            time.sleep(period_s * share)

    def release(self, name: str) -> None:
        if name in self._stops:
            self._stops.pop(name).set()
        if name in self.paths:
            try:
                self._set(name, None)
            except OSError:
                pass

    def stats(self, name: str) -> dict | None:
        """nr_throttled and throttled seconds of a cgroup-throttled server (None otherwise)."""
        path = self.paths.get(name)
        if path is None:
            return None
        try:
            fields = dict(line.split() for line in (path / "cpu.stat").read_text().splitlines())
        except OSError:
            return None
        if "throttled_usec" in fields:
            throttled_s = int(fields["throttled_usec"]) / 1e6
        else:
            throttled_s = int(fields.get("throttled_time", 0)) / 1e9
        return {"nr_throttled": int(fields.get("nr_throttled", 0)), "throttled_s": round(throttled_s, 1)}

    def release_all(self) -> None:
        for name in list(self._stops) + list(self.paths):
            self.release(name)
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads.clear()

    def cleanup(self) -> None:
        self.release_all()
        for path in self.paths.values():
            for _ in range(50):  # the cgroup is removable once its last process (p2pd) has exited
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                print(f"warning: could not remove cgroup {path}", file=sys.stderr)
        self.paths.clear()


# ----------------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------------


def resolve_model(name: str) -> str:
    """A local checkpoint folder for the preset's model name."""
    if name == "smollm2-135m":
        from corolla.models.bundled import ensure_bundled_checkpoint

        return str(ensure_bundled_checkpoint("smollm2-135m"))
    if name.startswith("zoo-"):
        from tests.fixtures.zoo import tiny_checkpoint, zoo_root

        family, layers = name.removeprefix("zoo-").rsplit("-", 1)
        return str(tiny_checkpoint(family, zoo_root(), num_layers=int(layers)))
    return name


class SwarmWatcher:
    """Reads the swarm's ONLINE servers (name -> (start, end, announced throughput)) from the DHT."""

    def __init__(self, swarm, model: str, num_layers: int):
        from corolla.models.checkpoint import default_dht_prefix
        from corolla.net.dht_process import client_dht

        self.swarm, self.num_layers = swarm, num_layers
        self.prefix = default_dht_prefix(model)
        self.dht = client_dht(swarm.initial_peers)

    def servers(self) -> dict[str, tuple[int, int, float]]:
        from corolla.net.dht_records import collect_servers, fetch_block_records

        records = fetch_block_records(self.dht, dht_prefix=self.prefix, num_blocks=self.num_layers)
        names = {peer: name for name, peer in self.swarm.peer_ids.items()}
        out = {}
        for peer, info in collect_servers(records).items():
            name = names.get(peer.to_base58())
            if name is not None:
                out[name] = (info.start_block, info.end_block, float(info.throughput))
        return dict(sorted(out.items()))

    def wait_stable(self, stable_s: float, timeout_s: float, alive: Sequence[str]) -> float:
        """Wait until the servers in ``alive`` all announce spans that stay unchanged for ``stable_s``."""
        started = time.monotonic()
        last, since = None, time.monotonic()
        while time.monotonic() - started < timeout_s:
            spans = {n: s[:2] for n, s in self.servers().items() if n in alive}
            if spans != last or set(spans) != set(alive):
                last, since = spans, time.monotonic()
            elif time.monotonic() - since >= stable_s:
                break
            time.sleep(0.5)
        return time.monotonic() - started

    def shutdown(self) -> None:
        self.dht.shutdown()


class Workload:
    """``clients`` threads running forward passes back to back; records (completion time, tokens) and errors."""

    def __init__(self, model, batch: tuple[int, int], clients: int, vocab: int, seed: int = 0):
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.model, self.clients = model, clients
        self.ids = torch.randint(0, vocab, batch, generator=generator)
        self.tokens = batch[0] * batch[1]
        self.done: list[tuple[float, int]] = []
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def _loop(self) -> None:
        import torch

        while not self._stop.is_set():
            try:
                with torch.no_grad():
                    self.model(input_ids=self.ids, logits_to_keep=1)
                self.done.append((time.monotonic(), self.tokens))
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                self.errors.append((time.monotonic(), f"{type(e).__name__}: {e}"[:300]))
                time.sleep(0.5)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


class StrategyRun:
    """One strategy's swarm (its own bootstrap peer, servers, throttles and throughput cache) and its measurement."""

    def __init__(self, strategy: str, preset: dict, model_path: str, args, log_root: Path, cache: str):
        from transformers import AutoConfig

        from corolla.local_swarm import LocalSwarm

        self.strategy, self.preset, self.model_path = strategy, preset, model_path
        config = AutoConfig.from_pretrained(model_path)
        self.num_layers, self.vocab = config.num_hidden_layers, config.vocab_size
        at_spawn = preset["throttle_at"] == "spawn"
        self.throttle = Throttle(args.throttle, preset["servers"], at_spawn=at_spawn, tag=f"{strategy}-")
        # --throughput eval must not touch the shared cache, nor another strategy's measurements; explicit
        # throughputs read nothing from it, so both strategies share ``cache``: one environment for their servers,
        # one warm spawner forking them (a second one imports torch & co. again)
        self.own_cache = preset["throughput"] == "eval"
        self.cache = tempfile.mkdtemp(prefix="corolla-hx-cache-") if self.own_cache else cache
        env = dict(os.environ, COROLLA_CACHE=self.cache, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        common = [
            "--update-period", str(args.update_period),
            "--balance-period", str(preset["balance_period"]), "--join-jitter", str(preset["join_jitter"]),
        ]  # fmt: skip
        self.log_dir = log_root / strategy
        self.started: list[str] = []
        self.swarm = LocalSwarm(
            model=model_path,
            server_args=common,
            env=env,
            log_dir=self.log_dir,
            start_timeout_s=300.0,
            command_prefix=self.throttle.prefix,
        )
        self.watcher = self.workload = self.client = None
        self.closed = False
        self.result: dict = {"strategy": strategy, "phases": [], "throttle": self.throttle.mode}

    def start_server(self, name: str) -> None:
        m = self.preset["blocks_per_server"]
        if self.strategy == "auto":
            extra = ["--num-blocks", str(m)]
        else:
            start_block, end_block = naive_spans(self.num_layers, m, len(self.started) + 1)[-1]
            extra = ["--blocks", f"{start_block}:{end_block}"]
        throughput = self.preset["throughput"]
        extra += ["--throughput", throughput if isinstance(throughput, str) else str(throughput[name])]
        process = self.swarm.start_server(name, extra)
        if self.throttle.at_spawn:
            self.throttle.engage(name, process.pid)
        self.started.append(name)

    def launch(self) -> None:
        """Start the bootstrap peer and the initial servers (does not wait for them)."""
        self.t0 = time.monotonic()
        self.swarm.start_bootstrap()
        for name in self.preset["initial"]:
            self.start_server(name)

    def wait_ready(self) -> None:
        """Wait until every block is served, engage late throttles, wait until the spans stop changing."""
        initial = self.preset["initial"]
        self.swarm.wait_until_served(self.num_layers, min_servers=len(initial))
        self.result["served_after_s"] = round(time.monotonic() - self.t0, 1)
        if not self.throttle.at_spawn:
            for name in initial:
                self.throttle.engage(name, self.swarm.processes[name].pid)
        self.watcher = SwarmWatcher(self.swarm, self.model_path, self.num_layers)
        settle = self.preset["settle_s"] if self.strategy == "auto" else 1.0
        self.result["settle_s"] = round(self.watcher.wait_stable(settle, timeout_s=120.0, alive=initial), 1)
        self.result["start_spans"] = self.watcher.servers()

    def measure(self) -> None:
        import torch

        from corolla import AutoDistributedModelForCausalLM

        torch.set_num_threads(1)
        preset, result = self.preset, self.result
        self.client = AutoDistributedModelForCausalLM.from_pretrained(
            self.model_path,
            initial_peers=self.swarm.initial_peers,
            update_period_s=2.0,
            ban_timeout_s=2.0,
            max_retries=8,
        )
        workload = self.workload = Workload(self.client, tuple(preset["batch"]), preset["clients"], self.vocab)
        alive = list(preset["initial"])
        run_start = time.monotonic()
        workload.start()
        for phase in preset["phases"]:
            phase_start = time.monotonic()
            if phase.action and phase.action[0] == "join":
                self.start_server(phase.action[1])
                alive.append(phase.action[1])
            elif phase.action and phase.action[0] == "kill":
                self.swarm.kill(phase.action[1], signal.SIGKILL)
                alive.remove(phase.action[1])
            time.sleep(phase.duration_s)
            phase_end = time.monotonic()
            spans = {n: s for n, s in self.watcher.servers().items() if n in alive}
            half = phase_start + (phase_end - phase_start) / 2
            result["phases"].append(
                {
                    "label": phase.label,
                    "start_s": round(phase_start - run_start, 1),
                    "end_s": round(phase_end - run_start, 1),
                    "tokens_per_s": round(rate(workload.done, phase_start, phase_end), 1),
                    "tokens_per_s_2nd_half": round(rate(workload.done, half, phase_end), 1),
                    "errors": sum(1 for t, _ in workload.errors if phase_start <= t < phase_end),
                    "spans": {n: [s[0], s[1], round(s[2], 1)] for n, s in spans.items()},
                    "announced_bottleneck": round(bottleneck(list(spans.values()), self.num_layers), 1),
                }
            )
            print(f"[{self.strategy}] {result['phases'][-1]}", flush=True)
        end = time.monotonic()
        workload.stop()
        result["forward_passes"] = len(workload.done)
        result["timeline"] = [
            [round(t, 2), round(r, 1)] for t, r in binned_rates(workload.done, run_start, end, preset["bin_s"])
        ]
        result["events"] = [
            [p.label, r["start_s"]] for p, r in zip(preset["phases"], result["phases"], strict=True) if p.action
        ]
        result["error_samples"] = sorted({e for _, e in workload.errors})[:5]
        result["throttle_stats"] = {n: st for n in self.started if (st := self.throttle.stats(n))}
        result["moves"] = {
            name: (self.log_dir / f"{name}.log").read_text(errors="replace").count("Rebalancing: moving")
            for name in self.started
            if (self.log_dir / f"{name}.log").exists()
        }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.workload is not None:
            self.workload.stop()
        self.throttle.release_all()  # a throttled (or stopped) server would take long to shut down
        if self.client is not None:
            try:
                self.client.remote_blocks.swarm.shutdown()
            except Exception:  # noqa: BLE001 - best effort
                pass
        if self.watcher is not None:
            self.watcher.shutdown()
        self.swarm.stop()
        self.throttle.cleanup()
        if self.own_cache:
            shutil.rmtree(self.cache, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


def _spans_text(spans: dict) -> str:
    return ", ".join(f"{n} {s[0]}:{s[1]} ({s[2]:.0f})" for n, s in spans.items())


def write_outputs(
    results: dict[str, dict], preset_name: str, preset: dict, out: Path, args, date: str, command: str
) -> tuple[Path, Path]:
    """The table (``.md``) and plot (``.png``) of a run; the JSON is written by :class:`benchmarks.results.Run`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = results_stem("heterogeneous", preset_name)
    batch = preset["batch"]
    shares = ", ".join(f"{n} {'full' if s is None else f'{s:g} CPU'}" for n, s in preset["servers"].items())
    lines = [
        f"# Heterogeneous swarm: automatic block choice vs naive equal split ({preset_name})",
        "",
        f"- date: {date}",
        f"- machine: {machine_line(args.machine)}",
        f"- command: `{command}`",
        f"- model: {preset['model']}, {preset['blocks_per_server']} blocks per server; workload: {preset['clients']} "
        f"client threads, forward passes of batch {batch[0]} x {batch[1]} tokens (`logits_to_keep=1`)",
        f"- throttle: {results[STRATEGIES[0]]['throttle']}; servers: {shares}",
        "- spans: `name start:end (announced throughput)` at the end of each phase; tokens/s = input tokens of "
        "completed forward passes per second",
        "",
        "| phase | strategy | tokens/s (whole phase) | tokens/s (2nd half) | auto/naive (2nd half) | announced "
        "bottleneck | errors | spans |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, phase in enumerate(preset["phases"]):
        auto, naive = results["auto"]["phases"][i], results["naive"]["phases"][i]
        ratio = auto["tokens_per_s_2nd_half"] / naive["tokens_per_s_2nd_half"] if naive["tokens_per_s_2nd_half"] else 0
        for strategy, row in (("auto", auto), ("naive", naive)):
            lines.append(
                f"| {phase.label} | {strategy} | {row['tokens_per_s']:.0f} | {row['tokens_per_s_2nd_half']:.0f} | "
                f"{f'**{ratio:.2f}x**' if strategy == 'auto' else ''} | {row['announced_bottleneck']:.0f} | "
                f"{row['errors']} | {_spans_text(row['spans'])} |"
            )
    lines += ["", "| strategy | all served after | spans settled after | rebalancing moves | throttled (nr, s) |"]
    lines += ["|---|---|---|---|---|"]
    for strategy, res in results.items():
        moves = ", ".join(f"{n} {k}" for n, k in res["moves"].items() if k) or "none"
        stats = ", ".join(f"{n} {s['nr_throttled']}, {s['throttled_s']} s" for n, s in res["throttle_stats"].items())
        lines.append(f"| {strategy} | {res['served_after_s']} s | +{res['settle_s']} s | {moves} | {stats or 'n/a'} |")
    for strategy, res in results.items():
        if res["error_samples"]:
            lines += ["", f"{strategy} errors (samples): " + "; ".join(f"`{e}`" for e in res["error_samples"])]
    md, png = out / f"{stem}.md", out / f"{stem}.png"
    md.write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for strategy, style in (("auto", "-o"), ("naive", "-s")):
        timeline = results[strategy]["timeline"]
        ax.plot([t for t, _ in timeline], [r for _, r in timeline], style, ms=3, label=LABELS[strategy])
    events = [(p.label, r["start_s"]) for p, r in zip(preset["phases"], results["auto"]["phases"], strict=True)]
    for label, t in events[1:]:
        ax.axvline(t, color="grey", ls="--", lw=1)
        ax.text(t, ax.get_ylim()[1] * 0.97, f" {label}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("time since the workload started (s)")
    ax.set_ylabel("forward tokens/s")
    ax.set_title(f"{preset['model']}: heterogeneous swarm ({shares})", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, png)
    return md, png


def _params(preset: dict, args) -> dict:
    """The preset as JSON (phases as label, duration and action) plus the options that change the run."""
    params = {k: v for k, v in preset.items() if k != "phases"}
    params["phases"] = [dataclasses.asdict(p) for p in preset["phases"]]
    return dict(params, throttle=args.throttle, update_period=args.update_period)


def main() -> int:
    parser = experiment_parser(__doc__, PRESETS, log_dir="keep the servers' logs here (default: a temp folder)")
    parser.add_argument("--throttle", choices=("auto", "cgroup-v2", "cgroup-v1", "sigstop"), default="auto")
    parser.add_argument(
        "--update-period",
        type=float,
        default=10.0,
        help="servers' DHT announcement period (s); records expire after 2.5 periods, and a server throttled to "
        "0.1 CPU under load missed 3 s periods (its records expired and it vanished from the swarm for a while)",
    )
    parser.add_argument("--replot", type=Path, help="only rewrite the table and plot from this run's JSON")
    args = parser.parse_args()
    if args.replot is not None:  # rewrite the table and plot of an earlier run from its JSON
        data = load(args.replot)
        preset = PRESETS[data["preset"]]
        args.machine = data["machine"]["note"]
        for res in data["results"].values():
            res["events"] = [[p.label, r["start_s"]] for p, r in zip(preset["phases"], res["phases"]) if p.action]
        md, png = write_outputs(
            data["results"], data["preset"], preset, out_dir(args), args, data["date"][:10], data["command"]
        )
        print(f"wrote {md} and {png}")
        return 0
    preset = PRESETS[args.preset]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the swarms and remove the cgroups on SIGTERM
    run = Run("heterogeneous", args)
    model_path = resolve_model(preset["model"])
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="corolla-hx-logs-"))
    print(f"throttle: {Throttle.detect() if args.throttle == 'auto' else args.throttle}; logs in {log_root}")
    cache = tempfile.mkdtemp(prefix="corolla-hx-cache-")  # the strategies' shared cache (see StrategyRun)
    swarms = [StrategyRun(strategy, preset, model_path, args, log_root, cache) for strategy in STRATEGIES]
    try:
        # both swarms start together (start-up is the slow part, especially for throttled servers); the idle one
        # waits while the other is measured
        for swarm in swarms:
            swarm.launch()
        for swarm in swarms:
            swarm.wait_ready()
        for swarm in swarms:
            began = time.monotonic()
            swarm.measure()
            swarm.result["measure_wall_s"] = round(time.monotonic() - began, 1)
            swarm.close()  # its servers must not take CPU from the next strategy's measurement
    finally:
        for swarm in swarms:
            swarm.close()
        shutil.rmtree(cache, ignore_errors=True)
    results = {swarm.strategy: swarm.result for swarm in swarms}
    run.save(params=_params(preset, args), results=results)
    md, png = write_outputs(results, args.preset, preset, run.out, args, run.started.date().isoformat(), run.command)
    print("\n" + md.read_text())
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
