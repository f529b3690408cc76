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
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args  # noqa: E402

from corolla.models.checkpoint import resolve_checkpoint  # noqa: E402
from corolla.models.quantization import quantize_blocks, weight_bytes  # noqa: E402
from corolla.models.span import SpanInputs, load_span  # noqa: E402

PRESETS = {
    "smoke": dict(prompt=32, decode_steps=8, rounds=3, quality_prompts=2, quality_tokens=4),
    "full": dict(prompt=128, decode_steps=32, rounds=7, quality_prompts=8, quality_tokens=16),
}
QUALITY_PROMPTS = [
    "What is the capital of France?",
    "Name the largest planet of the solar system.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer in one sentence.",
]
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


def measure_quality(folder: str, modes: list[str], prompts: list[str], new_tokens: int) -> dict[str, dict]:
    """The whole model with all its decoder layers quantized vs float, on batched chat prompts (left padding):
    mean and max |logit error| over every real position of the prompts and the float model's greedy continuation;
    teacher-forced greedy next-token agreement on the continuation; share of identical free-running greedy tokens."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = tokenizer.apply_chat_template(
        [[{"role": "user", "content": p}] for p in prompts],
        add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True,
    )  # fmt: skip

    def generate(m) -> torch.Tensor:
        return m.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id or 0)  # fmt: skip

    quality = {}
    with torch.no_grad():
        sequences = generate(model)
        mask = torch.cat([batch["attention_mask"], torch.ones(len(prompts), new_tokens, dtype=torch.long)], dim=1)
        expected = model(input_ids=sequences, attention_mask=mask).logits
        continuation = slice(-new_tokens - 1, -1)  # the predictions of the generated tokens
        for mode in modes:
            quantized = copy.deepcopy(model)
            quantize_blocks(quantized.model.layers, mode, device="cpu")
            got = quantized(input_ids=sequences, attention_mask=mask).logits
            errors = (got - expected).abs()[mask.bool()]
            agree = (got[:, continuation].argmax(-1) == expected[:, continuation].argmax(-1)).float().mean()
            free = (generate(quantized)[:, -new_tokens:] == sequences[:, -new_tokens:]).float().mean()
            quality[mode] = dict(
                logit_error_mean=errors.mean().item(), logit_error_max=errors.max().item(),
                next_token_agreement=agree.item(), free_running_identical=free.item(),
            )  # fmt: skip
            del quantized
    return quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", default="0:10")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the tests use)")
    add_output_args(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    run = Run("quantization", args)
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
    results = {}
    for mode in MODES:  # ratios to float32 per round (the modes of a round ran back to back), then median and range
        dec = [d / f for d, f in zip(decode[mode], decode["none"], strict=True)]
        pre = [p / f for p, f in zip(prefill[mode], prefill["none"], strict=True)]
        results[mode] = dict(
            backend=str(backends[mode]), weight_bytes=sizes[mode], weight_ratio=sizes[mode] / sizes["none"],
            decode_ms=statistics.median(decode[mode]) * 1e3, decode_ratio=statistics.median(dec),
            decode_ratio_range=[min(dec), max(dec)], prefill_ms=statistics.median(prefill[mode]) * 1e3,
            prefill_ratio=statistics.median(pre), prefill_ratio_range=[min(pre), max(pre)],
            decode_ms_rounds=[t * 1e3 for t in decode[mode]], prefill_ms_rounds=[t * 1e3 for t in prefill[mode]],
        )  # fmt: skip

    print(
        f"\n## Quantized blocks, {args.model} blocks {args.blocks}, CPU, {args.threads} thread(s), "
        f"prompt {preset['prompt']} tokens, preset {args.preset}\n"
    )
    print(
        "| mode | backend | linear weights | vs fp32 | decode ms/token | vs fp32 (range) | prefill ms/token "
        "| vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        lo, hi = r["decode_ratio_range"]
        print(
            f"| {'float32' if mode == 'none' else mode} | {r['backend']} | {r['weight_bytes'] / 2**20:.1f} MiB | "
            f"{r['weight_ratio']:.3f} | {r['decode_ms']:.2f} | {r['decode_ratio']:.2f}x ({lo:.2f}-{hi:.2f}) | "
            f"{r['prefill_ms']:.3f} | {r['prefill_ratio']:.2f}x |"
        )
    del spans
    prompts = QUALITY_PROMPTS[: preset["quality_prompts"]]
    quality = measure_quality(str(checkpoint.folder), ["int8", "nf4"], prompts, preset["quality_tokens"])
    print(
        f"\nQuality, all decoder layers quantized vs float, {len(prompts)} chat prompts x {preset['quality_tokens']} "
        "greedy tokens\n\n| mode | mean / max logit error | next-token agreement | identical free-running tokens |"
        "\n|---|---|---|---|"
    )
    for mode, q in quality.items():
        print(
            f"| {mode} | {q['logit_error_mean']:.2f} / {q['logit_error_max']:.1f} | {q['next_token_agreement']:.2f} "
            f"| {q['free_running_identical']:.2f} |"
        )
    results["quality"] = quality
    run.save(params=dict(preset, model=args.model, blocks=args.blocks, threads=args.threads), results=results)


if __name__ == "__main__":
    main()
