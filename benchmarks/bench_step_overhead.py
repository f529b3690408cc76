"""Where a generated token's time goes, through a loopback swarm vs the same weights run locally (issue 16, part 1).

SmolLM2-135M-Instruct, float32, 3 servers x 10 blocks, one torch thread in every process, batch-1 greedy generation
of a chat prompt. Local generation and swarm generation alternate round by round. For each, per generated token:

- wall time, and CPU time (user + system, from the kernel's counters via psutil) of every process, over the decode
  steps (from the first new token to the last): this one (the
  client, or local transformers), the client's own helpers (its DHT process and p2pd daemon), each server's Python
  process and its p2pd daemon, the bootstrap peer. CPU time is not disturbed by other load on the machine the way
  wall time is;
- the client's wall time split: inside ``InferenceSession.step`` (the chain of servers, round trips included) and
  outside it (embeddings, final norm, LM head, transformers' generate loop).

CPU in the swarm beyond local's is overhead that the 2 cores must absorb; the time inside ``step`` beyond the
servers' compute is the chain's latency. Prints a markdown table; saves JSON and a bar chart.

    python benchmarks/bench_step_overhead.py --preset smoke    # to a temp folder
    python benchmarks/bench_step_overhead.py --preset full     # -> docs/results/step_overhead.{json,png}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args, save_figure  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.client.inference_session import InferenceSession  # noqa: E402
from corolla.local_swarm import LocalSwarm  # noqa: E402
from corolla.models.bundled import ensure_bundled_checkpoint  # noqa: E402

PRESETS = {"smoke": dict(new_tokens=8, rounds=1), "full": dict(new_tokens=48, rounds=5)}
PROMPT = "Tell me one interesting fact about the ocean."
SPANS = ["0:10", "10:20", "20:30"]


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


class _StepClock:
    """Adds up the wall time spent inside ``InferenceSession.step`` while installed."""

    def __init__(self):
        self.seconds = 0.0
        self._original = InferenceSession.step

    def __enter__(self):
        clock, original = self, self._original

        def timed_step(session, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(session, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - started

        InferenceSession.step = timed_step
        return self

    def __exit__(self, *exc):
        InferenceSession.step = self._original


def _groups(swarm: LocalSwarm) -> dict[str, list[psutil.Process]]:
    """The processes to watch, by role: this process, its own helpers, each server and its daemons, the bootstrap."""
    me = psutil.Process()
    groups: dict[str, list[psutil.Process]] = {"client": [me]}
    taken = set()
    for name, popen in swarm.processes.items():
        root = psutil.Process(popen.pid)
        tree = [root, *root.children(recursive=True)]
        taken |= {p.pid for p in tree}
        groups[f"{name} (python)"] = [root]
        groups[f"{name} (helpers: DHT, p2pd)"] = tree[1:]
    groups["client (helpers: DHT, p2pd)"] = [p for p in me.children(recursive=True) if p.pid not in taken]
    return groups


class _FromFirstToken:
    """A streamer for ``generate``: at the first new token (the prefill done) it notes the time, every watched
    process's CPU time and the step clock, so that the figures cover the decode steps only."""

    def __init__(self, groups: dict[str, list[psutil.Process]], clock: _StepClock):
        self.groups, self.clock, self.calls = groups, clock, 0
        self.at = self.cpu = self.in_step = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the prompt first, then the first new token
            self.cpu = {role: sum(_cpu(p) for p in procs) for role, procs in self.groups.items()}
            self.in_step = self.clock.seconds
            self.at = time.perf_counter()

    def end(self):
        pass


def _measure(model, ids, kwargs: dict, groups: dict[str, list[psutil.Process]], new_tokens: int) -> dict:
    """Per decode token (the prefill and first token excluded): wall ms, ms inside ``InferenceSession.step``, and
    CPU ms of each watched group of processes."""
    with _StepClock() as clock:
        first = _FromFirstToken(groups, clock)
        model.generate(ids, streamer=first, **kwargs)
        wall, in_step = time.perf_counter() - first.at, clock.seconds - first.in_step
    tokens = new_tokens - 1
    cpu = {role: (sum(_cpu(p) for p in procs) - first.cpu[role]) / tokens * 1e3 for role, procs in groups.items()}
    return dict(
        wall_ms=wall / tokens * 1e3,
        in_step_ms=in_step / tokens * 1e3,
        cpu_ms={role: value for role, value in cpu.items() if groups[role]},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    add_output_args(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    run = Run("step_overhead", args)
    torch.set_num_threads(1)
    new_tokens = preset["new_tokens"]

    path = str(ensure_bundled_checkpoint("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    args_servers = ["--throughput", "1", "--num-threads", "1"]
    rounds = []
    with LocalSwarm(model=path, spans=SPANS, server_args=args_servers) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        try:
            groups = _groups(swarm)
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up: routes, connections
            local.generate(ids, max_new_tokens=4, do_sample=False)
            for index in range(preset["rounds"]):
                order = ("local", "swarm") if index % 2 == 0 else ("swarm", "local")
                row = {}
                for which in order:
                    if which == "local":
                        row["local"] = _measure(local, ids, kwargs, {"client": groups["client"]}, new_tokens)
                    else:
                        row["swarm"] = _measure(model, ids, kwargs, groups, new_tokens)
                rounds.append(row)
                local_ms, swarm_ms = row["local"]["wall_ms"], row["swarm"]["wall_ms"]
                print(f"round {index}: local {local_ms:.1f} ms/token, swarm {swarm_ms:.1f} ms/token", flush=True)
        finally:
            model.shutdown()

    summary = _summary(rounds)
    run.save(params=dict(preset, spans=SPANS, prompt=PROMPT), results=dict(rounds=rounds, summary=summary))
    _plot(summary, run, args)
    print(table(dict(summary=summary)))


def _median(values) -> float:
    return statistics.median(list(values))


def _summary(rounds: list[dict]) -> dict:
    roles = list(rounds[0]["swarm"]["cpu_ms"])
    return dict(
        local_wall_ms=_median(r["local"]["wall_ms"] for r in rounds),
        local_cpu_ms=_median(r["local"]["cpu_ms"]["client"] for r in rounds),
        swarm_wall_ms=_median(r["swarm"]["wall_ms"] for r in rounds),
        swarm_in_step_ms=_median(r["swarm"]["in_step_ms"] for r in rounds),
        ratio=_median(r["swarm"]["wall_ms"] / r["local"]["wall_ms"] for r in rounds),
        ratio_range=[
            min(r["swarm"]["wall_ms"] / r["local"]["wall_ms"] for r in rounds),
            max(r["swarm"]["wall_ms"] / r["local"]["wall_ms"] for r in rounds),
        ],
        swarm_cpu_ms={role: _median(r["swarm"]["cpu_ms"][role] for r in rounds) for role in roles},
        rounds=len(rounds),
    )


def table(results: dict) -> str:
    s = results["summary"]
    total = sum(s["swarm_cpu_ms"].values())
    lo, hi = s["ratio_range"]
    lines = [
        f"Wall time per token: swarm {s['swarm_wall_ms']:.1f} ms, local {s['local_wall_ms']:.1f} ms: "
        f"**{s['ratio']:.2f}x** ({lo:.2f}–{hi:.2f}, {s['rounds']} interleaved rounds); of the swarm's, "
        f"{s['swarm_in_step_ms']:.1f} ms inside `InferenceSession.step` (the chain of servers) and "
        f"{s['swarm_wall_ms'] - s['swarm_in_step_ms']:.1f} ms in the client's own work.",
        "",
        "| process | CPU ms per token (median) |",
        "|---|---|",
        f"| local transformers (the whole model, 1 thread) | {s['local_cpu_ms']:.1f} |",
    ]
    lines += [f"| swarm: {role} | {value:.1f} |" for role, value in s["swarm_cpu_ms"].items()]
    lines.append(f"| **swarm, all processes** | **{total:.1f}** ({total / s['local_cpu_ms']:.2f}x local) |")
    return "\n".join(lines) + "\n"


def _plot(summary: dict, run: Run, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(summary["swarm_cpu_ms"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    left = 0.0
    for role in roles:
        value = summary["swarm_cpu_ms"][role]
        ax.barh(["swarm"], [value], left=left, label=role)
        left += value
    ax.barh(["local"], [summary["local_cpu_ms"]], color="gray", label="local transformers")
    ax.set_xlabel("CPU ms per generated token")
    ax.legend(fontsize=6, loc="lower right")
    ax.set_title(f"CPU per token by process, SmolLM2, 3 servers ({run.started.date()}, {args.machine})", fontsize=9)
    save_figure(fig, run.path(".png"))


if __name__ == "__main__":
    main()
