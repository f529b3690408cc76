"""SWARM under churn, with real processes: a trainer's samples/s while stage peers are SIGKILLed and replaced, with
stage rebalancing on and off.

Each run starts a private swarm on loopback (``LocalSwarm``): a bootstrap peer, ``peers`` stage peers of a tiny
random-init Llama (``tests/fixtures/zoo.py``, 6 blocks) cut into ``stages`` stages, and one pipelined trainer (this
process) that trains for ``window_s`` seconds of wall time. Meanwhile a churn driver (a seeded ``random.Random``)
SIGKILLs a random live stage peer at exponential intervals (mean ``kill_mean_s``) and starts a fresh one (a new
name and identity) ``restart_delay_s`` later. Policies, each run with the same churn seeds (same kill times, same
victims by name), repeats interleaved:

* ``rebalance``: the initial peers are spread evenly but movable (``--stage i --rebalance on``), replacements start
  without ``--stage`` (a joiner takes the bottleneck stage); every peer re-evaluates the stages every
  ``rebalance_period_s`` (moves to an empty stage, or to the bottleneck when the pipeline gains > 10 %);
* ``random stage``: ``--rebalance off`` everywhere; the initial peers are spread evenly, a replacement serves a
  uniformly random stage (the reference experiment's baseline);
* ``same stage``: ``--rebalance off``; a replacement serves the stage of the peer it replaces (an operator restarting
  a crashed machine).

Measured per run: samples/s of the trainer (samples of the steps that finished / seconds since the churn started),
failed micro-batches, retried calls, moves (``Moving from stage`` in the peers' logs), seconds during which some
stage had no live ONLINE peer (a monitor reads the stage records every ``monitor_period_s`` and counts a record only
while its process is alive).

    python benchmarks/exp_swarm_churn.py --preset smoke --out /tmp/exp    # < 90 s
    python benchmarks/exp_swarm_churn.py --preset full                    # ~9 minutes -> docs/results/
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.experiment import experiment_parser, machine_line, save_figure  # noqa: E402
from benchmarks.results import Run  # noqa: E402

PRESETS = {
    "smoke": dict(
        stages=2, peers=3, window_s=10.0, kill_mean_s=5.0, restart_delay_s=2.0, repeats=1,
        policies=["rebalance", "random stage"], rebalance_period_s=2.0, seed=1,
    ),
    "full": dict(
        stages=3, peers=6, window_s=45.0, kill_mean_s=8.0, restart_delay_s=3.0, repeats=2,
        policies=["rebalance", "random stage", "same stage"], rebalance_period_s=3.0, seed=1,
    ),
}  # fmt: skip
# what every preset shares: the trainer's and the peers' settings
COMMON = dict(
    micro_batch_size=4,
    seq_len=32,
    samples_per_step=16,
    max_in_flight=8,
    target_batch_size=512,  # a stage's peers average every 512 samples (a round takes >= the matchmaking time)
    update_period_s=1.0,
    matchmaking_time_s=1.0,
    averaging_timeout_s=4.0,
    monitor_period_s=0.5,
    max_steps=2000,  # the pipelined trainer queues every step's micro-batches at its start: keep this bounded
)
POLICIES = ("rebalance", "random stage", "same stage")
MOVE_RE = re.compile(r"Moving from stage (\d+) to stage (\d+)")


class WindowOver(Exception):
    """Raised from the trainer's step callback once the measuring window is over (stops the trainer)."""


class Churn:
    """Starts the stage peers of one run and, once ``start()``ed, kills and replaces them on a seeded schedule."""

    def __init__(self, swarm, experiment: str, policy: str, preset: dict, seed: int, prefix: str):
        self.swarm, self.experiment, self.policy, self.preset = swarm, experiment, policy, preset
        self.prefix = prefix  # of the process names (unique in the swarm: each gets its own identity)
        self.rng = random.Random(seed)  # kill times and victims: the same for every policy
        self.placement = random.Random(seed + 1000)  # stages of the replacements (random stage policy)
        self.stage_of: dict[str, int | None] = {}  # name -> the stage it was told (None: it chooses)
        self.events: list[dict] = []
        self.killed: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._restarts = 0
        self.t0, self.t0_wall = 0.0, time.time()
        self.started = False

    def peer_args(self, stage: int | None) -> list[str]:
        p = self.preset
        args = ["--experiment", self.experiment, "--num-stages", str(p["stages"]), "--random-init"]
        args += ["--target-batch-size", str(COMMON["target_batch_size"])]
        args += ["--update-period-s", str(COMMON["update_period_s"])]
        args += ["--matchmaking-time-s", str(COMMON["matchmaking_time_s"])]
        args += ["--averaging-timeout-s", str(COMMON["averaging_timeout_s"])]
        if self.policy == "rebalance":
            args += ["--rebalance-period-s", str(p["rebalance_period_s"])]
            # an initial peer is told its stage (all policies start from the same even placement) but may move;
            # a replacement chooses its stage (the bottleneck) and may move
            return args if stage is None else [*args, "--stage", str(stage), "--rebalance", "on"]
        return [*args, "--stage", str(stage), "--rebalance", "off"]

    def start_peer(self, name: str, stage: int | None) -> None:
        self.stage_of[name] = stage
        self.swarm.start_stage_peer(name, self.peer_args(stage))

    def start_initial(self) -> list[str]:
        names = [f"{self.prefix}p{i}" for i in range(self.preset["peers"])]
        for i, name in enumerate(names):
            self.start_peer(name, i % self.preset["stages"])
        return names

    def alive(self, name: str) -> bool:
        process = self.swarm.processes.get(name)
        return process is not None and name not in self.killed and process.poll() is None

    def live_names(self) -> list[str]:
        return sorted(n for n in self.stage_of if self.alive(n))

    def start(self) -> None:
        self.t0, self.t0_wall, self.started = time.perf_counter(), time.time(), True
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def kill_all(self) -> None:
        """SIGKILL every peer of this run (the measurement is over: no need for a graceful exit) and reap them."""
        self._stop.set()
        for name in self.stage_of:
            if self.alive(name):
                self.swarm.kill(name)
                self.killed.add(name)
        for name in self.stage_of:
            try:
                self.swarm.processes[name].wait(timeout=10)
            except Exception:
                pass

    def _run(self) -> None:
        p = self.preset
        next_kill = self.rng.expovariate(1 / p["kill_mean_s"])
        restarts: list[tuple[float, str]] = []  # (when, name of the peer that died)
        while not self._stop.is_set():
            now = time.perf_counter() - self.t0
            if now >= p["window_s"]:
                return
            due = min([next_kill, *(t for t, _ in restarts)])
            if due > now:
                self._stop.wait(min(due - now, 0.2))
                continue
            if restarts and restarts[0][0] <= now:
                _, dead = restarts.pop(0)
                self._replace(dead, now)
                continue
            victims = self.live_names()
            pick = self.rng.random()
            next_kill += self.rng.expovariate(1 / p["kill_mean_s"])
            if not victims:
                continue
            victim = victims[int(pick * len(victims))]
            self.swarm.kill(victim)
            self.killed.add(victim)
            self.events.append(dict(t=round(now, 2), kind="kill", name=victim, stage=self.stage_of[victim]))
            restarts.append((now + p["restart_delay_s"], victim))

    def _replace(self, dead: str, now: float) -> None:
        name = f"{self.prefix}r{self._restarts}"
        self._restarts += 1
        if self.policy == "rebalance":
            stage = None
        elif self.policy == "same stage":
            stage = self.stage_of[dead]  # the stage it was told (peers of this policy never move)
        else:
            stage = self.placement.randrange(self.preset["stages"])
        self.start_peer(name, stage)
        self.events.append(dict(t=round(now, 2), kind="start", name=name, stage=stage, replaces=dead))


class Monitor:
    """Reads the stage records every ``period_s``: how many live ONLINE peers each stage has over time."""

    def __init__(self, swarm, experiment: str, num_stages: int, churn: Churn, period_s: float):
        self.swarm, self.experiment, self.num_stages = swarm, experiment, num_stages
        self.churn, self.period_s = churn, period_s
        self.samples: list[list[float]] = []  # [t, peers at stage 0, peers at stage 1, ...]
        self.names: list[list] = []  # [t, names at stage 0, names at stage 1, ...]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._dht = None

    def start(self) -> None:
        from corolla.net.dht_process import client_dht

        self._dht = client_dht(self.swarm.initial_peers)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._dht is not None:
            self._dht.shutdown()

    def _run(self) -> None:
        from corolla.net.dht_records import fetch_stage_peers

        names = {}
        while not self._stop.is_set():
            started = time.perf_counter()
            if not self.churn.started:
                self._stop.wait(0.05)
                continue
            try:
                found = fetch_stage_peers(
                    self._dht, experiment=self.experiment, num_stages=self.num_stages, timeout_s=3
                )
            except Exception:  # a slow read: the next one counts
                found = None
            if found is not None:
                if len(names) != len(self.swarm.peer_ids):
                    names = {peer: name for name, peer in dict(self.swarm.peer_ids).items()}
                live = [
                    sorted(
                        names.get(p.to_base58(), "?") for p, info in stage.items()
                        if info.state.name == "ONLINE" and self.churn.alive(names.get(p.to_base58(), ""))
                    )
                    for stage in found
                ]  # fmt: skip
                t = round(time.perf_counter() - self.churn.t0, 2)
                self.samples.append([t, *(len(x) for x in live)])
                self.names.append([t, *live])
            self._stop.wait(max(0.0, self.period_s - (time.perf_counter() - started)))

    def empty_stage_s(self, until_s: float) -> float:
        """Seconds (within 0..until_s) during which some stage had no live ONLINE peer."""
        total = 0.0
        for (t, *counts), (t_next, *_) in zip(self.samples, self.samples[1:]):
            if t < until_s and min(counts) == 0:
                total += min(t_next, until_s) - t
        return total


def wait_until_serving(swarm, churn: Churn, experiment: str, stages: int, names: list[str], timeout_s: float):
    """Wait until each of ``names`` still running is ONLINE and every stage has a peer (unlike
    ``LocalSwarm.wait_until_stages``, a peer that crashes meanwhile is counted, not fatal); name -> (stage, state)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = swarm.stage_peers(experiment, stages)
        online = {n: s for n, (s, state) in found.items() if state == "ONLINE"}
        running = [n for n in names if churn.alive(n)]
        if all(n in online for n in running) and set(online.values()) >= set(range(stages)):
            return found
        if not running or time.monotonic() > deadline:
            raise TimeoutError(f"stage peers not ONLINE after {timeout_s:.0f} s: {found}; running: {running}")
        time.sleep(0.5)


def run_once(swarm, model: str, policy: str, seed: int, preset: dict, index: int, log_root: Path) -> dict:
    """One run in ``swarm`` (its bootstrap peer is shared by the runs; each run has its own experiment name and
    peers, all SIGKILLed at its end)."""
    from corolla.net.peer_config import PeerConfig
    from corolla.training.config import DataConfig, ExperimentConfig, TrainerConfig
    from corolla.training.trainer import Trainer

    stages = preset["stages"]
    experiment = f"churn{index}"
    swarm.log_dir = log_dir = log_root / f"{index:02d}-{policy.replace(' ', '-')}-seed{seed}"
    began = time.perf_counter()
    churn = Churn(swarm, experiment, policy, preset, seed, prefix=f"x{index}")
    initial = churn.start_initial()
    try:
        swarm.wait_until_stages(experiment, stages, peers=initial, timeout_s=180)
        setup_s = time.perf_counter() - began
        placed = swarm.stage_peers(experiment, stages)
        initial_stages = [
            sum(1 for s, state in placed.values() if s == k and state == "ONLINE") for k in range(stages)
        ]
        monitor = Monitor(swarm, experiment, stages, churn, COMMON["monitor_period_s"])
        monitor.start()
        config = TrainerConfig(
            run=ExperimentConfig(model=model, experiment=experiment, num_stages=stages, random_init=True),
            network=PeerConfig(initial_peers=tuple(swarm.initial_peers)),
            data=DataConfig(micro_batch_size=COMMON["micro_batch_size"], seq_len=COMMON["seq_len"]),
            steps=COMMON["max_steps"],
            samples_per_step=COMMON["samples_per_step"],
            max_in_flight=COMMON["max_in_flight"],
            wait_for_peers_s=60,
            seed=seed,
        )
        series: list[list[float]] = []  # [t, cumulative samples, cumulative failed micro-batches]
        totals = dict(samples=0, failed=0, retried=0)

        def on_step(report) -> None:
            if not churn.started:  # the first step ends: training flows, the churn and the clock start
                churn.start()
                return
            totals["samples"] += report.samples
            totals["failed"] += report.failed_microbatches
            totals["retried"] += report.retried_calls
            t = time.perf_counter() - churn.t0
            series.append([round(t, 2), totals["samples"], totals["failed"]])
            if t >= preset["window_s"]:
                raise WindowOver

        finished_early = True
        trainer_log = logging.FileHandler(log_dir / "trainer.log")  # its retries and bans, for reading
        trainer_log.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(message)s", "%H:%M:%S"))
        trainer_logger = logging.getLogger("corolla.training.trainer")
        trainer_logger.addHandler(trainer_log)
        trainer_logger.setLevel(logging.INFO)
        trainer_logger.propagate = False
        try:
            Trainer(config, on_step=on_step).train()
        except WindowOver:
            finished_early = False
        finally:
            trainer_logger.removeHandler(trainer_log)
            trainer_log.close()
        churn.stop()
        monitor.stop()
        elapsed = series[-1][0] if series else float("nan")
    finally:
        churn.kill_all()
    moves, chose = [], 0
    for path in sorted(log_dir.glob(f"{churn.prefix}*.log")):
        text = path.read_text(errors="replace")
        for line in text.splitlines():
            found = MOVE_RE.search(line)
            if found:
                t = _log_time(line, churn.t0_wall)
                moves.append(dict(peer=path.stem, from_stage=int(found[1]), to_stage=int(found[2]), t=t))
        chose += text.count("Chose stage")
    in_window = [m for m in moves if m["t"] is not None and 0 <= m["t"] <= elapsed]
    trainer_text = (log_dir / "trainer.log").read_text(errors="replace")
    calls = [line for line in trainer_text.splitlines() if "banned it" in line]
    bans = dict(
        total=len(calls),
        # a peer that moved (or is moving) answers for another stage: banned from every stage for BAN_S
        moving_peer=sum("not serving a stage right now" in x or "this peer serves stage" in x for x in calls),
        nan_answer=sum("NaN or Inf" in x for x in calls),
    )
    crashed = []  # peers that exited on their own (not SIGKILLed by the churn or at the end)
    for name in churn.stage_of:
        code = swarm.processes[name].returncode
        if code is not None and code != -signal.SIGKILL:
            errors = [x for x in (log_dir / f"{name}.log").read_text(errors="replace").splitlines() if "Error" in x]
            crashed.append(dict(name=name, code=code, error=errors[-1][:300] if errors else ""))
    kills = [e for e in churn.events if e["kind"] == "kill"]
    row = dict(
        policy=policy,
        seed=seed,
        setup_s=round(setup_s, 1),
        initial_stage_peers=initial_stages,
        seconds=round(elapsed, 2),
        samples=totals["samples"],
        samples_per_s=totals["samples"] / elapsed if elapsed > 0 else 0.0,
        failed_microbatches=totals["failed"],
        retried_calls=totals["retried"],
        kills=len(kills),
        restarts=sum(1 for e in churn.events if e["kind"] == "start"),
        crashed=crashed,
        trainer_bans=bans,
        moves=len(in_window),
        setup_moves=sum(1 for m in moves if m["t"] is not None and m["t"] < 0),
        move_list=moves,
        joiners_chose=chose,
        empty_stage_s=round(monitor.empty_stage_s(elapsed), 2),
        finished_early=finished_early,
        events=churn.events,
        series=series,
        stage_peers=monitor.samples,
        stage_names=monitor.names,
        t0_wall=churn.t0_wall,
        log_dir=str(log_dir),
    )
    return row


def _log_time(line: str, t0_wall: float) -> float | None:
    """Seconds from ``t0_wall`` to the time stamp (HH:MM:SS.mmm, local time) that starts a peer's log line."""
    import datetime

    stamp = line[:12]
    try:
        clock = datetime.datetime.strptime(stamp, "%H:%M:%S.%f").time()
    except ValueError:
        return None
    ref = datetime.datetime.fromtimestamp(t0_wall)
    at = datetime.datetime.combine(ref.date(), clock)
    delta = (at - ref).total_seconds()
    if delta < -43200:  # past midnight
        delta += 86400
    return round(delta, 2)


def summarize(rows: list[dict], policies: list[str]) -> dict:
    out = {}
    for policy in policies:
        sel = [r for r in rows if r["policy"] == policy]
        rates = [r["samples_per_s"] for r in sel]
        out[policy] = dict(
            samples_per_s_mean=statistics.fmean(rates),
            samples_per_s_min=min(rates),
            samples_per_s_max=max(rates),
            failed_microbatches=sum(r["failed_microbatches"] for r in sel),
            retried_calls=sum(r["retried_calls"] for r in sel),
            moves=sum(r["moves"] for r in sel),
            kills=sum(r["kills"] for r in sel),
            crashed=sum(len(r["crashed"]) for r in sel),
            nan_answers=sum(r["trainer_bans"]["nan_answer"] for r in sel),
            moving_peer_bans=sum(r["trainer_bans"]["moving_peer"] for r in sel),
            empty_stage_s=sum(r["empty_stage_s"] for r in sel),
            seconds=sum(r["seconds"] for r in sel),
            runs=len(sel),
        )
    return out


def write_outputs(rows: list[dict], summary: dict, run: Run, args, preset: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    started = run.started.date().isoformat()
    lines = [
        f"## SWARM under churn ({run.preset})",
        "",
        f"- date: {started}; machine: {machine_line(args.machine)}",
        f"- command: `{run.command}`",
        f"- {preset['stages']} stages, {preset['peers']} stage peers (tiny Llama, 6 blocks, random init), one "
        f"pipelined trainer ({COMMON['max_in_flight']} micro-batches of {COMMON['micro_batch_size']} x "
        f"{COMMON['seq_len']} tokens in flight) for {preset['window_s']:g} s per run; a random live peer SIGKILLed "
        f"every {preset['kill_mean_s']:g} s on average (exponential), replaced by a fresh one "
        f"{preset['restart_delay_s']:g} s later; rebalancing period {preset['rebalance_period_s']:g} s",
        f"- {preset['repeats']} repeat(s) per policy, churn seeds shared across policies, runs interleaved",
        "",
        "| policy | samples/s: mean (range) | failed micro-batches | retried calls | moves | kills | crashed | "
        "stage empty (s) | seconds | NaN answers | bans of moving peers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, s in summary.items():
        lines.append(
            f"| {policy} | {s['samples_per_s_mean']:.1f} ({s['samples_per_s_min']:.1f}–{s['samples_per_s_max']:.1f}) "
            f"| {s['failed_microbatches']} | {s['retried_calls']} | {s['moves']} | {s['kills']} | {s['crashed']} | "
            f"{s['empty_stage_s']:.1f} | {s['seconds']:.0f} | {s['nan_answers']} | {s['moving_peer_bans']} |"
        )
    lines += ["", "Per run:", "", "| policy | seed | samples/s | failed | moves | kills | stage empty (s) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['seed']} | {r['samples_per_s']:.1f} | {r['failed_microbatches']} | {r['moves']} "
            f"| {r['kills']} | {r['empty_stage_s']:.1f} |"
        )
    lines.append("")
    run.path(".md").write_text("\n".join(lines))
    params = {**preset, **COMMON}
    run.save(params=params, results={"rows": rows, "summary": summary})

    colors = {p: c for p, c in zip(POLICIES, ("tab:blue", "tab:orange", "tab:green"))}
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    fig, axes = plt.subplots(1 + len(seeds), 1, figsize=(8, 2.6 + 2.4 * len(seeds)), squeeze=False)
    ax = axes[0][0]
    for r in rows:
        t = [0.0] + [x[0] for x in r["series"]]
        style = "-" if r["seed"] == seeds[0] else "--"
        label = f"{r['policy']}, seed {r['seed']}"
        ax.plot(t, [0] + [x[1] for x in r["series"]], color=colors[r["policy"]], linestyle=style, label=label)
    for e in rows[0]["events"]:
        if e["kind"] == "kill":
            ax.axvline(e["t"], color="grey", alpha=0.25, linewidth=0.8)
    ax.set_xlabel("seconds since the churn started (grey: kills, first seed)")
    ax.set_ylabel("samples trained")
    ax.set_title(f"SWARM under churn: {preset['stages']} stages, {preset['peers']} peers ({started})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for i, seed in enumerate(seeds):
        ax = axes[i + 1][0]
        for r in (r for r in rows if r["seed"] == seed):
            t = [x[0] for x in r["stage_peers"]]
            ax.step(t, [min(x[1:]) for x in r["stage_peers"]], where="post", color=colors[r["policy"]],
                    label=f"{r['policy']} ({r['samples_per_s']:.1f} samples/s)")  # fmt: skip
        ax.set_ylabel("peers at the\nsmallest stage")
        ax.set_xlabel(f"seconds (seed {seed})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, run.path(".png"))
    print("\n".join(lines))


def main() -> int:
    parser = experiment_parser(__doc__, PRESETS, log_dir="where the peers' logs go (default: a temp folder)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, help="override the preset's")
    parser.add_argument("--window-s", type=float, help="override the preset's training window")
    parser.add_argument("--repeats", type=int, help="override the preset's repeats")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.policies:
        preset["policies"] = args.policies
    if args.window_s:
        preset["window_s"] = args.window_s
    if args.repeats:
        preset["repeats"] = args.repeats

    from tests.fixtures.zoo import zoo_checkpoint

    from corolla.local_swarm import LocalSwarm

    model = str(zoo_checkpoint("llama"))
    from corolla.log import get_logger

    get_logger("corolla").setLevel(logging.WARNING)  # not the trainer's line per step
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # micro-batches abandoned when the window ends
    run = Run("swarm_churn", args)
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="corolla-exp-swarm-churn-"))
    rows = []
    index = 0
    env = dict(os.environ, COROLLA_LOGLEVEL="INFO")  # the peers' logs say when they chose or moved
    swarm = LocalSwarm(model=model, log_dir=log_root, env=env, start_timeout_s=180)
    with swarm:
        for repeat in range(preset["repeats"]):
            seed = preset["seed"] + repeat
            order = preset["policies"] if repeat % 2 == 0 else list(reversed(preset["policies"]))
            for policy in order:
                t0 = time.monotonic()
                row = run_once(swarm, model, policy, seed, preset, index, log_root)
                index += 1
                rows.append(row)
                print(
                    f"{policy:>13} seed {seed}: {row['samples_per_s']:.1f} samples/s over {row['seconds']:.0f} s, "
                    f"{row['failed_microbatches']} failed, {row['moves']} moves, {row['kills']} kills, stage empty "
                    f"{row['empty_stage_s']:.1f} s (setup {row['setup_s']:.0f} s, run {time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
    summary = summarize(rows, preset["policies"])
    write_outputs(rows, summary, run, args, preset)
    print(f"peer logs: {log_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
