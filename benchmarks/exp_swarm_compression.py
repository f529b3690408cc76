"""SWARM: what compressing activations on the wire and gradients in averaging does to convergence.

A tiny random-init Llama (``tests/fixtures/zoo.py``, 6 blocks, hidden 64) cut into 2 stages learns the next token of
a random Markov chain (``DataConfig(data="markov")``): no model can beat the chain's entropy rate, so the loss above
that floor says how far training got. Every setting trains the same init on the same batches (same seeds) with
AdamW, through its own stage peers (``corolla stage``) on loopback and a synchronous trainer (this process: each
step's micro-batches finish before the next step's start, so a setting with one peer per stage and no compression
is exactly training in one process, which is checked against the local reference):

* ``local``: the same model trained whole in this process (the exact reference, no swarm);
* ``1 peer/stage, wire NONE`` / ``1 peer/stage, wire 8-bit``: activations and their gradients between stages sent as
  float32, or 8-bit (``TrainerConfig.wire_compression``: BLOCKWISE_8BIT when bitsandbytes is installed, otherwise
  UNIFORM_8BIT, which corolla needs nothing more for);
* ``2 peers/stage, averaging NONE`` / ``size_adaptive`` / ``UNIFORM_8BIT``: two peers per stage split the
  micro-batches and average their gradients every target batch (``--averaging-compression``). size_adaptive sends
  tensors of fewer than 65,537 elements as float16 and larger ones as 8-bit: every tensor of this tiny model is
  smaller, so here it is float16 throughout; UNIFORM_8BIT shows what 8-bit averaging does.

Reported per setting: the loss curve, the loss above the floor after the last steps (mean of the last 10), the first
step at which the loss (mean of 10 steps) is within 0.2 nat of the floor, the averaging rounds the stages ran and
the samples they held, and the bytes each codec puts on the wire (exact message sizes of one micro-batch's calls;
for averaging, the compressed size of one copy of a stage's gradients, which is what each of 2 peers sends per
round in hivemind's butterfly all-reduce). Settings run one after the other, each with fresh stage peers.

    python benchmarks/exp_swarm_compression.py --preset smoke --out /tmp/exp   # < 60 s, 3 settings
    python benchmarks/exp_swarm_compression.py --preset full                   # ~5-6 min -> docs/results/
"""

from __future__ import annotations

import importlib.util
import logging
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.experiment import experiment_parser, machine_line, save_figure  # noqa: E402
from benchmarks.results import Run  # noqa: E402

WIRE_8BIT = "BLOCKWISE_8BIT" if importlib.util.find_spec("bitsandbytes") is not None else "UNIFORM_8BIT"
LOCAL = "local (one process, exact)"
WIRE_NONE = "1 peer/stage, wire NONE"
WIRE_8 = "1 peer/stage, wire 8-bit"
AVG_NONE = "2 peers/stage, averaging NONE"
AVG_ADAPTIVE = "2 peers/stage, averaging size_adaptive"
AVG_8 = "2 peers/stage, averaging UNIFORM_8BIT"
SETTINGS = {  # name -> (peers per stage, wire compression, averaging compression)
    WIRE_NONE: (1, "NONE", "NONE"),
    WIRE_8: (1, WIRE_8BIT, "NONE"),
    AVG_NONE: (2, "NONE", "NONE"),
    AVG_ADAPTIVE: (2, "NONE", "size_adaptive"),
    AVG_8: (2, "NONE", "UNIFORM_8BIT"),
}
PRESETS = {
    # smoke: every peer of its 3 settings starts at once (startup dominates); full: fresh peers per setting
    "smoke": dict(settings=[WIRE_NONE, WIRE_8, AVG_ADAPTIVE], steps=12, start_all_at_once=True),
    "full": dict(settings=list(SETTINGS), steps=160, start_all_at_once=False),
}
COMMON = dict(
    stages=2, micro_batch=8, seq_len=32, samples_per_step=16, lr=3e-3, markov_vocab_size=16, markov_seed=0, seed=0,
    matchmaking_time_s=1.0, averaging_timeout_s=20.0, smooth=10, margin=0.2,
)  # fmt: skip


def data_config(c: dict):
    from corolla.training.config import DataConfig

    return DataConfig(
        data="markov", markov_vocab_size=c["markov_vocab_size"], markov_seed=c["markov_seed"], seq_len=c["seq_len"],
        micro_batch_size=c["micro_batch"], data_seed=c["seed"],
    )  # fmt: skip


def trainer_config(model: str, swarm, experiment: str, c: dict, steps: int, wire: str):
    from corolla.net.peer_config import PeerConfig
    from corolla.training.config import ExperimentConfig, TrainerConfig

    return TrainerConfig(
        run=ExperimentConfig(
            model=model, experiment=experiment, num_stages=c["stages"], random_init=True, init_seed=c["seed"]
        ),
        network=PeerConfig(initial_peers=tuple(swarm.initial_peers)),
        data=data_config(c),
        steps=steps,
        samples_per_step=c["samples_per_step"],
        max_in_flight=4,
        synchronous=True,
        wire_compression=wire,
        forward_timeout_s=60,
        backward_timeout_s=90,
        wait_for_peers_s=120,
        refresh_period_s=1.0,
    )


def peer_args(c: dict, experiment: str, stage: int, averaging: str) -> list[str]:
    return [
        "--experiment", experiment, "--num-stages", str(c["stages"]), "--stage", str(stage), "--random-init",
        "--init-seed", str(c["seed"]), "--target-batch-size", str(c["samples_per_step"]), "--lr", str(c["lr"]),
        "--matchmaking-time-s", str(c["matchmaking_time_s"]), "--averaging-timeout-s", str(c["averaging_timeout_s"]),
        "--averaging-compression", averaging, "--update-period-s", "2",
    ]  # fmt: skip


def peer_names(index: int, setting: str, c: dict) -> list[str]:
    per_stage = SETTINGS[setting][0]
    return [f"c{index}-s{s}{'ab'[k]}" for s in range(c["stages"]) for k in range(per_stage)]


# ---- measurements ------------------------------------------------------------------------------------------------
def train_locally(model: str, c: dict, steps: int) -> list[float]:
    """The same model, init and batches trained whole in this process: the loss of each step."""
    import torch

    from corolla.models.stages import load_training_model
    from corolla.training.trainer import training_batches

    net = load_training_model(model, random_init=True, seed=c["seed"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=c["lr"], weight_decay=0.0)
    batches = training_batches(data_config(c))
    per_step = c["samples_per_step"] // c["micro_batch"]
    losses = []
    for _ in range(steps):
        step = []
        for _ in range(per_step):
            ids = next(batches)
            loss = net(input_ids=ids, labels=ids).loss
            (loss / per_step).backward()
            step.append(float(loss.detach()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(statistics.mean(step))
    return losses


def rounds_from_logs(log_dir: Path, names: list[str]) -> dict:
    """Per stage: optimizer steps with 2 peers averaged / alone, failed rounds, samples the stage held per step."""
    done = re.compile(r"epoch (\d+) done \((\d+) samples here, (\d+) peer\(s\) averaged\)")
    stages: dict[int, dict] = {}
    for name in names:
        stage = int(name.split("-s")[1][:-1])
        text = (log_dir / f"{name}.log").read_text(errors="replace")
        epochs = [(int(e), int(s), int(n)) for e, s, n in done.findall(text)]
        entry = stages.setdefault(stage, dict(averaged=0, alone=0, failed=0, samples={}))
        entry["averaged"] = max(entry["averaged"], sum(1 for *_, n in epochs if n >= 2))
        entry["alone"] += sum(1 for *_, n in epochs if n == 1)
        entry["failed"] += len(re.findall(r"averaging round of epoch \d+ failed", text))
        for epoch, samples, _ in epochs:
            entry["samples"][epoch] = entry["samples"].get(epoch, 0) + samples
    return {
        f"stage {s}": dict(
            optimizer_steps=len(e["samples"]),
            rounds_averaged_with_2=e["averaged"],
            stepped_alone=e["alone"],
            failed_rounds=e["failed"],
            mean_samples_per_step=statistics.mean(e["samples"].values()) if e["samples"] else None,
        )
        for s, e in sorted(stages.items())
    }


def wire_bytes(c: dict, hidden: int, codec: str) -> int:
    """Bytes of the messages of one micro-batch's calls (requests and replies, as the trainer and peers pack them)."""
    import torch

    from corolla.net.tensors import pack, pack_response
    from corolla.protocol.stage_messages import StageBackward, StageForward, StageReply

    ids = torch.randint(0, c["markov_vocab_size"], (c["micro_batch"], c["seq_len"]))
    states = torch.randn(c["micro_batch"], c["seq_len"], hidden)
    last = c["stages"] - 1
    mid = "0123abcd:0:0"

    def meta(schema, stage: int) -> dict:
        return schema(experiment="x", stage=stage, microbatch_id=mid, output_compression=codec).model_dump()

    reply = StageReply(compute_s=0.01, epoch=0, loss=2.0, accumulated=True).model_dump()
    messages = []
    for stage in range(last):
        messages.append(pack([ids if stage == 0 else states], meta(StageForward, stage), compression=codec))
        messages.append(pack_response([states], reply, compression=codec))
    messages.append(pack([states, ids], meta(StageBackward, last), compression=codec))
    messages.append(pack_response([states], reply, compression=codec))
    for stage in reversed(range(last)):
        messages.append(pack([ids if stage == 0 else states, states], meta(StageBackward, stage), compression=codec))
        messages.append(pack_response([] if stage == 0 else [states], reply, compression=codec))
    return sum(m.ByteSize() for m in messages)


def averaging_bytes(model: str, c: dict, codecs: list[str]) -> dict[str, list[int]]:
    """Codec -> per stage, the compressed size of one copy of the stage's gradients (each tensor compressed whole,
    as hivemind's size_adaptive decides by the whole tensor's size)."""
    import torch
    from hivemind.compression import CompressionInfo

    from corolla.models.stages import StageLayout, load_training_model, split_stage
    from corolla.training.stage_averaging import averaging_compression

    net = load_training_model(model, random_init=True, seed=c["seed"])
    layout = StageLayout.even(net.config.num_hidden_layers, c["stages"])
    stages = [[p for p in split_stage(net, s, layout).parameters() if p.requires_grad] for s in range(c["stages"])]
    sizes = {}
    for codec in codecs:
        compression = averaging_compression(codec)
        sizes[codec] = [
            sum(
                compression.compress(g, CompressionInfo.from_tensor(g, key=i)).ByteSize()
                for i, g in enumerate(torch.randn_like(p) * 1e-3 for p in params)
            )
            for params in stages
        ]
    return sizes


def curve_summary(losses: list[float], floor: float, c: dict) -> dict:
    window = c["smooth"]
    smoothed = [statistics.mean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    reached = next((i for i, v in enumerate(smoothed) if i >= window - 1 and v < floor + c["margin"]), None)
    return dict(
        losses=losses,
        final_above_floor=statistics.mean(losses[-window:]) - floor,
        steps_to_margin=reached,  # None: not within the margin in this run
        first_loss=losses[0],
    )


def run_setting(
    model: str,
    swarm,
    index: int,
    setting: str,
    c: dict,
    steps: int,
    log_dir: Path,
    start: bool,
    leaving: list,
    slow_exits: list,
):
    """Train through the setting's stage peers (started here unless ``start`` is False); they are sent SIGTERM
    afterwards and appended to ``leaving`` (the next setting waits for them to exit before it trains; one that
    takes over 60 s is killed and its pid appended to ``slow_exits``)."""
    from corolla.training.trainer import Trainer

    per_stage, wire, averaging = SETTINGS[setting]
    names = peer_names(index, setting, c)
    started = time.perf_counter()
    if start:
        for name in names:
            swarm.start_stage_peer(name, peer_args(c, f"c{index}", int(name.split("-s")[1][:-1]), averaging))
    swarm.wait_until_stages(f"c{index}", c["stages"], peers=names, timeout_s=180)
    while leaving:  # the previous setting's peers exit while these start; none of them is left when this trains
        process = leaving.pop()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # noted in the results; its log says how far its shutdown got
            print(f"a stage peer (pid {process.pid}) did not exit within 60 s of SIGTERM: killing it")
            slow_exits.append(process.pid)
            process.kill()
            process.wait(timeout=30)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    reports = Trainer(trainer_config(model, swarm, f"c{index}", c, steps, wire)).train()
    seconds = time.perf_counter() - started
    for name in names:  # their logs hold every step already (unbuffered); they leave while the next ones start
        swarm.kill(name, signal.SIGTERM)
        leaving.append(swarm.processes[name])
    return dict(
        peers_per_stage=per_stage,
        wire_compression=wire,
        averaging_compression=averaging,
        losses=[r.loss for r in reports],
        failed_microbatches=sum(r.failed_microbatches for r in reports),
        retried_calls=sum(r.retried_calls for r in reports),
        startup_s=startup,
        train_s=seconds,
        stages=rounds_from_logs(log_dir, names),
    )


def measure(preset: dict, c: dict, model: str, log_dir: Path) -> tuple[dict, dict]:
    from corolla.local_swarm import LocalSwarm
    from corolla.training.data import MarkovSource

    floor = MarkovSource(vocab_size=c["markov_vocab_size"], seed=c["markov_seed"]).entropy_rate()
    steps, rows = preset["steps"], {}
    started = time.perf_counter()
    rows[LOCAL] = dict(peers_per_stage=0, wire_compression="-", averaging_compression="-", failed_microbatches=0,
                       retried_calls=0, train_s=0.0, losses=train_locally(model, c, steps), stages={})  # fmt: skip
    rows[LOCAL]["train_s"] = time.perf_counter() - started
    with LocalSwarm(model=model, log_dir=log_dir, start_timeout_s=180) as swarm:
        settings = preset["settings"]
        if preset["start_all_at_once"]:
            for index, setting in enumerate(settings):
                for name in peer_names(index, setting, c):
                    stage = int(name.split("-s")[1][:-1])
                    swarm.start_stage_peer(name, peer_args(c, f"c{index}", stage, SETTINGS[setting][2]))
        leaving: list = []
        slow_exits: list[int] = []
        for index, setting in enumerate(settings):
            rows[setting] = run_setting(
                model, swarm, index, setting, c, steps, log_dir, not preset["start_all_at_once"], leaving, slow_exits
            )
            r = rows[setting]
            print(
                f"{setting:<40} final loss - floor {statistics.mean(r['losses'][-c['smooth'] :]) - floor:.3f}, "
                f"startup {r['startup_s']:.0f} s, {steps} steps in {r['train_s']:.0f} s, failed "
                f"{r['failed_microbatches']}, rounds {[s['rounds_averaged_with_2'] for s in r['stages'].values()]}",
                flush=True,
            )
        print(f"all settings trained after {time.perf_counter() - started:.0f} s", flush=True)
    print(f"peers stopped after {time.perf_counter() - started:.0f} s", flush=True)
    for row in rows.values():
        row.update(curve_summary(row.pop("losses"), floor, c))
    return rows, dict(floor=floor, slow_exits=slow_exits)


def byte_sizes(model: str, c: dict) -> dict:
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(model).hidden_size
    wire = {codec: wire_bytes(c, hidden, codec) for codec in ("NONE", WIRE_8BIT)}
    averaging = averaging_bytes(model, c, ["NONE", "size_adaptive", "UNIFORM_8BIT"])
    return dict(
        wire_bytes_per_microbatch=wire,
        wire_ratio=wire[WIRE_8BIT] / wire["NONE"],
        averaging_bytes_per_round_per_peer=averaging,
        averaging_ratio={k: sum(v) / sum(averaging["NONE"]) for k, v in averaging.items()},
    )


# ---- outputs -----------------------------------------------------------------------------------------------------
def _rounds(row: dict) -> str:
    if not row["stages"]:
        return "-"
    per_stage = [s["rounds_averaged_with_2"] if row["peers_per_stage"] > 1 else s["optimizer_steps"] for s in
                 row["stages"].values()]  # fmt: skip
    samples = [s["mean_samples_per_step"] or 0 for s in row["stages"].values()]
    return f"{min(per_stage)} ({statistics.mean(samples):.0f} samples each)"


def table(results: dict) -> str:
    lines = [
        "| setting | loss − floor, last 10 steps | steps to floor + 0.2 | optimizer steps per stage (samples each) "
        "| failed micro-batches |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["settings"].items():
        reached = "not reached" if r["steps_to_margin"] is None else str(r["steps_to_margin"])
        lines.append(
            f"| {name} | {r['final_above_floor']:.3f} | {reached} | {_rounds(r)} | {r['failed_microbatches']} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, params: dict, run: Run, args) -> None:
    b = results["bytes"]
    wire, avg = b["wire_bytes_per_microbatch"], b["averaging_bytes_per_round_per_peer"]
    lines = [
        f"# SWARM: wire and averaging compression vs convergence (preset {args.preset})",
        "",
        f"- date: {run.started.date().isoformat()}; machine: {machine_line(args.machine)}",
        f"- command: `{run.command}`",
        f"- tiny Llama (6 blocks, hidden 64, random init), {params['stages']} stages, Markov chain of "
        f"{params['markov_vocab_size']} tokens (floor {results['floor']:.3f} nat), micro-batch {params['micro_batch']}"
        f" x {params['seq_len']}, {params['samples_per_step']} samples per step (= target batch size), AdamW lr "
        f"{params['lr']:g}, synchronous trainer, {params['steps']} steps",
        f"- wire bytes per micro-batch (all calls): NONE {wire['NONE']:,}, {WIRE_8BIT} {wire[WIRE_8BIT]:,} "
        f"({b['wire_ratio']:.2f}x)",
        "- averaged bytes per round and peer (one compressed copy of the stage's gradients), stages "
        + ", ".join(f"{k} {'/'.join(f'{x:,}' for x in v)} ({b['averaging_ratio'][k]:.2f}x)" for k, v in avg.items()),
        f"- 1 peer/stage, wire NONE equals the local run: max |loss difference| {results['max_diff_vs_local']:.2g}",
        "",
        table(results),
    ]
    run.path(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    window = params["smooth"]
    styles = {LOCAL: ("black", ":"), WIRE_NONE: ("#4c72b0", "-"), WIRE_8: ("#55a868", "--")}
    styles |= {AVG_NONE: ("#c44e52", "-"), AVG_ADAPTIVE: ("#dd8452", "--"), AVG_8: ("#8172b2", "-.")}
    for name, r in results["settings"].items():
        losses = r["losses"]
        smoothed = [statistics.mean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        above = [max(v - results["floor"], 1e-3) for v in smoothed]
        color, style = styles.get(name, ("gray", "-"))
        ax.plot(range(len(above)), above, label=name, color=color, linestyle=style, linewidth=1.4)
    ax.axhline(params["margin"], color="gray", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("trainer step")
    ax.set_ylabel(f"loss − entropy floor (nat), mean of {window} steps")
    ax.set_title("tiny Llama on a Markov chain: compression on the wire and in averaging", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, run.path(".png"))


def main() -> int:
    parser = experiment_parser(__doc__, PRESETS, log_dir="where the stage peers' logs go (default: a temp folder)")
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset["steps"] = args.steps
    from tests.fixtures.zoo import zoo_checkpoint

    from corolla.log import get_logger

    get_logger("corolla").setLevel(logging.WARNING)  # not the trainer's line per step
    run = Run("swarm_compression", args)
    model = str(zoo_checkpoint("llama"))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="corolla-exp-swarm-compression-"))
    rows, info = measure(preset, COMMON, model, log_dir)
    results = dict(
        floor=info["floor"],
        stage_peers_slow_to_exit=len(info["slow_exits"]),
        wire_8bit_codec=WIRE_8BIT,
        settings=rows,
        bytes=byte_sizes(model, COMMON),
        max_diff_vs_local=max(
            abs(a - b) for a, b in zip(rows[LOCAL]["losses"], rows[WIRE_NONE]["losses"], strict=True)
        ),
    )
    params = COMMON | dict(steps=preset["steps"], settings=preset["settings"], synchronous=True,
                           start_all_at_once=preset["start_all_at_once"], model="tiny-llama (zoo)")  # fmt: skip
    print()
    print(table(results))
    run.save(params=params, results=results)
    write_outputs(results, params, run, args)
    print(f"stage peer logs: {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
