"""Training through a local swarm vs the same model trained locally with transformers, in the same run.

One training step = forward + backward of a batch (default 4 x 128 tokens) with prompt tuning (a trainable
16-vector prefix): through the swarm (SmolLM2, 3 servers x 10 blocks) and locally (the same weights, the same prefix,
one torch thread like each server). Through the swarm three ways: the servers keep each forward call's activations
for its backward (the default, ``--activation-cache-mb``), or recompute the forward pass in every backward (a client
with ``keep_activations=False``: the servers then keep nothing, as in Petals), both with float32 on the wire; and with
kept activations and activations and gradients sent as 8-bit (UNIFORM_8BIT) on the wire. After the rounds, each
server's info RPC says the most bytes of activations it kept at once (the memory the cache cost).

The setups are measured in interleaved rounds (one step of each per round, the order rotating from round to
round), so the machine's drift hits them alike; the swarm / local ratio is taken per round and reported as median
and range, with the median step time and tokens/s. Prints a markdown table and saves the results (JSON) and a bar
chart (``benchmarks/results.py``).

    python benchmarks/bench_training.py --preset smoke    # to a temp folder
    python benchmarks/bench_training.py --preset full     # -> docs/results/training.{json,png}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args, save_figure  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.local_swarm import LocalSwarm  # noqa: E402
from corolla.models.bundled import ensure_bundled_checkpoint  # noqa: E402
from corolla.net.loop import run_sync  # noqa: E402
from corolla.net.ping import server_status  # noqa: E402

PRESETS = {
    "smoke": dict(batch=2, tokens=32, rounds=2, warmup=1),
    "full": dict(batch=4, tokens=128, rounds=8, warmup=1),
}
PRE_SEQ_LEN = 16
LOCAL = "local (transformers, 1 thread)"
# label -> (wire compression, servers keep each forward's activations for its backward)
SWARM_SETUPS = {
    "swarm, float32 wire, kept activations": ("NONE", True),
    "swarm, float32 wire, recomputed forward": ("NONE", False),
    "swarm, 8-bit wire, kept activations": ("UNIFORM_8BIT", True),
}


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def interleaved(steps: dict[str, object], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each setup, one step of each per round; the order rotates by one setup each round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(steps[name]))
    return times


def _local_step(model, prefix: torch.nn.Parameter, ids: torch.Tensor):
    def step():
        embeds = model.get_input_embeddings()(ids)
        embeds = torch.cat([prefix.unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], dim=1)
        logits = model(inputs_embeds=embeds).logits[:, prefix.shape[0] :]
        prefix.grad = None
        _lm_loss(logits, ids).backward()

    return step


def _swarm_step(model, ids: torch.Tensor):
    prompt = model.prompt_tuning.prompt_embeddings

    def step():
        logits = model(input_ids=ids).logits
        prompt.grad = None
        _lm_loss(logits, ids).backward()

    return step


def _statuses(model, peer_ids: dict[str, str]) -> dict:
    """Each server's info RPC answer, by server name."""

    async def call():
        transport = await model.remote_blocks.swarm.transport()
        return {name: await server_status(transport, peer, timeout_s=10) for name, peer in peer_ids.items()}

    return run_sync(call(), timeout_s=30)


def _kept_bytes(model, ids: torch.Tensor, peer_ids: dict[str, str]) -> dict[str, int]:
    """Per server, the bytes of activations it holds between a step's forward and its backward (one extra step)."""
    logits = model(input_ids=ids).logits
    held = {name: status.activation_bytes for name, status in _statuses(model, peer_ids).items()}
    _lm_loss(logits, ids).backward()
    return held


def _activation_totals(model, peer_ids: dict[str, str]) -> dict[str, dict]:
    """Per server: the most bytes of activations it kept at once, and its backward calls with an activation id
    that reused a kept forward (hits) or recomputed the forward pass (misses)."""
    return {
        name: dict(peak_bytes=s.activation_peak_bytes, hits=s.activation_hits, misses=s.activation_misses)
        for name, s in _statuses(model, peer_ids).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    add_output_args(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    run = Run("training", args)
    torch.set_num_threads(1)  # like each server; the swarm's servers are separate processes on the same cores

    path = str(ensure_bundled_checkpoint("smollm2-135m"))
    ids = torch.randint(100, 10000, (preset["batch"], preset["tokens"]), generator=torch.Generator().manual_seed(0))
    tokens_per_step = ids.numel()

    local = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    prefix = torch.nn.Parameter(torch.randn(PRE_SEQ_LEN, local.config.hidden_size) * 0.02)
    steps = {LOCAL: _local_step(local, prefix, ids)}
    clients = []
    with LocalSwarm(model="smollm2-135m", spans=["0:10", "10:20", "20:30"]) as swarm:
        try:
            for label, (compression, keep) in SWARM_SETUPS.items():
                model = AutoDistributedModelForCausalLM.from_pretrained(
                    "smollm2-135m",
                    initial_peers=swarm.initial_peers,
                    tuning_mode="ptune",
                    pre_seq_len=PRE_SEQ_LEN,
                    compression=compression,
                    keep_activations=keep,
                )
                clients.append(model)
                model.requires_grad_(False)
                model.prompt_tuning.prompt_embeddings.requires_grad_(True)
                steps[label] = _swarm_step(model, ids)
            times = interleaved(steps, preset["rounds"], preset["warmup"])
            kept = {label: _kept_bytes(model, ids, swarm.peer_ids) for label, model in zip(SWARM_SETUPS, clients)}
            totals = _activation_totals(clients[0], swarm.peer_ids)
        finally:
            for model in clients:
                model.shutdown()

    results = {}
    for label, values in times.items():
        ratios = [t / base for t, base in zip(values, times[LOCAL], strict=True)]
        median = statistics.median(values)
        results[label] = dict(
            step_s=median, step_s_rounds=values, tokens_per_s=tokens_per_step / median,
            ratio=statistics.median(ratios), ratio_range=[min(ratios), max(ratios)], ratio_rounds=ratios,
        )  # fmt: skip
        if label in kept:  # bytes of activations the servers hold between a step's forward and its backward
            results[label].update(
                kept_activation_bytes=sum(kept[label].values()), kept_activation_bytes_servers=kept[label]
            )
    print(
        f"\nTraining step (forward + backward), batch {preset['batch']} x {preset['tokens']} tokens, prompt tuning "
        f"(prefix {PRE_SEQ_LEN}), SmolLM2-135M float32, {preset['rounds']} interleaved rounds, preset {args.preset}\n"
    )
    print("| setup | step time (s), median | tokens/s | vs local: median (range) |")
    print("|---|---|---|---|")
    for label, r in results.items():
        lo, hi = r["ratio_range"]
        print(f"| {label} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f}x ({lo:.2f}-{hi:.2f}) |")
    print("\nActivations the servers keep for one step (between its forward and its backward):")
    for label, per_server in kept.items():
        shown = ", ".join(f"{name} {size / 2**20:.1f}" for name, size in per_server.items())
        print(f"- {label}: {sum(per_server.values()) / 2**20:.1f} MiB ({shown} MiB)")
    print("Per server over the whole run: " + ", ".join(
        f"{name} most kept at once {t['peak_bytes'] / 2**20:.1f} MiB, backward calls {t['hits']} reused / "
        f"{t['misses']} recomputed with an activation id" for name, t in totals.items()
    ))  # fmt: skip
    params = dict(preset, pre_seq_len=PRE_SEQ_LEN, model="smollm2-135m", threads=1)
    run.save(params=dict(params, servers_activation_totals=totals), results=results)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3))
    labels = list(results)[::-1]
    ax.barh(labels, [results[label]["step_s"] for label in labels], color=["#8172b3", "#55a868", "#dd8452", "#4c72b0"])
    ax.set_xlabel("seconds per training step, median (lower is better)")
    ax.set_title(f"forward+backward, {preset['batch']}x{preset['tokens']} tokens, SmolLM2, CPU", fontsize=10)
    save_figure(fig, run.path(".png"))


if __name__ == "__main__":
    main()
