"""Inference through a local swarm vs the same weights run locally with transformers, in the same run.

Measures, for batch-1 greedy generation after a ~20-token chat prompt: per-token latency (swarm / local ratio),
time to first token after the session opens, and server cold start (process start -> blocks usable, with cached
weights). Local and swarm generations alternate round by round; the ratio is taken per round and reported as
median and range. Prints a markdown table and saves the results (JSON) and a bar chart (``benchmarks/results.py``).

    python benchmarks/bench_inference.py --preset smoke    # to a temp folder
    python benchmarks/bench_inference.py --preset full     # -> docs/results/inference.{json,png}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args, save_figure  # noqa: E402
from benchmarks.streamers import FirstTokenClock  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.local_swarm import LocalSwarm  # noqa: E402
from corolla.models.checkpoint import resolve_checkpoint  # noqa: E402

PRESETS = {"smoke": dict(new_tokens=8, repeats=1), "full": dict(new_tokens=64, repeats=5)}
PROMPT = "Tell me one interesting fact about the ocean."


def _time_generation(model, ids, new_tokens: int, session_factory=None) -> tuple[float, float]:
    """(seconds per new token after the first, seconds to the first token)."""
    streamer = FirstTokenClock()
    start = time.perf_counter()
    if session_factory is None:
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer
        )
    else:
        with session_factory() as session:
            start = time.perf_counter()
            out = model.generate(
                ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=streamer,
                session=session,
            )
    end = time.perf_counter()
    generated = out.shape[1] - ids.shape[1]
    per_token = (end - streamer.first_at) / max(1, generated - 1)
    return per_token, streamer.first_at - start


def _start_servers_timed(swarm: LocalSwarm, model: str, spans: list[str]) -> list[float]:
    """Start one server per span; for each, seconds from launching it to its ONLINE record in the DHT.

    The DHT peer that watches is started beforehand, so its own start-up is not counted.
    """
    from corolla.local_swarm import wait_for
    from corolla.models.checkpoint import default_dht_prefix
    from corolla.net.dht_process import client_dht
    from corolla.net.dht_records import fetch_block_records
    from corolla.protocol.server_info import ServerState

    watcher = client_dht(swarm.initial_peers)

    def online(peer_id: str, first_block: int) -> bool:
        # one block key per poll (the span's first): a light check, so the watcher does not slow the start it times
        (records,) = fetch_block_records(
            watcher, dht_prefix=default_dht_prefix(model), num_blocks=first_block + 1, blocks=[first_block]
        )
        return any(peer.to_base58() == peer_id and info.state == ServerState.ONLINE for peer, info in records.items())

    cold_starts = []
    try:
        for i, span in enumerate(spans):
            name = f"server{i}"
            swarm.start_server(name, ["--blocks", span])  # makes the server's identity key, then launches it
            peer_id = swarm.peer_ids[name]
            first = int(span.split(":")[0])
            what = f"{name} to be online"
            wait_for(lambda: online(peer_id, first), timeout_s=120, what=what, poll_s=0.05)  # noqa: B023
            cold_starts.append(time.perf_counter() - swarm.launched_at[name])
    finally:
        watcher.shutdown()
    return cold_starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--spans", nargs="+", default=["0:10", "10:20", "20:30"])
    parser.add_argument("--no-push", action="store_true", help="servers do not push outputs to the next server")
    add_output_args(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    run = Run("inference", args)
    torch.set_num_threads(1)
    folder = resolve_checkpoint(args.model).folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    local = AutoModelForCausalLM.from_pretrained(folder).eval()

    with LocalSwarm(model=args.model, spans=[]) as swarm:
        cold_starts = _start_servers_timed(swarm, args.model, args.spans)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=swarm.initial_peers, push=not args.no_push
        )
        max_length = ids.shape[1] + preset["new_tokens"]
        rows = {"local": [], "swarm": []}
        with torch.inference_mode():
            _time_generation(local, ids, 2)  # warm-up both
            _time_generation(model, ids, 2)
            for _ in range(preset["repeats"]):
                rows["local"].append(_time_generation(local, ids, preset["new_tokens"]))
                rows["swarm"].append(
                    _time_generation(
                        model, ids, preset["new_tokens"], lambda: model.inference_session(max_length=max_length)
                    )
                )
        model.shutdown()

    local_tok = statistics.median(r[0] for r in rows["local"])
    swarm_tok = statistics.median(r[0] for r in rows["swarm"])
    ttft = statistics.median(r[1] for r in rows["swarm"])
    ratios = [s[0] / loc[0] for s, loc in zip(rows["swarm"], rows["local"], strict=True)]
    ratio = statistics.median(ratios)
    print(
        f"\n## Inference, {args.model}, {len(args.spans)} servers ({' '.join(args.spans)}), float32, CPU, "
        f"prompt {ids.shape[1]} tokens, {preset['new_tokens']} new tokens, preset {args.preset}, "
        f"{preset['repeats']} interleaved rounds\n"
    )
    print("| metric | swarm | local | ratio: median (range) | target |")
    print("|---|---|---|---|---|")
    print(
        f"| per-token latency | {swarm_tok * 1e3:.1f} ms | {local_tok * 1e3:.1f} ms | "
        f"{ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | <= 1.5x |"
    )
    print(f"| time to first token (session open) | {ttft:.3f} s | | | < 1 s |")
    print(f"| server cold start (median of {len(cold_starts)}) | {statistics.median(cold_starts):.2f} s | | | < 4 s |")
    run.save(
        params=dict(preset, model=args.model, spans=args.spans, push=not args.no_push, prompt_tokens=ids.shape[1]),
        results=dict(
            local_ms_per_token=local_tok * 1e3, swarm_ms_per_token=swarm_tok * 1e3, ratio=ratio,
            ratio_range=[min(ratios), max(ratios)], ratio_rounds=ratios, ttft_s=ttft,
            ttft_s_rounds=[r[1] for r in rows["swarm"]], cold_start_s=statistics.median(cold_starts),
            cold_start_s_servers=cold_starts, local_ms_rounds=[r[0] * 1e3 for r in rows["local"]],
            swarm_ms_rounds=[r[0] * 1e3 for r in rows["swarm"]],
        ),
    )  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(["local transformers", "corolla swarm"], [local_tok * 1e3, swarm_tok * 1e3], color=["gray", "C0"])
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"{args.model}: {ratio:.2f}x local latency (median of {len(ratios)} rounds)", fontsize=9)
    save_figure(fig, run.path(".png"))


if __name__ == "__main__":
    main()
