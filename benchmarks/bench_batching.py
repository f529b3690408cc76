"""Continuous batching on a server: aggregate tokens/s and per-session ms per token with 1..8 concurrent sessions.

Two swarms of the same model run side by side on loopback, each with two servers (the model's two halves, one torch
thread each): one whose servers merge waiting steps of concurrent sessions into one forward (the default,
``--max-batch-sessions 8``) and one whose servers run every step alone (``--max-batch-sessions 1``). For each
number of clients, rounds interleave the two swarms (the order alternating), so the machine's drift hits both alike.

Each client is a real inference session of the corolla client (routing, push, serialization) that feeds a fixed
text token by token (teacher forcing): the prompt, then one-token decode steps, the same steps as greedy generation.
The clients' LM head is left out: on this one machine it would compete with the servers for the same two cores,
while in a swarm the clients are other machines. Prompts differ in length, so sessions are at different positions
(their prompts run alone; decode steps are merged).

Reported per number of clients: aggregate decode tokens/s and the median session's ms per token with batching on
and off, their ratios, and the per-session latency against a lone session's (with batching on).
Goals on this CPU: ≥ 3x aggregate throughput at 8 clients; per-session ms/token ≤ 1.5x a lone session's.

    python benchmarks/bench_batching.py --preset smoke   # to a temp folder
    python benchmarks/bench_batching.py --preset full    # -> docs/results/batching.{json,png}
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

PRESETS = {
    "smoke": dict(clients=[1, 2], rounds=1, prompt=6, new_tokens=4, layouts=["2 servers"]),
    "full": dict(clients=[1, 2, 4, 8], rounds=5, prompt=24, new_tokens=48, layouts=["1 server", "2 servers"]),
}
MODES = {"on": ["--max-batch-sessions", "8"], "off": ["--max-batch-sessions", "1"]}


def layouts(blocks: int) -> dict[str, list[str]]:
    """Swarm layouts: one server with every block, or two servers with a half each (a pipeline)."""
    return {"1 server": [f"0:{blocks}"], "2 servers": [f"0:{blocks // 2}", f"{blocks // 2}:{blocks}"]}


TEXT = (
    "Continuous batching merges the decode steps of many sessions into one forward pass, so a server reads its "
    "weights once for all of them instead of once per session, which is what bounds a decode step on most hardware. "
) * 8


async def _session(remote, embeds: torch.Tensor, prompt: int, new_tokens: int) -> tuple[float, float]:
    """One client: the prompt as one step, then one-token steps; returns (start, end) of its decode phase."""
    session = remote.inference_session(max_length=prompt + new_tokens)
    try:
        await session.astep(embeds[:, :prompt])
        start = time.perf_counter()
        for t in range(prompt, prompt + new_tokens):
            await session.astep(embeds[:, t : t + 1])
        return start, time.perf_counter()
    finally:
        await session.aclose()


async def _batch_counts(remote) -> tuple[int, int]:
    """(steps that shared a forward, forwards that ran more than one step), summed over the swarm's servers."""
    from hivemind.proto import runtime_pb2
    from hivemind.utils.serializer import MSGPackSerializer

    from corolla.protocol.rpc import BLOCK_SERVER, RpcStub

    view = remote.swarm
    steps = forwards = 0
    for peer in list(view.servers):
        stub = RpcStub(await view.transport(), peer.to_base58(), BLOCK_SERVER)
        info = MSGPackSerializer.loads(
            (await stub.call("info", runtime_pb2.ExpertUID(), timeout_s=10)).serialized_info
        )
        steps, forwards = steps + info.get("steps_batched", 0), forwards + info.get("batched_forwards", 0)
    return steps, forwards


async def _measure(remote, embeds: torch.Tensor, clients: int, preset: dict) -> dict:
    """``clients`` concurrent sessions (prompt lengths staggered): aggregate decode tokens/s, per-session ms/token,
    and how many steps the servers ran per forward."""
    steps_before, forwards_before = await _batch_counts(remote)
    spans = await asyncio.gather(
        *(
            _session(remote, embeds, preset["prompt"] + i, preset["new_tokens"])  # each at its own position
            for i in range(clients)
        )
    )
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    per_session = [(e - s) / preset["new_tokens"] * 1e3 for s, e in spans]
    steps_after, forwards_after = await _batch_counts(remote)
    merged, merged_forwards = steps_after - steps_before, forwards_after - forwards_before
    total = len(remote.swarm.servers) * clients * (preset["new_tokens"] + 1)  # each server: prompt + decode steps
    return {
        "tokens_per_s": clients * preset["new_tokens"] / (last - first),
        "ms_per_token": statistics.median(per_session),
        "steps_per_forward": total / (merged_forwards + total - merged),
    }


def measure(remotes: dict, embeds: torch.Tensor, preset: dict) -> dict:
    from corolla.net.loop import run_sync

    samples = {mode: {n: [] for n in preset["clients"]} for mode in remotes}
    for remote in remotes.values():  # warm-up: routes, connections, first-call costs
        run_sync(_measure(remote, embeds, 2, dict(preset, new_tokens=2)), timeout_s=300)
    for round_ in range(preset["rounds"]):
        for n in preset["clients"]:
            order = list(remotes) if round_ % 2 == 0 else list(reversed(remotes))
            for mode in order:
                sample = run_sync(_measure(remotes[mode], embeds, n, preset), timeout_s=600)
                samples[mode][n].append(sample)
                print(f"round {round_} clients {n} batching {mode}: {sample}", flush=True)
    rows = []
    lone = statistics.median(s["ms_per_token"] for s in samples["on"][preset["clients"][0]])
    for n in preset["clients"]:
        on, off = samples["on"][n], samples["off"][n]
        rows.append(
            {
                "clients": n,
                "on_tokens_per_s": statistics.median(s["tokens_per_s"] for s in on),
                "off_tokens_per_s": statistics.median(s["tokens_per_s"] for s in off),
                "throughput_ratio": statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(on, off)),
                "on_ms_per_token": statistics.median(s["ms_per_token"] for s in on),
                "off_ms_per_token": statistics.median(s["ms_per_token"] for s in off),
                "latency_vs_lone": statistics.median(s["ms_per_token"] for s in on) / lone,
                "steps_per_forward": statistics.median(s["steps_per_forward"] for s in on),
                "samples": {"on": on, "off": off},
            }
        )
    return {"rows": rows, "lone_ms_per_token": lone}


def table(r: dict) -> str:
    lines = [
        "| swarm | clients | tokens/s, batching on | tokens/s, off | on / off (per round, median) | ms/token per "
        "session, on | ms/token, off | on vs a lone session | steps per forward, on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layout, result in r["layouts"].items():
        for row in result["rows"]:
            lines.append(
                f"| {layout} | {row['clients']} | {row['on_tokens_per_s']:.1f} | {row['off_tokens_per_s']:.1f} | "
                f"{row['throughput_ratio']:.2f}x | {row['on_ms_per_token']:.1f} | {row['off_ms_per_token']:.1f} | "
                f"{row['latency_vs_lone']:.2f}x | {row['steps_per_forward']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, (layout, result) in enumerate(r["layouts"].items()):
        rows = result["rows"]
        clients = [x["clients"] for x in rows]
        left.plot(clients, [x["on_tokens_per_s"] for x in rows], "o-", color=f"C{i}", label=f"{layout}, batching on")
        left.plot(clients, [x["off_tokens_per_s"] for x in rows], "s--", color=f"C{i}", label=f"{layout}, off")
        right.plot(clients, [x["on_ms_per_token"] for x in rows], "o-", color=f"C{i}", label=f"{layout}, on")
        right.plot(clients, [x["off_ms_per_token"] for x in rows], "s--", color=f"C{i}", label=f"{layout}, off")
        right.axhline(1.5 * result["lone_ms_per_token"], color=f"C{i}", lw=0.8, ls=":", label=f"{layout}, 1.5x lone")
    left.set_xlabel("concurrent sessions")
    left.set_ylabel("aggregate decode tokens/s")
    right.set_xlabel("concurrent sessions")
    right.set_ylabel("ms per token, median session")
    for ax in (left, right):
        ax.set_xticks(clients)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or checkpoint folder")
    parser.add_argument("--wait-ms", type=float, default=None, help="--batch-wait-ms of the batching servers")
    add_output_args(parser)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    preset = PRESETS[args.preset]
    modes = dict(MODES)
    if args.wait_ms is not None:
        modes["on"] = [*MODES["on"], "--batch-wait-ms", str(args.wait_ms)]
    run = Run("batching", args)
    torch.set_num_threads(1)
    from corolla.models.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(args.model).folder
    swarms = {name: spans for name, spans in layouts(AutoConfig.from_pretrained(folder).num_hidden_layers).items()}
    needed = preset["prompt"] + max(preset["clients"]) + preset["new_tokens"]
    ids = AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt")["input_ids"][:, :needed]
    if ids.shape[1] < needed:
        raise SystemExit(f"the benchmark's text has {ids.shape[1]} tokens, {needed} needed")
    results = {
        "layouts": {name: measure_layout(args.model, swarms[name], modes, ids, preset) for name in preset["layouts"]}
    }
    title = f"{args.model}, servers with 1 torch thread each, CPU, preset {args.preset}"
    print(f"\n## Continuous batching, {title}\n")
    print(table(results))
    params = dict(preset, model=args.model, spans={name: swarms[name] for name in preset["layouts"]}, modes=modes)
    run.save(params=params, results=results)
    plot(results, run.path(".png"), title)


def measure_layout(model_name: str, spans: list[str], modes: dict, ids: torch.Tensor, preset: dict) -> dict:
    """Two swarms of this layout side by side, batching on and off: the rows of the table."""
    from contextlib import ExitStack

    from corolla import AutoDistributedModelForCausalLM
    from corolla.local_swarm import LocalSwarm

    with ExitStack() as stack:
        remotes, models = {}, []
        for mode, flags in modes.items():
            swarm = stack.enter_context(
                LocalSwarm(model=model_name, spans=spans, server_args=["--throughput", "100", *flags])
            )
            model = AutoDistributedModelForCausalLM.from_pretrained(model_name, initial_peers=swarm.initial_peers)
            stack.callback(model.shutdown)
            models.append(model)
            remotes[mode] = model.remote_blocks
        with torch.inference_mode():
            embeds = models[0].get_input_embeddings()(ids)
            return measure(remotes, embeds, preset)


if __name__ == "__main__":
    main()
