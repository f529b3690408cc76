"""Regenerate the result tables of ``docs/benchmarks.md`` and the headline ranges of ``README.md`` from the results
files the benchmarks wrote (``docs/results/<name>.json``, see ``benchmarks/results.py``).

Only the text between marker comments is replaced, so the prose around the tables stays hand-written::

    <!-- results:inference -->
    ...generated...
    <!-- /results:inference -->

    python benchmarks/make_tables.py            # rewrite the files
    python benchmarks/make_tables.py --check    # exit 1 if a file is not up to date with the JSON
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import RESULTS_DIR, ROOT, load, machine_summary  # noqa: E402

DOCS = (ROOT / "docs" / "benchmarks.md", ROOT / "README.md")
MARKER = re.compile(r"(<!-- results:(?P<key>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=key) -->)", re.S)


def _range(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    if fmt.format(lo) == fmt.format(hi):
        return fmt.format(lo)
    sep = " to " if lo < 0 else "–"  # "-28–79" reads as a minus sign and a dash
    return f"{fmt.format(lo)}{sep}{fmt.format(hi)}"


def _small(value: float) -> str:
    """Two decimals, or two significant digits below 0.1 (a capped restart's rate is not 0.00)."""
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.2g}"


def _x(ratio: float, lohi: list[float] | None = None) -> str:
    return f"{ratio:.2f}x" + (f" ({_range(lohi)})" if lohi else "")


def caption(data: dict) -> str:
    """Where a table's numbers come from: the command, preset, date, machine, load, commit and results file."""
    load_avg = (data.get("load_avg") or {}).get("start")
    load_text = f", load average {load_avg[0]:.1f} at start" if load_avg else ""
    commit = (data["git"].get("commit") or "unknown")[:10] + (
        " (with local changes)" if data["git"].get("dirty") else ""
    )
    return (
        f"`{data['command']}` — preset **{data['preset']}**, {data['date'][:10]}, {data['duration_s']:.0f} s; "
        f"{machine_summary(data['machine'])}{load_text}; commit {commit}; "
        f"[results/{data['benchmark']}.json](results/{data['benchmark']}.json)\n"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def inference(d: dict) -> str:
    r = d["results"]
    rounds = len(r["ratio_rounds"])
    return _table(
        ["metric", "swarm", "local transformers", "swarm / local", "target"],
        [
            [
                f"ms per token, median of {rounds} interleaved rounds",
                f"{r['swarm_ms_per_token']:.1f}",
                f"{r['local_ms_per_token']:.1f}",
                f"**{_x(r['ratio'], r['ratio_range'])}**",
                "≤ 1.5x",
            ],
            ["time to first token (session open)", f"{r['ttft_s']:.3f} s", "", "", "< 1 s"],
            [
                f"server cold start, median of {len(r['cold_start_s_servers'])} (range)",
                f"{r['cold_start_s']:.2f} s ({_range(r['cold_start_s_servers'])} s)",
                "",
                "",
                "< 4 s",
            ],
        ],
    )


def cold_start(d: dict) -> str:
    r = d["results"]
    floor = r["medians_s"]["import floor"]
    rows = [
        [name, f"{median:.2f} s", f"{_range(r['rounds_s'][name])} s", f"{median / floor:.2f}x"]
        for name, median in r["medians_s"].items()
    ]
    table = _table(["measurement", "median", f"range ({len(r['server_over_floor_rounds'])} rounds)", "vs floor"], rows)
    return table + (
        f"\nServer / floor per round: {_range(r['server_over_floor_rounds'])}x; server − floor: "
        f"{r['server_minus_floor_s']:+.2f} s (median).\n"
    )


def training(d: dict) -> str:
    rows = []
    for label, r in d["results"].items():
        rows.append(
            [label, f"{r['step_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"**{_x(r['ratio'], r['ratio_range'])}**"]
        )
    rounds = len(next(iter(d["results"].values()))["step_s_rounds"])
    return _table(["setup", f"s/step (median of {rounds} rounds)", "tokens/s", "vs local: median (range)"], rows)


def quantization(d: dict) -> str:
    rows = []
    for mode in ("none", "int8", "nf4"):
        r = d["results"][mode]
        rows.append(
            [
                "float32" if mode == "none" else mode,
                r["backend"],
                f"{r['weight_bytes'] / 2**20:.1f} MiB ({r['weight_ratio']:.3f})",
                f"{r['decode_ms']:.1f}",
                _x(r["decode_ratio"], r["decode_ratio_range"]),
                f"{r['prefill_ms']:.2f}",
                _x(r["prefill_ratio"], r["prefill_ratio_range"]),
            ]
        )
    header = ["mode", "backend", "linear weights (vs fp32)", "decode ms/token", "vs fp32: median (range)"]
    speed = _table([*header, "prefill ms/token", "vs fp32: median (range)"], rows)
    p = d["params"]
    quality = [
        [mode, f"{q['logit_error_mean']:.2f} / {q['logit_error_max']:.1f}", f"{q['next_token_agreement']:.2f}",
         f"{q['free_running_identical']:.2f}"]
        for mode, q in d["results"]["quality"].items()
    ]  # fmt: skip
    header = ["mode", "mean / max logit error", "next-token agreement", "identical free-running tokens"]
    return speed + (
        f"\nQuality, all 30 decoder layers quantized vs float, {p['quality_prompts']} chat prompts × "
        f"{p['quality_tokens']} greedy tokens:\n\n" + _table(header, quality)
    )


def routing(d: dict) -> str:
    r, p = d["results"], d["params"]
    return _table(
        ["operation", "median", "p90", "range", "median / 50 ms target"],
        [
            [
                f"find_inference_route, {p['servers']} servers × {p['blocks']} blocks ({r['routes']} routes)",
                f"{r['route_median_ms']:.1f} ms",
                f"{r['route_p90_ms']:.1f} ms",
                f"{r['route_min_ms']:.1f}–{r['route_max_ms']:.1f} ms",
                f"**{r['median_over_target']:.2f}**",
            ],
            [
                f"split_by_throughput, {p['split_items']} chains",
                f"{r['split_median_ms']:.1f} ms",
                "",
                "",
                f"{r['split_us_per_chain']:.0f} µs per chain",
            ],
        ],
    )


def recovery(d: dict) -> str:
    r = d["results"]
    n = len(r["repeats"])
    return _table(
        ["metric", f"median of {n} repeats"],
        [
            ["normal step", f"{r['normal_step_ms']:.1f} ms"],
            ["extra delay of the step during which the server died", f"{r['extra_delay_ms']:.1f} ms"],
            ["replay compute (the history through 10 blocks, measured in the same run)", f"{r['replay_ms']:.1f} ms"],
            [
                "recovery overhead = extra delay − replay (target < 250 ms)",
                f"**{r['overhead_ms']:.1f} ms** (repeats: {_range(r['overhead_ms_repeats'], '{:.0f}')} ms)",
            ],
        ],
    )


def inference_network(d: dict) -> str:
    rows = []
    for r in d["results"]["rows"]:
        rows.append(
            [
                r["model"],
                f"{r['rate_mbit']:g} Mbit/s",
                f"{r['rtt_ms']:g} ms",
                f"{r['probe_rtt_ms']:.1f} ms",
                f"{r['push_ms']:.0f}",
                f"{r['push_bound_ms']:.0f}",
                f"{r['nopush_ms']:.0f}",
                f"{r['nopush_bound_ms']:.0f}",
                f"{r['nopush_ms'] / r['push_ms']:.2f}x",
            ]
        )
    header = ["model", "rate", "RTT", "probe RTT", "push ms/step", "bound", "no push", "bound", "push gain"]
    return _table(header, rows)


def fault_tolerance(d: dict) -> str:
    rows = []
    for r in d["results"]["rows"]:
        rate = "crash" if r["tokens_per_s"] is None else _small(r["tokens_per_s"])
        if r.get("capped"):
            rate = f"capped: {rate} analytic"
        rows.append(
            [
                f"{r['model']}, {r['n']}",
                f"{r['p']:g}",
                r["strategy"],
                rate,
                "-" if r["vs_p0"] is None else _small(r["vs_p0"]),
                str(r["failures"]),
                str(r["restarts"]),
                "-" if r["same_tokens"] is None else str(r["same_tokens"]),
            ]
        )
    header = ["model, tokens", "p", "strategy", "tokens/s", "vs p=0", "failures", "restarts/recomputes"]
    return _table([*header, "same tokens as p=0"], rows)


def offloading(d: dict) -> str:
    res = d["results"]
    swarm = next(r["ms_per_token"] for r in res["rows"] if r["setup"] == "swarm")
    rows = [[r["setup"], f"{r['ms_per_token']:.1f}", f"{r['ms_per_token'] / swarm:.2f}", str(r["same_tokens"])]
            for r in res["rows"]]  # fmt: skip
    rows += [[f"analytic bound: {b['name']}", f"{b['ms']:.1f}", f"{b['ms'] / swarm:.2f}", ""] for b in res["bounds"]]
    return _table(["setup", "ms/token", "/ swarm", "same tokens as local"], rows)


def heterogeneous(d: dict) -> str:
    res, phases = d["results"], d["params"]["phases"]
    rows = []
    for i, phase in enumerate(phases):
        auto, naive = res["auto"]["phases"][i], res["naive"]["phases"][i]
        a, n = auto["tokens_per_s_2nd_half"], naive["tokens_per_s_2nd_half"]
        ratio = f"**{a / n:.2f}x**" if n else "-"
        rows.append([phase["label"], f"{a:.0f}", f"{n:.0f}", ratio, str(auto["errors"]), str(naive["errors"])])
    header = ["phase", "auto tokens/s (2nd half)", "naive tokens/s", "auto / naive", "auto errors", "naive errors"]
    return _table(header, rows)


def swarm_sim(d: dict) -> str:
    rows = d["results"]["rows"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    lifetimes = list(dict.fromkeys(r["lifetime"] for r in rows))
    table = []
    for lifetime in lifetimes:
        cells = {r["policy"]: r for r in rows if r["lifetime"] == lifetime}
        label = "no churn" if lifetime is None else f"{lifetime:.0f} s"
        table.append(
            [label]
            + [
                f"{c['throughput_mean']:.2f} ({c['throughput_min']:.2f}–{c['throughput_max']:.2f})"
                for c in (cells[p] for p in policies)
            ]
            + [str(cells[policies[-1]]["moves"])]
        )
    return _table(["mean peer lifetime", *policies, "moves (last policy)"], table)


def swarm_training(d: dict) -> str:
    rows = []
    for name, x in d["results"]["setups"].items():
        rows.append([
            name,
            f"{x['samples_per_s']:.1f} ({_range(x['samples_per_s_rounds'], '{:.1f}')})",
            f"{x['tokens_per_s']:.0f}",
            _x(x["ratio"], x.get("ratio_range")),
            f"{x.get('failed_microbatches', 0)} / {x.get('retried_calls', 0)}",
        ])  # fmt: skip
    header = ["setup", "samples/s, median (range)", "tokens/s", "samples/s vs local (range)", "failed / retried"]
    return _table(header, rows)


def swarm_churn(d: dict) -> str:
    rows = [
        [
            policy,
            f"{x['samples_per_s_mean']:.1f} ({x['samples_per_s_min']:.1f}–{x['samples_per_s_max']:.1f})",
            str(x["failed_microbatches"]),
            str(x["moves"]),
            str(x["kills"]),
            f"{x['empty_stage_s']:.1f}",
            str(x["runs"]),
        ]
        for policy, x in d["results"]["summary"].items()
    ]
    header = ["policy", "samples/s: mean (range)", "failed micro-batches", "moves", "kills", "stage empty (s)", "runs"]
    return _table(header, rows)


def square_cube(d: dict) -> str:
    rows = [
        [
            str(x["hidden"]),
            f"{x['block_parameters'] / 1e6:.2f} M",
            f"{x['none_lab_sps']:.1f} / {x['none_loopback_sps']:.1f} = **{x['none_ratio']:.2f}**",
            f"{x['uniform_8bit_lab_sps']:.1f} / {x['uniform_8bit_loopback_sps']:.1f} = "
            f"**{x['uniform_8bit_ratio']:.2f}**",
        ]
        for x in d["results"]["rows"]
    ]
    header = ["hidden", "params per block", "lab / loopback samples/s, float32 wire", "same, 8-bit wire"]
    return _table(header, rows)


def swarm_compression(d: dict) -> str:
    r = d["results"]
    rows = []
    for name, x in r["settings"].items():
        if x["stages"]:
            counts = [s["rounds_averaged_with_2"] if x["peers_per_stage"] > 1 else s["optimizer_steps"]
                      for s in x["stages"].values()]  # fmt: skip
            steps = f"{min(counts)}–{max(counts)}" if min(counts) != max(counts) else str(counts[0])
        else:
            steps = "-"
        reached = "not reached" if x["steps_to_margin"] is None else str(x["steps_to_margin"])
        rows.append([name, f"{x['final_above_floor']:.3f}", reached, steps, str(x["failed_microbatches"])])
    b = r["bytes"]
    header = ["setting", "loss − floor, last 10 steps", "first step within floor + 0.2", "steps (averaged rounds)",
              "failed micro-batches"]  # fmt: skip
    sizes = (
        f"Wire bytes per micro-batch, {r['wire_8bit_codec']} vs NONE: {b['wire_ratio']:.2f}x. "
        "Averaged bytes per round and peer vs NONE: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in b["averaging_ratio"].items() if k != "NONE")
        + f". Entropy floor {r['floor']:.3f} nat; 1 peer/stage without compression vs the local run: max |loss "
        f"difference| {r['max_diff_vs_local']:.2g}.\n\n"
    )
    return sizes + _table(header, rows)


def btard_sim(d: dict) -> str:
    from benchmarks.exp_btard_sim import table

    r = d["results"]
    gates = "; ".join(f"{name}: {'passed' if g['passed'] else '**FAILED**'}" for name, g in r["gates"].items())
    return table(r["cells"], d["params"]["preset"]) + "\nGates: " + gates + ".\n"


def btard_overhead(d: dict) -> str:
    from benchmarks.bench_btard_overhead import table

    return table(d["results"])


def api(d: dict) -> str:
    from benchmarks.bench_api import table

    return table(d["results"])


def nat_relay(d: dict) -> str:
    from benchmarks.exp_nat_relay import table

    return table(d["results"])


def verification(d: dict) -> str:
    from benchmarks.bench_verification import table

    return table(d["results"], d["params"])


def answer_signing(d: dict) -> str:
    from benchmarks.bench_answer_signing import table

    return table(d["results"])


def span_loading(d: dict) -> str:
    from benchmarks.bench_span_loading import table

    return table(d["results"], d["params"])


def batching(d: dict) -> str:
    from benchmarks.bench_batching import table

    return table(d["results"])


def step_overhead(d: dict) -> str:
    from benchmarks.bench_step_overhead import table

    return table(d["results"])


def step_timeline(d: dict) -> str:
    from benchmarks.bench_step_timeline import table

    return table(d["results"])


def speculative(d: dict) -> str:
    from benchmarks.exp_speculative import table

    return table(d["results"])


def headline(results: dict[str, dict]) -> str:
    """README's short list of measured numbers, each with its ratio or range and preset."""
    lines = []

    def add(name: str, text: Callable[[dict], str]) -> None:
        if name in results:
            d = results[name]
            lines.append(f"- {text(d['results'])} ({name}, preset {d['preset']}, {d['date'][:10]})")

    add("inference", lambda r: (
        f"Inference on loopback: swarm {_x(r['ratio'], r['ratio_range'])} local transformers' per-token latency "
        f"(median, range over rounds), time to first token {r['ttft_s']:.2f} s, server cold start "
        f"{_range(r['cold_start_s_servers'])} s"
    ))  # fmt: skip
    add("training", lambda r: "Training step through the swarm: " + ", ".join(
        f"{label} {_x(v['ratio'], v['ratio_range'])} local" for label, v in r.items() if label.startswith("swarm")
    ))  # fmt: skip
    add("recovery", lambda r: (
        f"Recovery from a SIGKILLed server: {r['overhead_ms']:.0f} ms overhead (repeats "
        f"{_range(r['overhead_ms_repeats'], '{:.0f}')} ms; target < 250 ms)"
    ))  # fmt: skip
    add("routing", lambda r: (
        f"Routing over 1,000 servers: median {r['route_median_ms']:.1f} ms, p90 {r['route_p90_ms']:.1f} ms "
        f"(target 50 ms)"
    ))  # fmt: skip

    def quant(r: dict) -> str:
        int8, nf4 = (_x(r[m]["decode_ratio"], r[m]["decode_ratio_range"]) for m in ("int8", "nf4"))
        return (
            f"Quantized blocks, CPU decode time vs float32: int8 {int8}, nf4 {nf4}, for "
            f"{r['int8']['weight_ratio']:.2f} and {r['nf4']['weight_ratio']:.2f} of the weight memory; greedy "
            f"next-token agreement with float {r['quality']['int8']['next_token_agreement']:.2f} (int8) and "
            f"{r['quality']['nf4']['next_token_agreement']:.2f} (nf4)"
        )

    add("quantization", quant)

    def network(r: dict) -> str:
        rows = r["rows"]
        gains = [x["nopush_ms"] / x["push_ms"] for x in rows if x["rtt_ms"] >= 100]
        zero = [x["nopush_ms"] / x["push_ms"] for x in rows if x["rtt_ms"] == 0]
        if min(zero) < 1:
            at_zero = f"slower at RTT 0 ({_range(zero)}x), where the extra copies cost CPU on 2 cores"
        else:
            at_zero = f"{_range(zero)}x at RTT 0 (not slower there in this run)"
        return (
            f"Network lab, SmolLM2: with server-to-server push a step is {_range(gains)}x faster "
            f"(no-push time / push time) at RTT ≥ 100 ms, {at_zero}"
        )

    add("inference_network", network)

    def faults(r: dict) -> str:
        rec = [x for x in r["rows"] if x["strategy"] == "recovery" and x["p"] > 0 and x["vs_p0"] is not None]
        return (
            f"Random failures: corolla's recovery keeps {_range([x['vs_p0'] for x in rec])} of its p = 0 speed "
            f"({sum(x['failures'] for x in rec)} failures in all, tokens identical: "
            f"{all(x['same_tokens'] for x in rec)})"
        )

    add("fault_tolerance", faults)
    add("offloading", lambda r: "Swarm vs offloading from a cold disk: offloading " + ", ".join(
        f"{x['ms_per_token'] / next(y['ms_per_token'] for y in r['rows'] if y['setup'] == 'swarm'):.1f}x slower"
        for x in r["rows"] if x["setup"].startswith("offload (cold")
    ))  # fmt: skip

    def hetero(r: dict) -> str:
        ratios = []
        for a, n in zip(r["auto"]["phases"], r["naive"]["phases"], strict=True):
            if n["tokens_per_s_2nd_half"]:
                ratios.append(a["tokens_per_s_2nd_half"] / n["tokens_per_s_2nd_half"])
        return f"Heterogeneous swarm: automatic block choice {_range(ratios)}x the naive split's throughput"

    add("heterogeneous", hetero)

    def sim(r: dict) -> str:
        cell = {(x["lifetime"], x["policy"]): x["throughput_mean"] for x in r["rows"]}
        rebalanced = cell[(600.0, "wiring + rebalancing")]
        return (
            f"SWARM simulator (4 stages × 3 peers): throughput-aware wiring {cell[(None, 'wiring')]:.2f} vs uniform "
            f"{cell[(None, 'uniform')]:.2f} micro-batches/s without churn; at 600 s mean peer life, rebalancing "
            f"{rebalanced / cell[(600.0, 'wiring')]:.2f}x wiring alone when peers come back at a random stage, "
            f"{rebalanced / cell[(600.0, 'wiring, same stage')]:.2f}x when they come back at their own"
        )

    add("swarm_sim", sim)

    def btard(r: dict) -> str:
        cells = [c for c in r["cells"].values() if c["aggregator"] == "BTARD" and c["attack"] != "none"]
        mean = [
            c["final_accuracy"] for c in r["cells"].values() if c["aggregator"] == "mean" and c["attack"] != "none"
        ]
        banned = [c["all_attackers_banned_by"] for c in cells]
        accuracy = _range([c["final_accuracy"] for c in cells])
        return (
            f"BTARD simulation (16 peers, 7 attacking): BTARD test accuracy {accuracy}"
            f" across {len(cells)} attacks (the mean: {_range(mean)}), every attacker banned by step "
            f"{max(banned) if None not in banned else 'never'}, "
            f"{sum(len(c['honest_banned']) for c in r['cells'].values())} honest peers banned"
        )

    add("btard_sim", btard)

    def overhead(r: dict) -> str:
        cells = r["cells"]
        parts = [
            f"{int(k.split(':')[1]):,} values {c['ratio']:.2f}x "
            f"({c['ratio_vs_allreduce_only']:.1f}x the all-reduce alone)"
            for k, c in cells.items()
        ]
        link = next(iter(cells)).split(":")[0]
        return f"BTARD step vs hivemind's averager step, 4 peers, {link}: " + "; ".join(parts)

    add("btard_overhead", overhead)
    add("btard_overhead_lab", overhead)

    def gateway(r: dict) -> str:
        levels = {level["clients"]: level for level in r["concurrency"]}
        most = max(levels)
        gain = levels[most]["aggregate_tokens_per_s"] / levels[1]["aggregate_tokens_per_s"]
        return (
            f"OpenAI-compatible API vs the Python client on the same swarm: time to first token "
            f"{r['ttft_ratio']:.2f}x, ms per token {r['ms_per_token_ratio']:.2f}x; {most} concurrent streams "
            f"{gain:.1f}x the tokens/s of one"
        )

    add("api", gateway)

    def relayed(r: dict) -> str:
        extra = r["info_rtt_ms"]["relayed"] - r["info_rtt_ms"]["direct"]
        tokens = r["tokens_equal_local"]
        return (
            f"Server behind NAT in the network lab, reached through a relay: the relayed hop adds {extra:.1f} ms per "
            f"round trip; generation through it: tokens equal local: {tokens['relayed']} "
            f"({r['rounds_completed']['relayed']} of {r['rounds_completed']['direct']} rounds completed)"
        )

    add("nat_relay", relayed)

    def checked(r: dict) -> str:
        detection = [row for row in r["detection"].values() if row["median_step"] is not None]
        caught = "; ".join(f"p = {row['rate']:g}: step {row['median_step']:g}" for row in detection)
        every = r["cost"].get("1.0") or r["cost"][max(r["cost"], key=float)]
        return (
            f"Verification against a liar adding 1 % noise, median step at which it was caught: {caught}; checking "
            f"every step costs {every['ratio_to_off']:.2f}x the ms per token of no verification"
        )

    add("verification", checked)

    def signing(r: dict) -> str:
        step = next(row for row in r["per_answer"] if row["tokens"] == 1)
        longest = max((row for row in r["proofs"] if row["fits_dht"]), key=lambda row: row["session_tokens"])
        return (
            f"Signed answers: signing a decode step costs the server {step['sign_us']:.0f} µs "
            f"({100 * step['sign_share']:.1f} % of its compute), checking its receipt a verifying client "
            f"{step['check_us']:.0f} µs; the proof of a lie at token {longest['session_tokens']} is "
            f"{longest['proof_bytes'] / 1024:.0f} KiB and takes {longest['check_s']:.1f} s to check"
        )

    add("answer_signing", signing)

    def batched(r: dict) -> str:
        parts = []
        for layout, result in r["layouts"].items():
            most = max(result["rows"], key=lambda row: row["clients"])
            parts.append(
                f"{layout}: {most['throughput_ratio']:.2f}x the aggregate tokens/s of batching off, each session at "
                f"{most['latency_vs_lone']:.2f}x a lone session's ms per token"
            )
        clients = max(row["clients"] for result in r["layouts"].values() for row in result["rows"])
        return f"Continuous batching with {clients} concurrent sessions, " + "; ".join(parts)

    add("batching", batched)

    def speculated(r: dict) -> str:
        parts = []
        for kind, label in (("copy", "answers that copy the prompt"), ("free", "answers written from scratch")):
            rows = [s for s in r["summary"] if s["kind"] == kind]
            parts.append(label + " " + ", ".join(f"{s['speedup']:.2f}x at {s['rtt_ms']:g} ms" for s in rows))
        same = all(s["same_tokens"] for s in r["summary"])
        return (
            "Speculative decoding with prompt lookup, network lab, tokens/s vs plain greedy: "
            + "; ".join(parts)
            + f" (RTT; same tokens as plain greedy: {'yes' if same else 'NO'})"
        )

    add("speculative", speculated)
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[dict], str]] = {
    "inference": inference,
    "cold_start": cold_start,
    "training": training,
    "quantization": quantization,
    "routing": routing,
    "recovery": recovery,
    "inference_network": inference_network,
    "fault_tolerance": fault_tolerance,
    "offloading": offloading,
    "heterogeneous": heterogeneous,
    "swarm_sim": swarm_sim,
    "swarm_training": swarm_training,
    "swarm_churn": swarm_churn,
    "square_cube": square_cube,
    "swarm_compression": swarm_compression,
    "btard_sim": btard_sim,
    "btard_overhead": btard_overhead,
    "btard_overhead_lab": btard_overhead,
    "api": api,
    "nat_relay": nat_relay,
    "verification": verification,
    "answer_signing": answer_signing,
    "span_loading": span_loading,
    "batching": batching,
    "speculative": speculative,
    "step_overhead": step_overhead,
    "step_timeline": step_timeline,
}


def load_results(folder: Path = RESULTS_DIR) -> dict[str, dict]:
    """The committed results, by benchmark name (``<name>.json``; smoke runs are never read)."""
    return {name: load(folder / f"{name}.json") for name in TABLES if (folder / f"{name}.json").exists()}


def render(text: str, results: dict[str, dict]) -> str:
    """``text`` with every marked block regenerated from ``results``."""

    def block(match: re.Match) -> str:
        key = match["key"]
        if key == "headline":
            body = headline(results)
        elif key in results:
            body = caption(results[key]) + "\n" + TABLES[key](results[key])
        else:
            body = f"*Not measured: no `docs/results/{key}.json`.*\n"
        return match.group(1) + body + match.group(4)

    return MARKER.sub(block, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a file would change")
    args = parser.parse_args()
    results = load_results()
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = render(text, results)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    verb = "out of date" if args.check else "rewritten"
    for path in stale:
        print(f"{path.relative_to(ROOT)}: {verb}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
