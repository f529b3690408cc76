"""Verification of servers' answers (``ClientConfig.verify``): how soon a liar is caught, and what checking costs.

SmolLM2 on a local swarm: two honest servers for each half of the model (0:15, 15:30) and a liar on 0:15 that adds
noise of 1 % of its outputs' norm and claims to be the fastest (every route starts with it).

- **Detection**: for each sampling rate, fresh clients generate greedily until the liar is caught (or N steps pass);
  the step at which it was caught, against 1 − (1 − p)^n, the chance that at least one of n steps was sampled (a check
  covers every step since the previous one, so the first sampled step after the first lie catches it).
- **Cost**: with the liar blocked, ms per token and the token positions that checking servers compute again per
  token through the session (both halves), for each rate, rounds interleaved (every rate once per round, then the
  ratio to no verification). A check covers every step since the previous one, so checkers compute about every token
  again at any rate; the rate sets how many checks (round trips, batched prefills) that takes and how soon a liar is
  caught.

    python benchmarks/bench_verification.py --preset smoke    # to a temp folder
    python benchmarks/bench_verification.py --preset full     # -> docs/results/verification.{json,png}
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args, save_figure  # noqa: E402

PRESETS = {
    "smoke": dict(detect_rates=[0.25, 1.0], trials=2, max_steps=8, cost_rates=[0.0, 1.0], rounds=1, new_tokens=8),
    "full": dict(
        detect_rates=[0.05, 0.1, 0.25, 0.5, 1.0],
        trials=12,
        max_steps=40,
        cost_rates=[0.0, 0.1, 0.25, 0.5, 1.0],
        rounds=5,
        new_tokens=32,
    ),  # fmt: skip
}
HOSTILE = str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hostile_server.py")
PROMPT = "Rewrite in plain words: the committee has resolved to postpone the meeting until further notice."


class _StopWhenCaught:
    """A transformers stopping criterion: stop once ``swarm`` distrusts someone; counts the steps."""

    def __init__(self, swarm):
        self.swarm, self.steps, self.caught_at = swarm, 0, None

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.steps += 1  # called after each step (the prompt's step is the first)
        if self.caught_at is None and self.swarm.distrusted():
            self.caught_at = self.steps
        return torch.full((input_ids.shape[0],), self.caught_at is not None, dtype=torch.bool)


def detection(model_name: str, initial_peers, ids: torch.Tensor, preset: dict) -> dict:
    from transformers import StoppingCriteriaList

    from corolla import AutoDistributedModelForCausalLM

    rows = {}
    for rate in preset["detect_rates"]:
        caught = []
        for trial in range(preset["trials"]):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                model_name, initial_peers=initial_peers, verify=rate, seed=1000 * trial + int(rate * 100),
                check_proofs=False,  # each client must catch the liar by itself (the first one publishes a proof)
            )  # fmt: skip
            try:
                stop = _StopWhenCaught(model.remote_blocks.swarm)
                model.generate(
                    ids, max_new_tokens=preset["max_steps"], min_new_tokens=preset["max_steps"], do_sample=False,
                    stopping_criteria=StoppingCriteriaList([stop]),
                )  # fmt: skip
                caught.append(stop.caught_at)
            finally:
                model.shutdown()
        rows[str(rate)] = {
            "rate": rate,
            "caught_at_step": caught,
            "caught_share": sum(c is not None for c in caught) / len(caught),
            "median_step": _median_step(caught),
        }
        print(f"rate {rate}: caught at steps {caught}", flush=True)
    return rows


def _median_step(caught: list[int | None]) -> float | None:
    """The median step at which liars were caught, counting those never caught as caught last (None: most not)."""
    ranked = sorted(c if c is not None else float("inf") for c in caught)
    median = statistics.median_low(ranked)
    return None if median == float("inf") else median


def cost(model_name: str, initial_peers, ids: torch.Tensor, blocked: str, preset: dict) -> dict:
    from corolla import AutoDistributedModelForCausalLM

    models = {
        rate: AutoDistributedModelForCausalLM.from_pretrained(
            model_name, initial_peers=initial_peers, verify=rate, seed=7, blocked_servers=(blocked,)
        )
        for rate in preset["cost_rates"]
    }
    times = {rate: [] for rate in models}
    checked = {rate: 0 for rate in models}
    generated = {rate: 0 for rate in models}
    try:
        for model in models.values():  # warm-up
            model.generate(ids, max_new_tokens=2, do_sample=False)
        for _ in range(preset["rounds"]):
            for rate, model in models.items():
                stats = model.remote_blocks.swarm.verifier.stats
                before = stats.checked_tokens
                start = time.perf_counter()
                out = model.generate(ids, max_new_tokens=preset["new_tokens"], do_sample=False)
                times[rate].append((time.perf_counter() - start) / (out.shape[1] - ids.shape[1]))
                checked[rate] += stats.checked_tokens - before
                generated[rate] += out.shape[1]  # the prompt's tokens pass through the servers too
    finally:
        for model in models.values():
            model.shutdown()
    base = times[preset["cost_rates"][0]]
    return {
        str(rate): {
            "rate": rate,
            "ms_per_token": statistics.median(t) * 1e3,
            "ratio_to_off": statistics.median(a / b for a, b in zip(t, base)),
            "recomputed_per_token": checked[rate] / generated[rate],
        }
        for rate, t in times.items()
    }


def _compute_ratio(row: dict, params: dict) -> float:
    """All servers' compute per token with checks, over without: a token passes each distinct span once."""
    return 1 + row["recomputed_per_token"] / len(set(params["spans"]))


def table(r: dict, preset: dict) -> str:
    lines = [
        f"| sampling rate | caught within {preset['max_steps']} steps | expected: 1-(1-p)^{preset['max_steps']} | "
        "median step caught | expected median |",
        "|---|---|---|---|---|",
    ]
    for row in r["detection"].values():
        p, n = row["rate"], preset["max_steps"]
        median = row["median_step"]
        expected_median = math.ceil(math.log(0.5) / math.log(1 - p)) if p < 1 else 1  # first n with P >= 1/2
        lines.append(
            f"| {p:g} | {row['caught_share'] * 100:.0f} % of {len(row['caught_at_step'])} | "
            f"{(1 - (1 - p) ** n) * 100:.0f} % | {'—' if median is None else f'{median:g}'} | {expected_median} |"
        )
    lines += [
        "",
        "| sampling rate | ms per token | vs verification off | token positions recomputed by checkers per token "
        "| servers' compute vs off |",
        "|---|---|---|---|---|",
    ]
    for row in r["cost"].values():
        lines.append(
            f"| {row['rate']:g} | {row['ms_per_token']:.1f} | {row['ratio_to_off']:.2f}x | "
            f"{row['recomputed_per_token']:.2f} | {_compute_ratio(row, preset):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(r: dict, preset: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = range(1, preset["max_steps"] + 1)
    for i, row in enumerate(r["detection"].values()):
        caught = row["caught_at_step"]
        measured = [sum(c is not None and c <= n for c in caught) / len(caught) for n in steps]
        left.step(list(steps), measured, where="post", color=f"C{i}", label=f"p = {row['rate']:g}")
        left.plot(list(steps), [1 - (1 - row["rate"]) ** n for n in steps], ":", color=f"C{i}")
    left.set_xlabel("steps generated")
    left.set_ylabel("share of liars caught")
    left.set_title("measured (solid) vs 1-(1-p)^n (dotted)", fontsize=9)
    left.legend(fontsize=7)
    rows = list(r["cost"].values())
    right.plot([x["rate"] for x in rows], [x["ratio_to_off"] for x in rows], "o-", label="ms per token vs off")
    compute = [_compute_ratio(x, preset) for x in rows]
    right.plot([x["rate"] for x in rows], compute, "s--", label="servers' compute vs off")
    right.set_xlabel("sampling rate")
    right.set_ylabel("x verification off")
    right.set_title("cost", fontsize=9)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--model", default="smollm2-135m")
    add_output_args(parser)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from corolla.local_swarm import LocalSwarm
    from corolla.models.checkpoint import resolve_checkpoint

    preset = PRESETS[args.preset]
    run = Run("verification", args)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(args.model).folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    spans = ["0:15", "0:15", "15:30", "15:30"]
    with LocalSwarm(model=args.model, spans=spans, server_args=["--throughput", "100"]) as swarm:
        swarm.start_server("liar", ["--blocks", "0:15", "--throughput", "1000000"], entry=[HOSTILE, "noise"])
        swarm.wait_until_served(min_servers=5)
        with torch.inference_mode():
            results = {
                "detection": detection(args.model, swarm.initial_peers, ids, preset),
                "cost": cost(args.model, swarm.initial_peers, ids, swarm.peer_ids["liar"], preset),
            }
    title = f"{args.model}, 2 honest servers per half + a liar (1 % noise), CPU, preset {args.preset}"
    print(f"\n## Verification, {title}\n")
    params = dict(preset, model=args.model, spans=spans, liar="noise 1 % on 0:15")
    print(table(results, params))
    run.save(params=params, results=results)
    plot(results, params, run.path(".png"), title)


if __name__ == "__main__":
    main()
