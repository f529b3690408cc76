"""Where a decode step's wall time goes, hop by hop, through a loopback swarm (issue 16, part 1).

SmolLM2-135M-Instruct, float32, 3 servers x 10 blocks, one torch thread in every process, batch-1 greedy generation
(push on, the default). The servers and the client start with ``benchmarks/timeline_probe`` on their path: every
process notes when it enters and leaves the functions of a step's path (``perf_counter``, one clock for all the
processes of a machine). For every decode step, the critical path is cut into:

- client → first server: from ``InferenceSession.step`` being called to the first server starting the step;
- per server: handling before the model (decoding, checks, hand-off to the compute thread), the model itself,
  and after the model until its output is on its way (back from the compute thread, serialization);
- each hop to the next server (the push, or the client's copy, whichever started the step), and the last server's
  answer back to ``InferenceSession.step`` returning.

Medians over the decode steps of every round. Local transformers generation of the same tokens alternates with the
swarm's, round by round, for the ratio. ``--before REV`` first runs this script on the library of git revision REV
(a temporary worktree) and records both timelines, each with its own local baseline.

    python benchmarks/bench_step_timeline.py --preset smoke                # to a temp folder
    python benchmarks/bench_step_timeline.py --preset full --before REV   # -> docs/results/step_timeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_step_overhead import PRESETS, PROMPT, SPANS  # noqa: E402  (the same swarm and prompt)
from benchmarks.results import ROOT, Run, add_output_args, save_figure  # noqa: E402

PROBE = Path(__file__).resolve().parent / "timeline_probe"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--before", metavar="REV", help="also time the library of this git revision, first")
    parser.add_argument("--label", default="this tree", help="what the timeline is of (in the results)")
    parser.add_argument("--raw-json", type=Path, help=argparse.SUPPRESS)  # internal: write the timeline here only
    add_output_args(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    run = None if args.raw_json is not None else Run("step_timeline", args)  # (times the whole run)
    timelines = []
    if args.before:
        timelines.append(_timeline_of_revision(args.before, args.preset))
    timeline = measure(preset)
    timeline["label"] = args.label if not args.before else "after"
    if args.raw_json is not None:
        args.raw_json.write_text(json.dumps(timeline))
        return
    timelines.append(timeline)
    run.save(params=dict(preset, spans=SPANS, prompt=PROMPT, before=args.before), results=dict(timelines=timelines))
    _plot(timelines, run, args)
    print(table(dict(timelines=timelines)))


def _timeline_of_revision(rev: str, preset: str) -> dict:
    """This script's timeline with the library of ``rev`` (its ``src`` first on the path of every process)."""
    with tempfile.TemporaryDirectory(prefix="corolla-timeline-") as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True, timeout=120,
                       capture_output=True)  # fmt: skip
        try:
            out = Path(folder) / "timeline.json"
            env = dict(os.environ, PYTHONPATH=str(tree / "src"))
            command = [sys.executable, __file__, "--preset", preset, "--raw-json", str(out), "--label", "before"]
            subprocess.run(command, env=env, check=True, timeout=1800)
            timeline = json.loads(out.read_text())
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, timeout=120)
        commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, timeout=30)
        timeline.update(label="before", commit=commit.stdout.strip())
        return timeline


def measure(preset: dict) -> dict:
    """Rounds of local and swarm generation, alternating; the swarm's decode steps cut into their segments."""
    with tempfile.TemporaryDirectory(prefix="corolla-timeline-events-") as events:
        os.environ["COROLLA_TIMELINE_DIR"] = events
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(PROBE)]))
        import importlib.util

        spec = importlib.util.spec_from_file_location("corolla_timeline_probe", PROBE / "sitecustomize.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))  # the probe, in this process too
        from corolla import AutoDistributedModelForCausalLM
        from corolla.local_swarm import LocalSwarm
        from corolla.models.bundled import ensure_bundled_checkpoint

        torch.set_num_threads(1)
        path = str(ensure_bundled_checkpoint("smollm2-135m"))
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        new_tokens = preset["new_tokens"]
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        args_servers = ["--throughput", "1", "--num-threads", "1"]
        local_ms, swarm_ms, windows = [], [], []
        with LocalSwarm(model=path, spans=SPANS, server_args=args_servers) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
            try:
                model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up: routes, connections, push streams
                local.generate(ids, max_new_tokens=4, do_sample=False)
                for index in range(preset["rounds"]):
                    for which in ("local", "swarm") if index % 2 == 0 else ("swarm", "local"):
                        started = time.perf_counter_ns()
                        (local if which == "local" else model).generate(ids, **kwargs)
                        ended = time.perf_counter_ns()
                        (local_ms if which == "local" else swarm_ms).append((ended - started) / new_tokens / 1e6)
                        if which == "swarm":
                            windows.append((started, ended))
            finally:
                model.shutdown()
            server_pids = [swarm.processes[f"server{i}"].pid for i in range(len(SPANS))]
        steps = _steps(_events(Path(events)), client=os.getpid(), servers=server_pids, windows=windows)
    return dict(
        local_ms_per_token=statistics.median(local_ms),
        swarm_ms_per_token=statistics.median(swarm_ms),
        ratio=statistics.median(swarm / local for swarm, local in zip(swarm_ms, local_ms)),
        decode_steps=len(steps),
        segments={name: statistics.median(step[name] for step in steps) for name in steps[0]},
    )


def _events(folder: Path) -> list[tuple[int, int, str]]:
    events = []
    for file in folder.glob("timeline_*.txt"):
        for line in file.read_text().splitlines():
            at, pid, name = line.split(maxsplit=2)
            events.append((int(at), int(pid), name))
    return sorted(events)


def _steps(events, *, client: int, servers: list[int], windows) -> list[dict[str, float]]:
    """Each decode step's segments in ms (the prefill, the first step of a generation, is left out)."""
    starts = [at for at, pid, name in events if pid == client and name == "C.step>"]
    ends = [at for at, pid, name in events if pid == client and name == "C.step<"]
    steps = []
    for window_start, window_end in windows:
        calls = [(a, b) for a, b in zip(starts, ends) if window_start <= a and b <= window_end][1:]  # no prefill
        for begin, end in calls:
            inside = [(at, pid, name) for at, pid, name in events if begin <= at <= end]
            segments = _segments(inside, begin, end, servers)
            if segments is not None:
                steps.append(segments)
    return steps


def _first(events, pid: int, name: str, after: int = 0) -> int | None:
    return next((at for at, p, n in events if p == pid and n == name and at >= after), None)


def _segments(events, begin: int, end: int, servers: list[int]) -> dict[str, float] | None:
    ms = 1e-6
    segments = {}
    previous_end, previous_name = begin, "client"
    for index, pid in enumerate(servers):
        model_start = _first(events, pid, "S.model>", previous_end)
        if model_start is None:
            return None
        arrived = max(at for at, p, n in events if p == pid and n == "S.step>" and at <= model_start)
        model_end = _first(events, pid, "S.model<", model_start)
        last = index == len(servers) - 1
        sent = _first(events, pid, "S.pack_answer<" if last else "S.pack_push<", model_end)
        if model_end is None or sent is None:
            return None
        segments[f"{previous_name} → server {index}"] = (arrived - previous_end) * ms
        segments[f"server {index}: before the model"] = (model_start - arrived) * ms
        segments[f"server {index}: model"] = (model_end - model_start) * ms
        segments[f"server {index}: after the model"] = (sent - model_end) * ms
        previous_end, previous_name = sent, f"server {index}"
    segments[f"{previous_name} → client (step returns)"] = (end - previous_end) * ms
    segments["whole step"] = (end - begin) * ms
    return segments


def table(results: dict) -> str:
    timelines = results["timelines"]
    names = list(timelines[-1]["segments"])
    header = " | ".join(f"{t['label']} (ms)" for t in timelines)
    lines = [f"| segment of a decode step (median) | {header} |", "|---|" + "---|" * len(timelines)]
    for name in names:
        cells = " | ".join(f"{t['segments'].get(name, float('nan')):.2f}" for t in timelines)
        lines.append(f"| {'**' + name + '**' if name == 'whole step' else name} | {cells} |")
    overhead = " | ".join(
        f"{t['segments']['whole step'] - sum(v for k, v in t['segments'].items() if k.endswith(': model')):.2f}"
        for t in timelines
    )
    lines.append(f"| everything but the servers' model calls | {overhead} |")
    per_token = " | ".join(
        f"{t['swarm_ms_per_token']:.1f} vs {t['local_ms_per_token']:.1f} local: **{t['ratio']:.2f}x**"
        for t in timelines
    )
    lines.append(f"| per token, whole generation (swarm vs local, interleaved) | {per_token} |")
    return "\n".join(lines) + "\n"


def _plot(timelines: list[dict], run: Run, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(timelines)))
    colors = {"model": "#4c72b0", "before": "#dd8452", "after": "#c44e52", "hop": "#8c8c8c"}
    for row, timeline in enumerate(timelines):
        left = 0.0
        for name, value in timeline["segments"].items():
            if name == "whole step":
                continue
            kind = "model" if name.endswith(": model") else "hop" if "→" in name else "before"
            ax.barh([row], [value], left=left, color=colors[kind], edgecolor="white", linewidth=0.5)
            left += value
    ax.set_yticks(range(len(timelines)), [t["label"] for t in timelines])
    ax.set_xlabel("ms of one decode step: blue = servers' model calls, grey = hops, orange = handling in a process")
    ax.set_title(f"A decode step through 3 servers, SmolLM2 ({run.started.date()}, {args.machine})", fontsize=9)
    save_figure(fig, run.path(".png"))


if __name__ == "__main__":
    main()
