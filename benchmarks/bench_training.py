"""Training through a local swarm vs the same model trained locally with transformers, in the same run.

One training step = forward + backward of a batch (default 4 x 128 tokens) with prompt tuning (a trainable
16-vector prefix): through the swarm (SmolLM2, 3 servers x 10 blocks; servers recompute their forward pass during
backward, as Petals does, so they keep no activations between calls) and locally (the same weights, the same prefix,
one torch thread like each server). Reported: median step time, tokens/s, and the swarm / local ratio, also with
activations and gradients sent as 8-bit (UNIFORM_8BIT) on the wire. Prints a markdown table; ``--plot`` saves a
PNG bar chart.

    python benchmarks/bench_training.py --preset smoke
    python benchmarks/bench_training.py --preset full --plot docs/results/training_cpu.png
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.local_swarm import LocalSwarm
from corolla.models.bundled import ensure_bundled_checkpoint

PRESETS = {
    "smoke": dict(batch=2, tokens=32, steps=2, warmup=1),
    "full": dict(batch=4, tokens=128, steps=6, warmup=1),
}
PRE_SEQ_LEN = 16


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _median_step(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--plot", default=None, help="save a PNG bar chart here")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    torch.set_num_threads(1)  # like each server; the swarm's servers are separate processes on the same cores

    path = str(ensure_bundled_checkpoint("smollm2-135m"))
    ids = torch.randint(100, 10000, (preset["batch"], preset["tokens"]), generator=torch.Generator().manual_seed(0))
    tokens_per_step = ids.numel()

    local = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    prefix = torch.nn.Parameter(torch.randn(PRE_SEQ_LEN, local.config.hidden_size) * 0.02)
    local_s = _median_step(_local_step(local, prefix, ids), preset["steps"], preset["warmup"])
    del local

    rows = [("local (transformers, 1 thread)", local_s)]
    with LocalSwarm(model="smollm2-135m", spans=["0:10", "10:20", "20:30"]) as swarm:
        for label, compression in (("swarm, float32 wire", "NONE"), ("swarm, 8-bit wire", "UNIFORM_8BIT")):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                "smollm2-135m",
                initial_peers=swarm.initial_peers,
                tuning_mode="ptune",
                pre_seq_len=PRE_SEQ_LEN,
                compression=compression,
            )
            try:
                model.requires_grad_(False)
                model.prompt_tuning.prompt_embeddings.requires_grad_(True)
                rows.append((label, _median_step(_swarm_step(model, ids), preset["steps"], preset["warmup"])))
            finally:
                model.shutdown()

    print(
        f"\nTraining step (forward + backward), batch {preset['batch']} x {preset['tokens']} tokens, prompt tuning "
        f"(prefix {PRE_SEQ_LEN}), SmolLM2-135M float32, median of {preset['steps']} steps\n"
    )
    print("| setup | step time (s) | tokens/s | vs local |")
    print("|---|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {tokens_per_step / seconds:.0f} | {seconds / local_s:.2f}x |")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 3))
        ax.barh(
            [label for label, _ in rows][::-1], [s for _, s in rows][::-1], color=["#4c72b0", "#dd8452", "#55a868"]
        )
        ax.set_xlabel("seconds per training step (lower is better)")
        ax.set_title(f"forward+backward, {preset['batch']}x{preset['tokens']} tokens, SmolLM2, CPU", fontsize=10)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot saved to {args.plot}")


if __name__ == "__main__":
    main()
