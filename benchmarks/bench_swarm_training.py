"""SWARM training throughput: a pipelined trainer through stage peers (one or two per stage) vs the same model
trained in one process, measured in the same run.

Three setups train the same model (same init, micro-batch, AdamW and learning rate) side by side:

* ``local (transformers, 1 thread)``: the whole model in this process, one torch thread, gradient accumulation over
  the step's micro-batches, then an AdamW step;
* ``swarm, 1 peer/stage``: ``stages`` stage peers (``corolla stage``, one torch thread each) and a pipelined trainer
  (this process; ``max_in_flight`` micro-batches in flight, no ``--synchronous``); a peer alone in its stage steps
  as soon as it holds the target batch (= the trainer's samples per step);
* ``swarm, 2 peers/stage``: two peers per stage, which average their gradients (hivemind all-reduce, the default
  ``size_adaptive`` compression) every target batch before they step.

The setups are measured in interleaved rounds, one phase per swarm (only one swarm is alive at a time: a SmolLM2 stage
peer holds 2.5-3 GB, its stage with gradients and AdamW moments and the averager's shared buffers): each round runs a
window of ``window_steps`` steps of the local setup and of the phase's swarm, the order alternating from round to
round, so the machine's drift hits them alike. A swarm window is a fresh trainer whose first step (the pipeline filling
up) is not counted; a setup's throughput in a window is the counted samples / their seconds. The ratio swarm / local
(samples/s over samples/s of the same round: above 1, the swarm is faster) is reported as median and range over rounds.
The stage peers' logs say how many averaging rounds each 2-peer stage ran ("2 peer(s) averaged"), how many samples an
epoch really held, and whether a peer ever stepped alone; the CPU used by this process (the local model, or the
trainer) and by the stage peers (with their DHT, p2pd and averager processes) is recorded per window, in cores.

Prints a markdown table and writes the results (JSON), the table (``.md``) and a bar chart (``.png``); see
``benchmarks/results.py``.

    python benchmarks/bench_swarm_training.py --preset smoke    # tiny Llama, < 60 s, to a temp folder
    python benchmarks/bench_swarm_training.py --preset full     # SmolLM2-135M, ~8 min -> docs/results/
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.experiment import machine_line  # noqa: E402
from benchmarks.results import Run, add_output_args, save_figure  # noqa: E402


@dataclass(frozen=True)
class Preset:
    model: str  # "tiny-llama" (tests/fixtures/zoo.py) or a bundled name
    random_init: bool
    data: str  # DataConfig.data
    stages: int
    micro_batch: int
    seq_len: int
    micro_batches_per_step: int
    max_in_flight: int
    window_steps: int  # counted steps per window (a swarm window runs one more, uncounted)
    rounds: int
    lr: float
    matchmaking_time_s: float
    averaging_timeout_s: float
    settle_s: float  # pause after a swarm window (a round of averaging that started at its end finishes)

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch * self.micro_batches_per_step


PRESETS = {
    "smoke": Preset(
        model="tiny-llama", random_init=True, data="markov", stages=2, micro_batch=2, seq_len=16,
        micro_batches_per_step=2, max_in_flight=4, window_steps=3, rounds=2, lr=1e-3, matchmaking_time_s=1.0,
        averaging_timeout_s=20.0, settle_s=0.5,
    ),
    "full": Preset(
        model="smollm2-135m", random_init=False, data="python-help", stages=2, micro_batch=4, seq_len=128,
        micro_batches_per_step=2, max_in_flight=4, window_steps=2, rounds=3, lr=1e-4, matchmaking_time_s=1.0,
        averaging_timeout_s=60.0, settle_s=2.0,
    ),
}  # fmt: skip
# full: 2 stages, not 3. With 3, the 2-peer phase (6 SmolLM2 stage peers, ~2.5-3 GB each, plus this process's
# local model, ~3.9 GB) ran out of memory on a 23 GiB machine three times; 4 peers of half the model fit.
LOCAL = "local (transformers, 1 thread)"
ONE = "swarm, 1 peer/stage"
TWO = "swarm, 2 peers/stage"
SWARMS = {ONE: ("one", 1), TWO: ("two", 2)}  # setup -> (experiment, peers per stage)
TIMEOUTS = dict(forward_timeout_s=120.0, backward_timeout_s=300.0)  # a busy 2-core machine: no spurious retries


def model_folder(name: str) -> str:
    if name == "tiny-llama":
        from tests.fixtures.zoo import zoo_checkpoint

        return str(zoo_checkpoint("llama"))
    from corolla.models.bundled import ensure_bundled_checkpoint

    return str(ensure_bundled_checkpoint(name))


def data_config(p: Preset, seed: int):
    from corolla.training.config import DataConfig

    return DataConfig(data=p.data, seq_len=p.seq_len, micro_batch_size=p.micro_batch, data_seed=seed)


# ---- the local setup ---------------------------------------------------------------------------------------------
class Local:
    """The whole model trained in this process, one window of steps at a time."""

    def __init__(self, folder: str, p: Preset):
        import torch

        from corolla.models.stages import load_training_model
        from corolla.training.trainer import training_batches

        self.p = p
        self.model = load_training_model(folder, random_init=p.random_init, seed=0)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=p.lr, weight_decay=0.0)
        self.batches = training_batches(data_config(self.p, 0), tokenizer_folder=folder)

    def window(self, steps: int) -> dict:
        per_step = self.p.micro_batches_per_step
        seconds, losses = [], []
        for _ in range(steps):
            started = time.perf_counter()
            step_losses = []
            for _ in range(per_step):
                ids = next(self.batches)
                loss = self.model(input_ids=ids, labels=ids).loss
                (loss / per_step).backward()
                step_losses.append(float(loss.detach()))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - started)
            losses.append(statistics.mean(step_losses))
        return dict(samples=steps * self.p.samples_per_step, seconds=sum(seconds), losses=losses, failed=0, retried=0)


# ---- the swarm setups --------------------------------------------------------------------------------------------
def peer_args(p: Preset, experiment: str, stage: int) -> list[str]:
    args = ["--experiment", experiment, "--num-stages", str(p.stages), "--stage", str(stage)]
    args += ["--target-batch-size", str(p.samples_per_step), "--lr", str(p.lr), "--num-threads", "1"]
    args += ["--matchmaking-time-s", str(p.matchmaking_time_s), "--averaging-timeout-s", str(p.averaging_timeout_s)]
    # no backups: each peer would hold a second stage's state (parameters and AdamW moments, 12 bytes/parameter),
    # and six SmolLM2 stage peers plus their copies do not fit one 23 GiB machine; this measures the pipeline
    args += ["--backup-period-s", "0"]
    return args + (["--random-init"] if p.random_init else [])


def peer_names(setup: str, p: Preset) -> list[str]:
    experiment, per_stage = SWARMS[setup]
    return [f"{experiment}-s{s}{'ab'[k]}" for s in range(p.stages) for k in range(per_stage)]


def swarm_window(folder: str, swarm, setup: str, p: Preset, steps: int, seed: int) -> dict:
    """One trainer of ``steps`` + 1 steps; the first (the pipeline filling up) is not counted."""
    from corolla.net.peer_config import PeerConfig
    from corolla.training.config import ExperimentConfig, TrainerConfig
    from corolla.training.trainer import Trainer

    experiment, _ = SWARMS[setup]
    config = TrainerConfig(
        run=ExperimentConfig(model=folder, experiment=experiment, num_stages=p.stages, random_init=p.random_init),
        network=PeerConfig(initial_peers=tuple(swarm.initial_peers)),
        data=data_config(p, seed),
        steps=steps + 1,
        samples_per_step=p.samples_per_step,
        max_in_flight=p.max_in_flight,
        synchronous=False,
        refresh_period_s=1.0,
        wait_for_peers_s=120.0,
        **TIMEOUTS,
    )
    started = time.perf_counter()
    reports = Trainer(config).train()
    wall = time.perf_counter() - started
    counted = reports[1:]
    return dict(
        samples=sum(r.samples for r in counted),
        seconds=sum(r.seconds for r in counted),
        losses=[r.loss for r in counted],
        failed=sum(r.failed_microbatches for r in reports),
        retried=sum(r.retried_calls for r in reports),
        first_step_s=reports[0].seconds,
        overhead_s=wall - sum(r.seconds for r in reports),  # the trainer's DHT start and first read of the records
    )


def cpu_seconds(processes) -> float:
    """User + system CPU seconds of these processes and all their descendants (DHT process, p2pd, averager)."""
    import psutil

    total = 0.0
    for process in processes:
        try:
            root = psutil.Process(process.pid)
            for proc in [root, *root.children(recursive=True)]:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
    return total


def averaging_from_logs(log_dir: Path, names: list[str]) -> dict:
    """Per stage peer: epochs stepped with 2 peers / alone, failed rounds, and the samples of each of its epochs."""
    done = re.compile(r"epoch (\d+) done \((\d+) samples here, (\d+) peer\(s\) averaged\)")
    peers = {}
    for name in names:
        text = (log_dir / f"{name}.log").read_text(errors="replace")
        epochs = done.findall(text)
        peers[name] = dict(
            averaged_with_2=sum(1 for _, _, n in epochs if n == "2"),
            stepped_alone=sum(1 for _, _, n in epochs if n == "1"),
            failed_rounds=len(re.findall(r"averaging round of epoch \d+ failed", text)),
            epoch_samples=[int(s) for _, s, _ in epochs],
        )
    return peers


# ---- the run -----------------------------------------------------------------------------------------------------
def measure(p: Preset, folder: str, log_dir: Path) -> tuple[dict, dict]:
    """One phase per swarm setup (only one swarm is alive at a time: a SmolLM2 stage peer holds ~2 GB); in each,
    rounds of one local window and one swarm window, the order alternating. Every swarm window is paired with the
    local window of its round."""
    import psutil
    import torch

    from corolla.local_swarm import LocalSwarm

    torch.set_num_threads(1)  # like each stage peer
    windows: dict[str, list[dict]] = {LOCAL: [], ONE: [], TWO: []}
    info: dict = {"startup_s": {}, "warmup_s": {}, "averaging": {}}
    me = psutil.Process()
    local = Local(folder, p)
    local.window(1)  # warm-up: AdamW's state, first allocations; not counted
    with LocalSwarm(model=folder, log_dir=log_dir, start_timeout_s=300) as swarm:
        for phase, setup in enumerate((ONE, TWO)):
            experiment, _ = SWARMS[setup]
            names = peer_names(setup, p)
            started = time.perf_counter()
            for name in names:
                swarm.start_stage_peer(name, peer_args(p, experiment, int(name.split("-s")[1][:-1])))
            swarm.wait_until_stages(experiment, p.stages, peers=names, timeout_s=300)
            info["startup_s"][setup] = time.perf_counter() - started
            print(f"{setup}: {len(names)} stage peers ONLINE after {info['startup_s'][setup]:.0f} s", flush=True)
            peers = [swarm.processes[n] for n in [*names, "bootstrap"]]

            def run_window(which: str, steps: int, seed: int, peers=peers) -> dict:
                own, others, started = sum(me.cpu_times()[:2]), cpu_seconds(peers), time.perf_counter()
                if which == LOCAL:
                    result = local.window(steps)
                else:
                    result = swarm_window(folder, swarm, which, p, steps, seed)
                wall = time.perf_counter() - started
                result["own_cpu_cores"] = (sum(me.cpu_times()[:2]) - own) / wall  # this process (local or trainer)
                result["peers_cpu_cores"] = (cpu_seconds(peers) - others) / wall  # stage peers, their helpers
                result["wall_s"] = wall
                if which != LOCAL:
                    time.sleep(p.settle_s)
                return result

            started = time.perf_counter()
            run_window(setup, 1, seed=1000 + phase)  # warm-up: the peers' first steps; not counted
            info["warmup_s"][setup] = time.perf_counter() - started
            for r in range(p.rounds):
                order = [LOCAL, setup] if (r + phase) % 2 == 0 else [setup, LOCAL]
                pair = {}
                for which in order:
                    pair[which] = result = run_window(which, p.window_steps, seed=100 * phase + r)
                    print(
                        f"round {r}: {which:<32} {result['samples'] / result['seconds']:.3f} samples/s "
                        f"({result['samples']} samples in {result['seconds']:.1f} s), CPU: this process "
                        f"{result['own_cpu_cores']:.2f} cores, stage peers {result['peers_cpu_cores']:.2f} cores",
                        flush=True,
                    )
                pair[setup]["local_samples_per_s"] = pair[LOCAL]["samples"] / pair[LOCAL]["seconds"]
                windows[LOCAL].append(pair[LOCAL])
                windows[setup].append(pair[setup])
            for name in names:  # SIGTERM: the peers leave; wait for them (and their helpers) to exit
                swarm.kill(name, signal.SIGTERM)
            for name in names:
                swarm.processes[name].wait(timeout=60)
            info["averaging"].update(averaging_from_logs(log_dir, names))
    return windows, info


def summarize(windows: dict[str, list[dict]], info: dict, p: Preset) -> dict:
    setups = {}
    for setup, results in windows.items():
        rates = [w["samples"] / w["seconds"] for w in results]
        ratios = [rate / w.get("local_samples_per_s", rate) for rate, w in zip(rates, results, strict=True)]
        setups[setup] = dict(
            samples_per_s=statistics.median(rates),
            samples_per_s_rounds=rates,
            tokens_per_s=statistics.median(rates) * p.seq_len,
            ratio=statistics.median(ratios),
            ratio_range=[min(ratios), max(ratios)],
            ratio_rounds=ratios,
            failed_microbatches=sum(w["failed"] for w in results),
            retried_calls=sum(w["retried"] for w in results),
            own_cpu_cores=statistics.median(w["own_cpu_cores"] for w in results),
            peers_cpu_cores=statistics.median(w["peers_cpu_cores"] for w in results),
        )
        if setup != LOCAL:
            setups[setup]["window_overhead_s"] = statistics.median(w["overhead_s"] for w in results)
            setups[setup]["first_step_s"] = statistics.median(w["first_step_s"] for w in results)
            setups[setup]["startup_s"] = info["startup_s"][setup]
    peers = info["averaging"]
    stages = {}
    for setup in (ONE, TWO):
        experiment, _ = SWARMS[setup]
        for s in range(p.stages):
            names = [n for n in peers if n.startswith(f"{experiment}-s{s}")]
            epochs = [peers[n]["epoch_samples"] for n in names]
            totals = [sum(col) for col in zip(*epochs, strict=False)]  # samples of the stage per epoch
            stages[f"{experiment} stage {s}"] = dict(
                peers=names,
                rounds_averaged_with_2=min(peers[n]["averaged_with_2"] for n in names),
                stepped_alone=sum(peers[n]["stepped_alone"] for n in names),
                failed_rounds=sum(peers[n]["failed_rounds"] for n in names),
                epochs=max(len(e) for e in epochs),
                mean_samples_per_epoch=statistics.mean(totals) if totals else None,
            )
    two = [v for k, v in stages.items() if k.startswith("two ")]
    averaging = dict(
        stages=stages,
        peers=peers,
        rounds_averaged=min(v["rounds_averaged_with_2"] for v in two),  # every 2-peer stage averaged this often
        stepped_alone=sum(v["stepped_alone"] for v in two),
        failed_rounds=sum(v["failed_rounds"] for v in two),
        mean_samples_per_round=statistics.mean(v["mean_samples_per_epoch"] or 0 for v in two),
        ok=all(v["rounds_averaged_with_2"] > 0 and v["stepped_alone"] == 0 for v in two),
    )
    return dict(setups=setups, averaging=averaging, rounds=p.rounds)


def table(results: dict, p: Preset) -> str:
    rows = [
        "| setup | samples/s, median (range) | tokens/s | vs local: median (range) | CPU cores used | "
        "failed / retried calls |",
        "|---|---|---|---|---|---|",
    ]
    for setup, r in results["setups"].items():
        rates = r["samples_per_s_rounds"]
        lo, hi = r["ratio_range"]
        rows.append(
            f"| {setup} | {r['samples_per_s']:.3g} ({min(rates):.3g}–{max(rates):.3g}) | {r['tokens_per_s']:.0f} | "
            f"{r['ratio']:.2f}x ({lo:.2f}–{hi:.2f}) | {r['own_cpu_cores'] + r['peers_cpu_cores']:.2f} | "
            f"{r['failed_microbatches']} / {r['retried_calls']} |"
        )
    return "\n".join(rows) + "\n"


def write_outputs(results: dict, p: Preset, run: Run, args) -> None:
    av = results["averaging"]
    lines = [
        f"# SWARM training throughput vs local training (preset {args.preset})",
        "",
        f"- date: {run.started.date().isoformat()}; machine: {machine_line(args.machine)}",
        f"- command: `{run.command}`",
        f"- {p.model} ({'random init' if p.random_init else 'pretrained weights'}), {p.stages} stages, micro-batch "
        f"{p.micro_batch} x {p.seq_len} tokens, {p.samples_per_step} samples per step (= target batch size), "
        f"AdamW lr {p.lr:g}, pipelined trainer (max {p.max_in_flight} micro-batches in flight); "
        f"{p.rounds} interleaved rounds of {p.window_steps} counted steps per setup",
        f"- 2 peers/stage: every stage averaged {av['rounds_averaged']} or more rounds with 2 peers "
        f"(size_adaptive compression, matchmaking {p.matchmaking_time_s:g} s), {av['mean_samples_per_round']:.1f} "
        f"samples per round on average (target {p.samples_per_step}); steps taken alone: {av['stepped_alone']}, "
        f"failed rounds: {av['failed_rounds']}",
        "- CPU cores used: this process (the local model, or the trainer) plus the stage peers and their helper "
        "processes, during the windows (median); idle stage peers poll the DHT during local windows",
        "",
        table(results, p),
    ]
    run.path(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(results["setups"])[::-1]
    rates = [results["setups"][s]["samples_per_s"] for s in setups]
    lows = [r - min(results["setups"][s]["samples_per_s_rounds"]) for s, r in zip(setups, rates, strict=True)]
    highs = [max(results["setups"][s]["samples_per_s_rounds"]) - r for s, r in zip(setups, rates, strict=True)]
    fig, ax = plt.subplots(figsize=(7.5, 3))
    ax.barh(setups, rates, xerr=[lows, highs], capsize=4, color=["#c44e52", "#dd8452", "#4c72b0"][-len(setups) :])
    for y, s in enumerate(setups):
        ratio = results["setups"][s]["ratio"]
        ax.text(rates[y], y, f"  {ratio:.2f}x local", va="center", fontsize=9)
    ax.set_xlim(0, max(rates) * 1.45)
    ax.set_xlabel("samples/s, median of rounds (bars: range)")
    ax.set_title(
        f"SWARM training, {p.model}, {p.stages} stages, {p.micro_batch}x{p.seq_len} tokens per micro-batch, CPU",
        fontsize=10,
    )
    save_figure(fig, run.path(".png"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--rounds", type=int, help="override the preset's number of rounds")
    parser.add_argument("--log-dir", type=Path, help="where the stage peers' logs go (default: a temp folder)")
    add_output_args(parser)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    if args.rounds:
        p = Preset(**(asdict(p) | {"rounds": args.rounds}))
    from corolla.log import get_logger

    get_logger("corolla").setLevel(logging.WARNING)  # not the trainer's line per step
    run = Run("swarm_training", args)
    folder = model_folder(p.model)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="corolla-bench-swarm-training-"))
    windows, info = measure(p, folder, log_dir)
    results = summarize(windows, info, p)
    results["windows"] = windows
    print()
    print(table(results, p))
    av = results["averaging"]
    print(f"2 peers/stage: >= {av['rounds_averaged']} averaging rounds per stage, {av['stepped_alone']} steps alone")
    if not av["ok"]:
        print("WARNING: a 2-peer stage never averaged, or a peer stepped alone: see the logs in", log_dir)
    run.save(params=asdict(p) | dict(samples_per_step=p.samples_per_step, timeouts=TIMEOUTS), results=results)
    write_outputs(results, p, run, args)
    print(f"stage peer logs: {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
