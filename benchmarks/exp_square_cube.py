"""The square-cube law in miniature: SWARM training over an emulated Internet link, relative to the same swarm on
unshaped links, for Llama-shaped models of growing hidden size.

A block's compute grows as hidden² per token, the activations it sends to the next stage as hidden: the bigger the
blocks, the smaller the share of time spent on the network, so throughput over a slow link approaches throughput on
a fast one. Here: a model of 2 Llama blocks (hidden H, intermediate 4H, heads of 64, random init, a 512-token
vocabulary) cut into 2 stages, one stage peer each, and one pipelined trainer; each process in its own host of the
network lab (benchmarks/netlab; the bootstrap peer shares the trainer's host). For each H the same swarm is measured
with every host's link unshaped (veth, no delay or rate limit: "loopback") and shaped (``rtt_ms`` between any two
hosts, ``rate_mbit`` each way), with the trainer's wire compression NONE and UNIFORM_8BIT, in an interleaved
order; the lab checks its shaping (TCP probes) every time it changes it and stops if it is off.

Reported: samples/s of the trainer (after ``warmup_steps`` steps) in each setting and the ratio lab / loopback.

Needs root and the network lab's tools (``make netlab-deps``); otherwise it says why and exits with status 2.

    sudo .venv/bin/python benchmarks/exp_square_cube.py --preset smoke --out /tmp/exp   # < 2 minutes
    sudo .venv/bin/python benchmarks/exp_square_cube.py --preset full                  # ~9 minutes -> docs/results/
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.experiment import experiment_parser, machine_line, save_figure  # noqa: E402
from benchmarks.netlab import Lab, LabError, LinkShape, unavailable_reason  # noqa: E402
from benchmarks.results import Run  # noqa: E402

PRESETS = {
    # bandwidth_s: each of the lab's bandwidth checks (3 pairs of hosts, once per hidden size) transfers this long
    "smoke": dict(
        hiddens=[64, 256], steps={64: 5, 256: 4}, repeats=1, rtt_ms=50.0, rate_mbit=100.0, bandwidth_s=1.0,
    ),
    "full": dict(
        hiddens=[64, 256, 512, 1024], steps={64: 40, 256: 24, 512: 12, 1024: 6}, repeats=2, rtt_ms=50.0,
        rate_mbit=100.0, bandwidth_s=2.0,
    ),
}  # fmt: skip
COMMON = dict(
    layers=2,
    micro_batch_size=4,
    seq_len=64,
    samples_per_step=16,  # 4 micro-batches per step
    max_in_flight=8,
    warmup_steps=1,
    target_batch_size=64,
    vocab_size=512,
)
# 8-bit: hivemind's UNIFORM_8BIT (pure torch); BLOCKWISE_8BIT needs bitsandbytes on every peer, which corolla does
# not install (a trainer asking for it gets ImportErrors from the peers)
COMPRESSIONS = ("NONE", "UNIFORM_8BIT")
HOSTS = ["trainer", "s0", "s1"]
HOST_OF = {"bootstrap": "trainer", "stage0": "s0", "stage1": "s1"}


def model_folder(hidden: int) -> Path:
    """A checkpoint folder with only the config of a ``hidden``-sized Llama (the peers draw its weights with
    ``--random-init``; the trainer's Markov data needs no tokenizer)."""
    from transformers import LlamaConfig

    folder = Path(tempfile.gettempdir()) / f"corolla-square-cube-h{hidden}-l{COMMON['layers']}"
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=COMMON["vocab_size"],
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=COMMON["layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    return folder


def block_parameters(hidden: int) -> int:
    """Weights of one block: q, k, v, o (hidden x hidden each, full-size KV heads) and the MLP (3 x hidden x 4
    hidden), plus two norms."""
    return 4 * hidden * hidden + 3 * hidden * 4 * hidden + 2 * hidden


def measure(model: str, swarm, experiment: str, compression: str, steps: int) -> dict:
    """One trainer run; samples/s over the steps after the warm-up."""
    from corolla.net.peer_config import PeerConfig
    from corolla.training.config import DataConfig, ExperimentConfig, TrainerConfig
    from corolla.training.trainer import Trainer

    warmup = COMMON["warmup_steps"]
    config = TrainerConfig(
        run=ExperimentConfig(model=model, experiment=experiment, num_stages=2, random_init=True),
        network=PeerConfig(initial_peers=tuple(swarm.initial_peers)),
        data=DataConfig(micro_batch_size=COMMON["micro_batch_size"], seq_len=COMMON["seq_len"]),
        steps=warmup + steps,
        samples_per_step=COMMON["samples_per_step"],
        max_in_flight=COMMON["max_in_flight"],
        wire_compression=compression,
        wait_for_peers_s=60,
    )
    started = time.perf_counter()
    reports = Trainer(config).train()
    wall_s = time.perf_counter() - started
    timed = reports[warmup:]
    samples, seconds = sum(r.samples for r in timed), sum(r.seconds for r in timed)
    return dict(
        samples_per_s=samples / seconds,
        samples=samples,
        seconds=seconds,
        wall_s=wall_s,
        failed_microbatches=sum(r.failed_microbatches for r in reports),
        retried_calls=sum(r.retried_calls for r in reports),
        loss_first=reports[0].loss,
        loss_last=reports[-1].loss,
    )


def run_hidden(lab: Lab, hidden: int, preset: dict, log_root: Path, shaped: LinkShape) -> tuple[dict, list]:
    from corolla.local_swarm import LocalSwarm

    model = str(model_folder(hidden))
    experiment = f"sqcube{hidden}"
    lab.shape(LinkShape(), verify=False)

    def process_args(name: str) -> list[str]:
        return ["--host-maddrs", f"/ip4/{lab.address(HOST_OF[name])}/tcp/0"]

    swarm = LocalSwarm(
        model=model,
        command_prefix=lambda name: lab.prefix(HOST_OF[name]),
        process_args=process_args,
        log_dir=log_root / f"h{hidden}",
        start_timeout_s=300,
    )
    measurements: dict[tuple[str, str], list[dict]] = {}
    checks = []
    with swarm:
        for stage in range(2):
            args = ["--experiment", experiment, "--num-stages", "2", "--random-init", "--stage", str(stage)]
            args += ["--target-batch-size", str(COMMON["target_batch_size"]), "--update-period-s", "2"]
            swarm.start_stage_peer(f"stage{stage}", args)
        swarm.wait_until_stages(experiment, 2, peers=["stage0", "stage1"], timeout_s=300)
        for repeat in range(preset["repeats"]):
            links = ["loopback", "lab"] if repeat % 2 == 0 else ["lab", "loopback"]
            for i, link in enumerate(links):
                shape = shaped if link == "lab" else LinkShape()
                report = lab.shape(shape, bandwidth=link == "lab" and repeat == 0)  # LabError if the lab is off
                rtts = [v["measured"] for v in report["rtt_ms"].values()]
                check = dict(hidden=hidden, link=link, probe_rtt_ms=statistics.median(rtts))
                if report["bandwidth_mbit"]:
                    measured = [v["measured"] for v in report["bandwidth_mbit"].values()]
                    check["probe_mbit_min"], check["probe_mbit_max"] = min(measured), max(measured)
                checks.append(check)
                order = COMPRESSIONS if (repeat + i) % 2 == 0 else tuple(reversed(COMPRESSIONS))
                for compression in order:
                    result = measure(model, swarm, experiment, compression, preset["steps"][hidden])
                    result.update(hidden=hidden, link=link, compression=compression, repeat=repeat)
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
                          flush=True)  # fmt: skip
                    measurements.setdefault((link, compression), []).append(result)
    lab.shape(LinkShape(), verify=False)
    row = dict(hidden=hidden, block_parameters=block_parameters(hidden), layers=COMMON["layers"])
    # bytes of one activation (or its gradient) between the stages, float32
    row["activation_bytes"] = COMMON["micro_batch_size"] * COMMON["seq_len"] * hidden * 4
    for compression in COMPRESSIONS:
        tag = compression.lower()
        loop = [m["samples_per_s"] for m in measurements[("loopback", compression)]]
        over = [m["samples_per_s"] for m in measurements[("lab", compression)]]
        row[f"{tag}_loopback_sps"] = statistics.fmean(loop)
        row[f"{tag}_lab_sps"] = statistics.fmean(over)
        row[f"{tag}_ratio"] = _ratio(row[f"{tag}_lab_sps"], row[f"{tag}_loopback_sps"])
        # ratio of each repeat (its loopback and lab measurements, taken next to each other)
        row[f"{tag}_ratio_repeats"] = [_ratio(o, lo) for o, lo in zip(over, loop)]
        failed = [m["failed_microbatches"] for key, ms in measurements.items() if key[1] == compression for m in ms]
        row[f"{tag}_failed_microbatches"] = sum(failed)
    row["measurements"] = [m for ms in measurements.values() for m in ms]
    return row, checks


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def write_outputs(rows: list[dict], checks: list[dict], run: Run, args, preset: dict, lab_mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    started = run.started.date().isoformat()
    lines = [
        f"## Square-cube law in miniature ({run.preset})",
        "",
        f"- date: {started}; machine: {machine_line(args.machine)}",
        f"- command: `sudo {run.command}`",
        f"- 2 stages x 1 Llama block (hidden H, intermediate 4H), one peer each, one pipelined trainer "
        f"({COMMON['max_in_flight']} micro-batches of {COMMON['micro_batch_size']} x {COMMON['seq_len']} tokens in "
        f"flight), each in its own lab host ({lab_mode}); lab = {preset['rtt_ms']:g} ms RTT between hosts, "
        f"{preset['rate_mbit']:g} Mbit/s per link; loopback = the same hosts, links unshaped",
        f"- samples/s after {COMMON['warmup_steps']} warm-up step; mean of {preset['repeats']} interleaved repeat(s)",
        "",
        "| hidden | block params | activation / micro-batch | "
        + " | ".join(f"{c}: loopback | lab | lab / loopback" for c in COMPRESSIONS)
        + " |",
        "|---|---|---|" + "---|---|---|" * len(COMPRESSIONS),
    ]
    for r in rows:
        cells = [f"{r['hidden']}", f"{r['block_parameters'] / 1e6:.2f} M", f"{r['activation_bytes'] / 2**10:.0f} KiB"]
        for c in (c.lower() for c in COMPRESSIONS):
            cells += [f"{r[f'{c}_loopback_sps']:.1f}", f"{r[f'{c}_lab_sps']:.1f}", f"**{r[f'{c}_ratio']:.2f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Shaping checks (median TCP RTT between hosts; bandwidth where measured):", ""]
    for c in checks:
        bw = f", {c['probe_mbit_min']:.0f}–{c['probe_mbit_max']:.0f} Mbit/s" if "probe_mbit_min" in c else ""
        lines.append(f"- H={c['hidden']}, {c['link']}: RTT {c['probe_rtt_ms']:.1f} ms{bw}")
    lines.append("")
    run.path(".md").write_text("\n".join(lines))
    params = {**preset, **COMMON, "lab_mode": lab_mode, "steps": {str(k): v for k, v in preset["steps"].items()}}
    run.save(params=params, results={"rows": rows, "checks": checks})

    hiddens = [r["hidden"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for compression, color in zip(COMPRESSIONS, ("tab:blue", "tab:orange")):
        tag = compression.lower()
        ax1.plot(hiddens, [r[f"{tag}_ratio"] for r in rows], "o-", color=color, label=compression)
        for r in rows:
            ax1.plot([r["hidden"]] * len(r[f"{tag}_ratio_repeats"]), r[f"{tag}_ratio_repeats"], ".", color=color,
                     alpha=0.5)  # fmt: skip
        ax2.plot(
            hiddens, [r[f"{tag}_loopback_sps"] for r in rows], "o-", color=color, label=f"{compression}, loopback"
        )
        ax2.plot(hiddens, [r[f"{tag}_lab_sps"] for r in rows], "s--", color=color, label=f"{compression}, lab")
    ax1.axhline(1.0, color="grey", linewidth=0.8)
    ax1.set_ylim(0, 1.2)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(hiddens, [str(h) for h in hiddens])
        ax.set_xlabel("hidden size")
        ax.grid(alpha=0.3)
    ax1.set_ylabel(f"samples/s: lab ({preset['rtt_ms']:g} ms, {preset['rate_mbit']:g} Mbit/s) / loopback")
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("trainer samples/s")
    ax2.legend(fontsize=7)
    fig.suptitle(f"Square-cube law: SWARM training over a slow link vs loopback ({started}, {args.machine})",
                 fontsize=9)  # fmt: skip
    save_figure(fig, run.path(".png"))
    print("\n".join(lines))


def main() -> int:
    parser = experiment_parser(__doc__, PRESETS, log_dir="where the peers' logs go (default: a temp folder)")
    parser.add_argument("--hiddens", nargs="+", type=int, help="override the preset's hidden sizes")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.hiddens:
        preset["hiddens"] = args.hiddens
        preset["steps"] = {h: preset["steps"].get(h, 6) for h in args.hiddens}
    reason = unavailable_reason()
    if reason:
        print(f"error: cannot run the network lab here: {reason}", file=sys.stderr)
        return 2
    from corolla.log import get_logger

    get_logger("corolla").setLevel(logging.WARNING)  # not the trainer's line per step
    run = Run("square_cube", args)
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="corolla-exp-square-cube-"))
    shaped = LinkShape(delay_ms=preset["rtt_ms"] / 4, rate_mbit=preset["rate_mbit"])
    rows, checks = [], []
    try:
        with Lab(hosts=HOSTS, bandwidth_s=preset["bandwidth_s"]) as lab:
            lab.enter("trainer")  # this process is the trainer: its sockets and helpers live in the lab
            for hidden in preset["hiddens"]:
                t0 = time.monotonic()
                row, row_checks = run_hidden(lab, hidden, preset, log_root, shaped)
                rows.append(row)
                checks += row_checks
                print(f"hidden {hidden}: {time.monotonic() - t0:.0f} s", flush=True)
            mode = lab.mode
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_outputs(rows, checks, run, args, preset, mode)
    print(f"peer logs: {log_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
