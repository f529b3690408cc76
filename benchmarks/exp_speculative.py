"""Speculative decoding through the swarm over an emulated network: greedy generation with and without prompt
lookup, in tokens/s, at several round-trip times.

SmolLM2-135M-Instruct (bundled), 3 servers x 10 blocks, each process in its own host of the network lab
(benchmarks/netlab): the client, the bootstrap peer and the servers. Every host's link gets the one-way delay
RTT/4 (so any two hosts are RTT apart) at 1 Gbit/s; the lab checks its shaping before each RTT. Push is on (the
default), so a step costs about 2 RTT of propagation whatever it carries.

Each prompt is a chat request, generated with ``model.generate`` (transformers' own loop, server-side caches):
greedy, exactly ``new_tokens`` new tokens, plain and with ``prompt_lookup_num_tokens`` (the servers check the guesses
in one step and drop the rejected ones). The two modes alternate per prompt and round (interleaved); the speedup
is plain time / lookup time of the same prompt in the same round. Prompts are of two kinds:

- ``copy``: answers that copy the prompt (rewriting with fixes, extraction, a code edit), where lookup helps;
- ``free``: answers written from scratch, where few guesses (if any) are accepted.

Both modes must produce the same tokens (greedy); the results record whether they did.

    sudo .venv/bin/python benchmarks/exp_speculative.py --preset smoke --out /tmp/exp
    sudo .venv/bin/python benchmarks/exp_speculative.py --preset full            # -> docs/results/
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
from benchmarks.netlab import Lab, LabError, LinkShape, unavailable_reason  # noqa: E402
from benchmarks.results import Run  # noqa: E402
from benchmarks.streamers import FirstTokenClock  # noqa: E402

PRESETS = {
    "smoke": dict(rtts=[0, 50], prompts=["rewrite", "poem"], new_tokens=16, rounds=1, lookup=8),
    "full": dict(
        rtts=[0, 50, 100, 200],
        prompts=["rewrite", "extract", "code", "poem", "explain"],
        new_tokens=48,
        rounds=2,
        lookup=8,
    ),
}
HOSTS = ["client", "boot", "s1", "s2", "s3"]
SERVER_HOSTS = ["s1", "s2", "s3"]
SPANS = ["0:10", "10:20", "20:30"]
RATE_MBIT = 1000

_TEXT = (
    "The river Thames flows through London and into the North Sea. Many bridges cross it, and boats carry "
    "visitors past the old warehouses. In winter the water rises after heavy rain, and the city watches the "
    "flood barrier closely. Parks line its banks, where people walk their dogs every morning."
)
_TYPOS = (
    _TEXT.replace("flows", "flowes")
    .replace("bridges", "bridgez")
    .replace("visitors", "visiters")
    .replace("morning", "mornnig")
)
_CODE = """def order_total(items, tax_rate):
    total = 0
    for item in items:
        total += item.price * item.quantity
    total = total * (1 + tax_rate)
    return round(total, 2)"""
PROMPTS = {
    "rewrite": ("copy", f"Correct the spelling mistakes in this text and write out the whole text:\n\n{_TYPOS}"),
    "extract": ("copy", f"Copy, word for word, every sentence of this text that mentions water:\n\n{_TEXT}"),
    "code": (
        "copy",
        f"Rename the variable `total` to `amount` in this Python function. Reply with the whole function.\n\n{_CODE}",
    ),
    "poem": ("free", "Write a short poem about autumn leaves."),
    "explain": ("free", "Why do cats purr? Answer in a few sentences."),
}


def measure(model, ids, *, new_tokens: int, lookup: int) -> dict:
    """One greedy generation of exactly ``new_tokens`` tokens; with ``lookup`` > 0, prompt lookup of that many."""
    clock = FirstTokenClock()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    if lookup:
        kwargs["prompt_lookup_num_tokens"] = lookup
    with model.inference_session(max_length=ids.shape[1] + new_tokens + lookup) as session:
        started = time.perf_counter()
        out = model.generate(ids, session=session, **kwargs)
        ended = time.perf_counter()
        steps, dropped = session.steps, session.dropped_tokens
    return dict(
        seconds=ended - started,
        first_token_s=clock.first_at - started,
        tokens=out[0, ids.shape[1] :].tolist(),
        steps=steps,
        dropped_tokens=dropped,
    )


def run_lab(lab: Lab, preset: dict) -> list[dict]:
    from transformers import AutoTokenizer

    from corolla import AutoDistributedModelForCausalLM
    from corolla.local_swarm import LocalSwarm
    from corolla.models.bundled import ensure_bundled_checkpoint

    path = ensure_bundled_checkpoint("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    host_of = {"bootstrap": "boot", **{f"server{i}": h for i, h in enumerate(SERVER_HOSTS)}}
    lab.shape(LinkShape(), verify=False)

    def process_args(name: str) -> list[str]:
        args = ["--host-maddrs", f"/ip4/{lab.address(host_of[name])}/tcp/0"]
        if name != "bootstrap":
            args += ["--throughput", "1.0", "--join-jitter", "0", "--num-threads", "1"]
        return args

    swarm = LocalSwarm(
        model=str(path),
        command_prefix=lambda name: lab.prefix(host_of[name]),
        process_args=process_args,
        log_dir=Path(tempfile.gettempdir()) / "corolla-exp-speculative-logs",
        start_timeout_s=600,
    )
    rows = []
    with swarm:
        for i, span in enumerate(SPANS):
            swarm.start_server(f"server{i}", ["--blocks", span])
        swarm.wait_until_served(30, min_servers=len(SPANS))
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, step_timeout_s=120
        )
        prompts = {
            name: tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPTS[name][1]}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
            for name in preset["prompts"]
        }
        try:
            measure(model, prompts[preset["prompts"][0]], new_tokens=4, lookup=0)  # warm-up (routes, caches)
            for rtt in preset["rtts"]:
                report = lab.shape(LinkShape(delay_ms=rtt / 4, rate_mbit=RATE_MBIT))  # LabError if off
                probe_rtt = statistics.median(v["measured"] for v in report["rtt_ms"].values())
                for round_index in range(preset["rounds"]):
                    for i, name in enumerate(preset["prompts"]):
                        modes = (0, preset["lookup"]) if (i + round_index) % 2 == 0 else (preset["lookup"], 0)
                        got = {
                            lookup: measure(model, prompts[name], new_tokens=preset["new_tokens"], lookup=lookup)
                            for lookup in modes
                        }
                        plain, spec = got[0], got[preset["lookup"]]
                        row = dict(
                            rtt_ms=rtt,
                            probe_rtt_ms=probe_rtt,
                            round=round_index,
                            prompt=name,
                            kind=PROMPTS[name][0],
                            prompt_tokens=int(prompts[name].shape[1]),
                            plain_s=plain["seconds"],
                            lookup_s=spec["seconds"],
                            plain_steps=plain["steps"],
                            lookup_steps=spec["steps"],
                            dropped_tokens=spec["dropped_tokens"],
                            speedup=plain["seconds"] / spec["seconds"],
                            same_tokens=plain["tokens"] == spec["tokens"],
                        )
                        print(json.dumps(row), flush=True)
                        rows.append(row)
        finally:
            model.shutdown()
    lab.shape(LinkShape(), verify=False)
    return rows


def summarize(rows: list[dict], new_tokens: int) -> list[dict]:
    """Per RTT and kind of prompt: median speedup (range over prompts and rounds), tokens/s of both modes, and how
    many tokens a lookup step carried on average."""
    summary = []
    for rtt in dict.fromkeys(r["rtt_ms"] for r in rows):
        for kind in ("copy", "free"):
            sel = [r for r in rows if r["rtt_ms"] == rtt and r["kind"] == kind]
            if not sel:
                continue
            speedups = [r["speedup"] for r in sel]
            summary.append(
                dict(
                    rtt_ms=rtt,
                    kind=kind,
                    speedup=statistics.median(speedups),
                    speedup_range=[min(speedups), max(speedups)],
                    plain_tokens_s=statistics.median(new_tokens / r["plain_s"] for r in sel),
                    lookup_tokens_s=statistics.median(new_tokens / r["lookup_s"] for r in sel),
                    tokens_per_step=statistics.median(new_tokens / r["lookup_steps"] for r in sel),
                    dropped_per_step=statistics.median(r["dropped_tokens"] / r["lookup_steps"] for r in sel),
                    same_tokens=all(r["same_tokens"] for r in sel),
                    samples=len(sel),
                )
            )
    return summary


def table(results: dict) -> str:
    lines = [
        "| RTT | prompts | plain tokens/s | lookup tokens/s | speedup (range) | tokens per step | rejected per step "
        "| same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in results["summary"]:
        lo, hi = s["speedup_range"]
        lines.append(
            f"| {s['rtt_ms']:g} ms | {s['kind']} | {s['plain_tokens_s']:.1f} | {s['lookup_tokens_s']:.1f} | "
            f"**{s['speedup']:.2f}x** ({lo:.2f}–{hi:.2f}) | {s['tokens_per_step']:.2f} | {s['dropped_per_step']:.2f} "
            f"| {'yes' if s['same_tokens'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], run: Run, args, preset: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = dict(rows=rows, summary=summarize(rows, preset["new_tokens"]))
    run.save(params=preset, results=results)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for kind, color in (("copy", "tab:green"), ("free", "tab:gray")):
        sel = [s for s in results["summary"] if s["kind"] == kind]
        x = [s["rtt_ms"] for s in sel]
        ax.plot(x, [s["plain_tokens_s"] for s in sel], "o--", color=color, label=f"{kind} prompts, plain")
        ax.plot(x, [s["lookup_tokens_s"] for s in sel], "o-", color=color, label=f"{kind} prompts, prompt lookup")
    ax.set_xlabel("RTT between hosts (ms)")
    ax.set_ylabel("tokens/s (greedy, median)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Speculative decoding, SmolLM2 on 3 servers ({run.started.date()}, {args.machine})", fontsize=9)
    save_figure(fig, run.path(".png"))
    print(f"machine: {machine_line(args.machine)}")
    print(table(results))


def main() -> int:
    parser = experiment_parser(__doc__, PRESETS)
    parser.add_argument("--rtts", nargs="+", type=float, help="override the preset's RTTs (ms)")
    parser.add_argument("--lookup", type=int, help="override the preset's prompt_lookup_num_tokens")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.rtts:
        preset["rtts"] = args.rtts
    if args.lookup:
        preset["lookup"] = args.lookup
    reason = unavailable_reason()
    if reason:
        print(f"error: cannot run the network lab here: {reason}", file=sys.stderr)
        return 2
    run = Run("speculative", args)
    try:
        with Lab(hosts=HOSTS) as lab:
            lab.enter("client")  # this process is the client: its sockets live in the lab
            rows = run_lab(lab, preset)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_outputs(rows, run, args, preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
