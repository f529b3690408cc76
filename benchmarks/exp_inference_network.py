"""Inference vs network: steps/s of one sequence through a 3-server swarm over an emulated network, push on and off.

Every process runs in its own host of the network lab (benchmarks/netlab): the client, the bootstrap peer and three
servers. Every host's link gets the same one-way delay RTT/4 (so every pair of hosts has the RTT) and the same rate.
For each (rate, RTT) the lab re-checks its own shaping (TCP probes) before measuring and refuses to go on if it is
off. A step is one new token's hidden state through all blocks (``InferenceSession.step``, after a short prefill);
the client-side embeddings and LM head are not part of it.

The bound for each setting is the step time measured at RTT 0 (same rate, same push mode: compute, serialization,
transfer) plus the propagation delay of the chain: client->s1->s2->s3->client (4 one-way hops = 2 RTT) with push,
one client<->server round trip per server (3 RTT) without.

Models: SmolLM2-135M (bundled; 3 x 10 blocks, hidden 576) and a Llama-2-70B-shaped span (hidden 8192, intermediate
28672, 64 heads, 8 KV heads, random bfloat16 weights, 3 blocks, one per server; its messages are 70B-sized).

    sudo .venv/bin/python benchmarks/exp_inference_network.py --preset smoke --out /tmp/exp
    sudo .venv/bin/python benchmarks/exp_inference_network.py --preset full            # -> docs/results/
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.experiment import experiment_parser, machine_line, save_figure  # noqa: E402
from benchmarks.netlab import (  # noqa: E402
    Lab,
    LabError,
    LinkShape,
    shaping,  # noqa: E402
    unavailable_reason,
)
from benchmarks.results import Run  # noqa: E402

# bandwidth_s: each of the lab's bandwidth checks (10 pairs of hosts, once per rate) transfers this long
PRESETS = {
    "smoke": dict(
        models=["smollm2"], rtts=[0, 40], rates=[100], steps={"smollm2": 6}, prefill=8, warmup=1, bandwidth_s=1.0
    ),
    # SmolLM2 only, 8 rows: ~5 minutes on a 2-core machine (full: ~25)
    "medium": dict(
        models=["smollm2"],
        rtts=[0, 50, 100, 200],
        rates=[1000, 20],
        steps={"smollm2": 20},
        prefill=16,
        warmup=2,
        bandwidth_s=2.0,
    ),  # fmt: skip
    "full": dict(
        models=["smollm2", "llama70b"],
        rtts=[0, 10, 50, 100, 200],
        rates=[1000, 100, 20],
        steps={"smollm2": 20, "llama70b": 6},
        prefill=16,
        warmup=2,
        bandwidth_s=2.0,
    ),
}
HOSTS = ["client", "boot", "s1", "s2", "s3"]
SERVER_HOSTS = ["s1", "s2", "s3"]
LLAMA70B_SHAPE = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
LLAMA70B_VERSION = 1


def llama70b_shaped_checkpoint(num_layers: int = 3) -> Path:
    """A random bfloat16 checkpoint with Llama-2-70B's block shapes, ``num_layers`` blocks and a tiny vocabulary
    (built once into the temp folder, ~1.7 GB per block)."""
    import os
    import shutil
    import tempfile

    import torch
    from tests.fixtures.zoo import build_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    dest = Path(tempfile.gettempdir()) / f"corolla-bench-llama70b-shaped-l{num_layers}-v{LLAMA70B_VERSION}"
    if (dest / ".complete").is_file():
        return dest
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=512,
        num_hidden_layers=num_layers,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LLAMA70B_SHAPE,
    )
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(tmp), max_shard_size="2GB")
    tokenizer.save_pretrained(str(tmp))
    del model
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return dest


def model_setup(key: str) -> dict:
    import torch

    if key == "smollm2":
        from corolla.models.bundled import ensure_bundled_checkpoint

        path = ensure_bundled_checkpoint("smollm2-135m")
        return dict(label="SmolLM2-135M (3 x 10 blocks, hidden 576, fp32)", path=path, hidden=576,
                    dtype=torch.float32, spans=["0:10", "10:20", "20:30"])  # fmt: skip
    if key == "llama70b":
        path = llama70b_shaped_checkpoint(3)
        return dict(label="Llama-2-70B-shaped (3 x 1 block, hidden 8192, bf16)", path=path, hidden=8192,
                    dtype=torch.bfloat16, spans=["0:1", "1:2", "2:3"])  # fmt: skip
    raise ValueError(key)


def measure(blocks, *, hidden: int, dtype, steps: int, prefill: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` single-token inference steps (after a prefill and ``warmup`` steps)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with blocks.inference_session(max_length=prefill + warmup + steps) as session:
        session.step(torch.randn(1, prefill, hidden, generator=gen).to(dtype))
        for _ in range(warmup):
            session.step(torch.randn(1, 1, hidden, generator=gen).to(dtype))
        times = []
        for _ in range(steps):
            x = torch.randn(1, 1, hidden, generator=gen).to(dtype)
            started = time.perf_counter()
            session.step(x)
            times.append(time.perf_counter() - started)
    return times


def run_model(lab: Lab, key: str, preset: dict, out: Path) -> list[dict]:
    from corolla.client.config import ClientConfig
    from corolla.client.remote_sequential import RemoteSequential
    from corolla.client.swarm import SwarmView
    from corolla.local_swarm import LocalSwarm
    from corolla.models.checkpoint import default_dht_prefix

    setup = model_setup(key)
    model = str(setup["path"])
    num_blocks = int(setup["spans"][-1].split(":")[1])
    host_of = {"bootstrap": "boot", **{f"server{i}": h for i, h in enumerate(SERVER_HOSTS)}}
    lab.shape(LinkShape(), verify=False)

    def process_args(name: str) -> list[str]:
        args = ["--host-maddrs", f"/ip4/{lab.address(host_of[name])}/tcp/0"]
        if name != "bootstrap":  # a fixed throughput: don't spend minutes measuring 70B-sized blocks
            args += ["--throughput", "1.0", "--join-jitter", "0", "--num-threads", "1"]
        return args

    rows = []
    swarm = LocalSwarm(
        model=model,
        command_prefix=lambda name: lab.prefix(host_of[name]),
        process_args=process_args,
        log_dir=Path(tempfile.gettempdir()) / "corolla-exp-inference-network-logs" / key,
        start_timeout_s=600,
    )
    with swarm:
        for i, span in enumerate(setup["spans"]):
            swarm.start_server(f"server{i}", ["--blocks", span])
        swarm.wait_until_served(num_blocks, min_servers=len(setup["spans"]))
        views = {}
        for push in (True, False):
            config = ClientConfig(initial_peers=tuple(swarm.initial_peers), push=push, step_timeout_s=120)
            view = SwarmView.connect(
                config=config, num_blocks=num_blocks, model_name=model, dht_prefix=default_dht_prefix(model)
            )
            views[push] = (view, RemoteSequential(view))
        try:
            for rate in preset["rates"]:
                for i, rtt in enumerate(preset["rtts"]):
                    shape = LinkShape(delay_ms=rtt / 4, rate_mbit=rate)
                    report = lab.shape(shape, bandwidth=(i == 0))  # raises LabError if the lab is off
                    probe_rtt = statistics.median(v["measured"] for v in report["rtt_ms"].values())
                    row = dict(model=key, rate_mbit=rate, rtt_ms=rtt, probe_rtt_ms=probe_rtt)
                    if report["bandwidth_mbit"]:  # every pair of hosts was measured: the slowest and fastest
                        measured = [v["measured"] for v in report["bandwidth_mbit"].values()]
                        row["probe_mbit"], row["probe_mbit_max"] = min(measured), max(measured)
                    row["probe_pairs"] = len(report["rtt_ms"])
                    for push in (True, False) if i % 2 == 0 else (False, True):
                        times = measure(
                            views[push][1],
                            hidden=setup["hidden"],
                            dtype=setup["dtype"],
                            steps=preset["steps"][key],
                            prefill=preset["prefill"],
                            warmup=preset["warmup"],
                        )
                        tag = "push" if push else "nopush"
                        row[f"{tag}_ms"] = statistics.median(times) * 1e3
                        row[f"{tag}_mean_ms"] = statistics.fmean(times) * 1e3
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            for view, _ in views.values():
                view.shutdown()
    lab.shape(LinkShape(), verify=False)
    return rows


def add_bounds(rows: list[dict]) -> None:
    """Bound of each row = its (model, rate)'s step time at RTT 0 + the chain's propagation delay at its RTT."""
    client, servers = "client", SERVER_HOSTS
    for row in rows:
        base = next(
            (r for r in rows if (r["model"], r["rate_mbit"], r["rtt_ms"]) == (row["model"], row["rate_mbit"], 0)),
            None,
        )
        if base is None:
            continue
        shapes = {h: LinkShape(delay_ms=row["rtt_ms"] / 4) for h in HOSTS}
        for push, tag in ((True, "push"), (False, "nopush")):
            row[f"{tag}_bound_ms"] = shaping.step_bound_ms(
                shapes, client, servers, push=push, base_ms=base[f"{tag}_ms"]
            )


def write_outputs(rows: list[dict], labels: dict[str, str], run: Run, args, params: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preset_name, started, command = run.preset, run.started.date().isoformat(), "sudo " + run.command
    lines = [
        f"## Inference vs network ({preset_name})",
        "",
        f"- date: {started}; machine: {machine_line(args.machine)}",
        f"- command: `{command}`",
        "- every host's link: one-way delay RTT/4 (any two hosts are RTT apart), rate as given; the lab checked",
        "  its shaping before each row (probe RTT = measured median TCP echo between two hosts)",
        "- steps/s = 1 / median step time; bound = step time at RTT 0 (same rate, same mode) + propagation delay",
        "  (push: client->s1->s2->s3->client = 2 RTT; no push: 3 RTT)",
        "",
        "| model | rate | RTT | probe RTT | push ms/step | bound | no-push ms/step | bound | push steps/s | "
        "no-push steps/s | push gain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gain = r["nopush_ms"] / r["push_ms"]
        lines.append(
            f"| {r['model']} | {r['rate_mbit']:g} Mbit/s | {r['rtt_ms']:g} ms | {r['probe_rtt_ms']:.1f} ms | "
            f"{r['push_ms']:.1f} | {r.get('push_bound_ms', float('nan')):.1f} | {r['nopush_ms']:.1f} | "
            f"{r.get('nopush_bound_ms', float('nan')):.1f} | {1e3 / r['push_ms']:.2f} | "
            f"{1e3 / r['nopush_ms']:.2f} | {gain:.2f}x |"
        )
    lines += ["", "Models: " + "; ".join(f"{k} = {v}" for k, v in labels.items()), ""]
    run.path(".md").write_text("\n".join(lines))
    run.save(params=params, results={"rows": rows, "labels": labels})

    models = list(dict.fromkeys(r["model"] for r in rows))
    rates = list(dict.fromkeys(r["rate_mbit"] for r in rows))
    fig, axes = plt.subplots(len(models), len(rates), figsize=(4.2 * len(rates), 3.6 * len(models)), squeeze=False)
    for mi, model in enumerate(models):
        for ri, rate in enumerate(rates):
            ax = axes[mi][ri]
            sel = [r for r in rows if r["model"] == model and r["rate_mbit"] == rate]
            sel.sort(key=lambda r: r["rtt_ms"])
            x = [r["rtt_ms"] for r in sel]
            for tag, color, label in (("push", "tab:blue", "push"), ("nopush", "tab:orange", "no push")):
                ax.plot(x, [1e3 / r[f"{tag}_ms"] for r in sel], "o-", color=color, label=f"{label} (measured)")
                if all(f"{tag}_bound_ms" in r for r in sel):
                    ax.plot(x, [1e3 / r[f"{tag}_bound_ms"] for r in sel], "--", color=color, label=f"{label} (bound)")
            ax.set_title(f"{model}, {rate:g} Mbit/s", fontsize=10)
            ax.set_xlabel("RTT between hosts (ms)")
            ax.set_ylabel("steps/s")
            ax.grid(alpha=0.3)
            if mi == 0 and ri == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"Inference steps/s vs network, 3 servers ({started}, {args.machine})", fontsize=10)
    save_figure(fig, run.path(".png"))
    print("\n".join(lines))


def main() -> int:
    parser = experiment_parser(__doc__, PRESETS)
    parser.add_argument("--models", nargs="+", choices=["smollm2", "llama70b"], help="override the preset's")
    parser.add_argument("--rtts", nargs="+", type=float, help="override the preset's RTTs (ms)")
    parser.add_argument("--rates", nargs="+", type=float, help="override the preset's rates (Mbit/s)")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    for key in ("models", "rtts", "rates"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    if 0 not in preset["rtts"]:
        preset["rtts"] = [0, *preset["rtts"]]  # the bound needs the RTT-0 step time
    reason = unavailable_reason()
    if reason:
        print(f"error: cannot run the network lab here: {reason}", file=sys.stderr)
        return 2
    run = Run("inference_network", args)
    rows, labels = [], {}
    try:
        with Lab(hosts=HOSTS, bandwidth_s=preset["bandwidth_s"]) as lab:
            lab.enter("client")  # this process is the client: its sockets and helpers live in the lab
            for key in preset["models"]:
                labels[key] = model_setup(key)["label"]
                t0 = time.monotonic()
                rows += run_model(lab, key, preset, run.out)
                print(f"{key}: {time.monotonic() - t0:.0f} s", flush=True)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    add_bounds(rows)
    write_outputs(rows, labels, run, args, preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
