"""Quantized blocks vs float32 blocks: weight memory and forward latency, all measured in the same run.

Loads blocks 0:10 of SmolLM2-135M three times (float32, ``--quant int8``, ``--quant nf4``) and prints a markdown table:
bytes of the linear layers' weights, and the per-token latency of a decode step (1 new token, KV cache of the prompt)
and of a prefill (a whole prompt at once), each as a ratio to float32. Modes are measured in alternation, median of
the rounds, so that the ratios compare like with like on a busy machine.

    python benchmarks/bench_quantization.py --preset smoke
    python benchmarks/bench_quantization.py --preset full --threads 4
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from corolla.models.checkpoint import resolve_checkpoint
from corolla.models.quantization import quantize_blocks, weight_bytes
from corolla.models.span import SpanInputs, load_span

PRESETS = {
    "smoke": dict(prompt=32, decode_steps=8, rounds=3),
    "full": dict(prompt=128, decode_steps=32, rounds=7),
}
MODES = ("none", "int8", "nf4")


def time_decode(span, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per 1-token forward after a ``prompt``-long prefill into a fresh cache."""
    cache = span.new_cache()
    span(SpanInputs(hidden_states=prompt), cache)
    token = prompt[:, -1:]
    started = time.perf_counter()
    for _ in range(steps):
        span(SpanInputs(hidden_states=token), cache)
    return (time.perf_counter() - started) / steps


def time_prefill(span, prompt: torch.Tensor) -> float:
    """Seconds per token of one forward over the whole prompt."""
    started = time.perf_counter()
    span(SpanInputs(hidden_states=prompt), span.new_cache())
    return (time.perf_counter() - started) / prompt.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", default="0:10")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the tests use)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    logging.getLogger("corolla").setLevel(logging.WARNING)
    start, end = (int(x) for x in args.blocks.split(":"))
    checkpoint = resolve_checkpoint(args.model)

    spans, backends, sizes = {}, {}, {}
    for mode in MODES:
        spans[mode] = load_span(checkpoint, start, end)
        backends[mode] = quantize_blocks(spans[mode], mode, device="cpu")
        sizes[mode] = weight_bytes(spans[mode].blocks)
    hidden_size = spans["none"].config.hidden_size
    prompt = torch.randn(1, preset["prompt"], hidden_size, generator=torch.Generator().manual_seed(0))

    decode, prefill = {mode: [] for mode in MODES}, {mode: [] for mode in MODES}
    with torch.inference_mode():
        for mode in MODES:  # warm-up
            time_decode(spans[mode], prompt, 2)
        for _ in range(preset["rounds"]):
            for mode in MODES:
                decode[mode].append(time_decode(spans[mode], prompt, preset["decode_steps"]))
                prefill[mode].append(time_prefill(spans[mode], prompt))
    decode = {mode: statistics.median(times) for mode, times in decode.items()}
    prefill = {mode: statistics.median(times) for mode, times in prefill.items()}

    print(
        f"\n## Quantized blocks, {args.model} blocks {args.blocks}, CPU, {args.threads} thread(s), "
        f"prompt {preset['prompt']} tokens, preset {args.preset}\n"
    )
    print("| mode | backend | linear weights | vs fp32 | decode ms/token | vs fp32 | prefill ms/token | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        print(
            f"| {'float32' if mode == 'none' else mode} | {backends[mode]} | {sizes[mode] / 2**20:.1f} MiB | "
            f"{sizes[mode] / sizes['none']:.3f} | {decode[mode] * 1e3:.2f} | {decode[mode] / decode['none']:.2f}x | "
            f"{prefill[mode] * 1e3:.3f} | {prefill[mode] / prefill['none']:.2f}x |"
        )


if __name__ == "__main__":
    main()
