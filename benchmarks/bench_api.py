"""The OpenAI-compatible API (``corolla api``) vs the Python client on the same swarm, in the same run.

Greedy chat completions of SmolLM2 through 3 local servers: time to first token and ms per token through the API
(the real ``openai`` package, streaming) and through ``AutoDistributedModelForCausalLM.generate`` in this process,
alternating round by round (the ratio is taken per round); then 1 and 4 (or more) concurrent API streams, for the
aggregate tokens/s and each stream's ms per token. Writes JSON and a plot (``benchmarks/results.py``).

    python benchmarks/bench_api.py --preset smoke    # to a temp folder
    python benchmarks/bench_api.py --preset full     # -> docs/results/api.{json,png}
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args, save_figure  # noqa: E402
from benchmarks.streamers import FirstTokenClock  # noqa: E402

PRESETS = {
    "smoke": dict(new_tokens=8, repeats=1, concurrency=[1, 2]),
    "full": dict(new_tokens=64, repeats=5, concurrency=[1, 2, 4, 8]),
}
PROMPTS = [
    "Tell me one interesting fact about the ocean.",
    "Describe a cat in two sentences.",
    "Why is the sky blue?",
    "Give me a tip for learning to cook.",
    "What do bees do in winter?",
    "Name three uses of a paperclip.",
    "How do trains stay on their tracks?",
    "Write a short poem about rain.",
]
API_KEY = "bench"


def python_client_round(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds per token after it, tokens) of one greedy generate call."""
    clock = FirstTokenClock()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    end = time.perf_counter()
    tokens = out.shape[1] - ids.shape[1]
    return clock.first_at - start, (end - clock.first_at) / max(1, tokens - 1), tokens


async def api_stream(client, model: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds per token after it, tokens) of one streamed greedy chat completion."""
    start = time.perf_counter()
    first_at, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif first_at is None and chunk.choices and chunk.choices[0].delta.content:
            first_at = time.perf_counter()
    end = time.perf_counter()
    return first_at - start, (end - first_at) / max(1, tokens - 1), tokens


async def concurrent_streams(client, model: str, count: int, new_tokens: int) -> dict:
    """``count`` streams at once, each with its own prompt: aggregate tokens/s and per-stream ms per token."""
    start = time.perf_counter()
    rounds = await asyncio.gather(*(api_stream(client, model, PROMPTS[i % len(PROMPTS)], new_tokens) for i in
                                    range(count)))  # fmt: skip
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in rounds)
    return {
        "clients": count,
        "aggregate_tokens_per_s": tokens / wall,
        "ms_per_token_median": statistics.median(r[1] for r in rounds) * 1e3,
        "ttft_s_median": statistics.median(r[0] for r in rounds),
        "tokens": tokens,
        "wall_s": wall,
    }


def measure(api_url: str, initial_peers, *, model_name: str, preset: dict) -> dict:
    """Run the comparison against a swarm and API that are already up."""
    import openai
    from transformers import AutoTokenizer

    from corolla import AutoDistributedModelForCausalLM
    from corolla.models.checkpoint import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(model_name).folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    model = AutoDistributedModelForCausalLM.from_pretrained(model_name, initial_peers=initial_peers)

    async def run_api() -> tuple[list, list]:
        client = openai.AsyncOpenAI(base_url=api_url, api_key=API_KEY, timeout=300, max_retries=0)
        try:
            await api_stream(client, model_name, PROMPTS[0], 2)  # warm-up
            python_client_round(model, ids, 2)
            pairs = []
            for _ in range(preset["repeats"]):  # alternate: API, then the Python client
                through_api = await api_stream(client, model_name, PROMPTS[0], preset["new_tokens"])
                pairs.append((through_api, python_client_round(model, ids, preset["new_tokens"])))
            levels = [
                await concurrent_streams(client, model_name, count, preset["new_tokens"])
                for count in preset["concurrency"]
            ]
            return pairs, levels
        finally:
            await client.close()

    try:
        with torch.inference_mode():
            pairs, levels = asyncio.run(run_api())
    finally:
        model.shutdown()
    api_rounds, client_rounds = [p[0] for p in pairs], [p[1] for p in pairs]
    token_ratios = [a[1] / c[1] for a, c in pairs]
    ttft_ratios = [a[0] / c[0] for a, c in pairs]
    return {
        "api_ttft_s": statistics.median(r[0] for r in api_rounds),
        "client_ttft_s": statistics.median(r[0] for r in client_rounds),
        "api_ms_per_token": statistics.median(r[1] for r in api_rounds) * 1e3,
        "client_ms_per_token": statistics.median(r[1] for r in client_rounds) * 1e3,
        "ms_per_token_ratio": statistics.median(token_ratios),
        "ms_per_token_ratio_rounds": token_ratios,
        "ttft_ratio": statistics.median(ttft_ratios),
        "ttft_ratio_rounds": ttft_ratios,
        "tokens_per_round": [[a[2], c[2]] for a, c in pairs],
        "concurrency": levels,
    }


def table(r: dict) -> str:
    rounds = len(r["ms_per_token_ratio_rounds"])
    lines = [
        "| metric | API (openai package, streaming) | Python client | API / client | target |",
        "|---|---|---|---|---|",
        f"| time to first token, median of {rounds} | {r['api_ttft_s'] * 1e3:.0f} ms | {r['client_ttft_s'] * 1e3:.0f} "
        f"ms | {r['ttft_ratio']:.2f}x ({min(r['ttft_ratio_rounds']):.2f}–{max(r['ttft_ratio_rounds']):.2f}) "
        "| ≤ 1.1x |",
        f"| ms per token after the first | {r['api_ms_per_token']:.1f} | {r['client_ms_per_token']:.1f} | "
        f"{r['ms_per_token_ratio']:.2f}x ({min(r['ms_per_token_ratio_rounds']):.2f}–"
        f"{max(r['ms_per_token_ratio_rounds']):.2f}) | ≤ 1.1x |",
        "",
        "| concurrent API streams | aggregate tokens/s | ms per token per stream (median) | first token (median) |",
        "|---|---|---|---|",
    ]
    for level in r["concurrency"]:
        lines.append(
            f"| {level['clients']} | {level['aggregate_tokens_per_s']:.1f} | {level['ms_per_token_median']:.1f} | "
            f"{level['ttft_s_median'] * 1e3:.0f} ms |"
        )
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.bar(["Python client", "API"], [r["client_ms_per_token"], r["api_ms_per_token"]], color=["gray", "C0"])
    left.set_ylabel("ms per token (greedy, batch 1)")
    left.set_title(f"one stream: API {r['ms_per_token_ratio']:.2f}x the client", fontsize=9)
    clients = [level["clients"] for level in r["concurrency"]]
    right.plot(clients, [level["aggregate_tokens_per_s"] for level in r["concurrency"]], "o-", label="aggregate")
    right.set_xlabel("concurrent API streams")
    right.set_ylabel("tokens/s, all streams")
    right.set_xticks(clients)
    right.set_title("concurrent streams through one API", fontsize=9)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--spans", nargs="+", default=["0:10", "10:20", "20:30"])
    add_output_args(parser)
    args = parser.parse_args()
    from corolla.local_swarm import LocalSwarm

    preset = PRESETS[args.preset]
    run = Run("api", args)
    torch.set_num_threads(1)
    with LocalSwarm(model=args.model, spans=args.spans) as swarm:
        url = swarm.start_api(extra_args=["--api-key", API_KEY, "--max-choices", "8"])
        results = measure(url, swarm.initial_peers, model_name=args.model, preset=preset)
    title = f"{args.model}, {len(args.spans)} servers, CPU, preset {args.preset}"
    print(f"\n## OpenAI-compatible API vs Python client, {title}\n")
    print(table(results))
    run.save(params=dict(preset, model=args.model, spans=args.spans, prompt=PROMPTS[0]), results=results)
    plot(results, run.path(".png"), title)


if __name__ == "__main__":
    main()
