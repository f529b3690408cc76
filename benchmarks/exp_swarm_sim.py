"""SWARM in simulation: throughput of stochastic wiring and stage rebalancing under churn.

Usage::

    python benchmarks/exp_swarm_sim.py --preset smoke   # seconds
    python benchmarks/exp_swarm_sim.py --preset full    # an hour simulated, 5 seeds per cell (~1 min)

Runs ``corolla.algorithms.pipeline_sim`` (deterministic, pure) on the reference setup: 4 stages of 3 peers of
speeds 1, 1 and 2.5 forward samples/s, 48 micro-batches in flight, backward 2.5x a forward; peers live an
exponential time of the given mean and come back after 60 s. Policies compared, per peer lifetime:

* ``uniform``: a uniformly random peer per call, no rebalancing, peers come back at a random stage;
* ``wiring``: throughput-aware wiring (expected finish time), no rebalancing, peers come back at a random stage;
* ``wiring, same stage``: as ``wiring``, but a peer comes back at its own stage (an operator restarting it);
* ``wiring + rebalancing``: joiners take the bottleneck stage and one peer moves when the pipeline gains >= 10 %.

Writes ``swarm_sim.json`` (and a plot) under ``--out``; numbers are micro-batches per simulated second, the mean
and range over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args, save_figure

from corolla.algorithms.pipeline_sim import SimConfig, simulate


@dataclass(frozen=True)
class Preset:
    horizon_s: float
    seeds: int


PRESETS = {"smoke": Preset(horizon_s=600.0, seeds=2), "full": Preset(horizon_s=3600.0, seeds=5)}
LIFETIMES = (None, 600.0, 200.0)
POLICIES = {
    "uniform": dict(routing="random"),
    "wiring": dict(),
    "wiring, same stage": dict(rejoin="same"),
    "wiring + rebalancing": dict(rebalance=True),
}


def run_cell(lifetime: float | None, policy: dict, preset: Preset) -> dict:
    results = [
        simulate(SimConfig(mean_lifetime_s=lifetime, horizon_s=preset.horizon_s, seed=seed, **policy))
        for seed in range(preset.seeds)
    ]
    throughputs = [r.throughput for r in results]
    return {
        "throughput_mean": statistics.mean(throughputs),
        "throughput_min": min(throughputs),
        "throughput_max": max(throughputs),
        "failed_microbatches": sum(r.failed for r in results),
        "completed_microbatches": sum(r.completed for r in results),
        "moves": sum(len(r.moves) for r in results),
        "empty_stage_s_mean": statistics.mean(r.empty_stage_seconds for r in results),
        "deaths": sum(r.deaths for r in results),
    }


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    lifetimes = [row["lifetime"] for row in rows if row["policy"] == "wiring"]
    width = 0.8 / len(POLICIES)
    for i, policy in enumerate(POLICIES):
        cells = [row for row in rows if row["policy"] == policy]
        xs = [j + (i - (len(POLICIES) - 1) / 2) * width for j in range(len(cells))]
        means = [c["throughput_mean"] for c in cells]
        errors = [
            [m - c["throughput_min"] for m, c in zip(means, cells)],
            [c["throughput_max"] - m for m, c in zip(means, cells)],
        ]
        ax.bar(xs, means, width, yerr=errors, capsize=2, label=policy)
    ax.set_xticks(range(len(lifetimes)), ["no churn" if x is None else f"mean life {x:.0f} s" for x in lifetimes])
    ax.set_ylabel("micro-batches / s")
    ax.set_title("SWARM simulator: 4 stages × 3 peers (speeds 1, 1, 2.5)")
    ax.legend(fontsize=8)
    save_figure(fig, png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    add_output_args(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    run = Run("swarm_sim", args)
    rows = []
    for lifetime in LIFETIMES:
        for name, policy in POLICIES.items():
            cell = run_cell(lifetime, policy, preset)
            rows.append({"lifetime": lifetime, "policy": name, **cell})
            life = "no churn" if lifetime is None else f"mean life {lifetime:.0f} s"
            print(
                f"{life:>18} | {name:<21} | {cell['throughput_mean']:.3f} micro-batches/s "
                f"({cell['throughput_min']:.3f}–{cell['throughput_max']:.3f}), {cell['moves']} moves, "
                f"{cell['failed_microbatches']} failed"
            )
    capacity = (1 + 1 + 2.5) / (1 + 2.5)
    plot(rows, run.path(".png"))
    run.save(
        params={"horizon_s": preset.horizon_s, "seeds": preset.seeds, "stages": 4, "speeds": [1, 1, 2.5],
                "in_flight": 48, "rejoin_delay_s": 60, "bottleneck_capacity": capacity},
        results={"rows": rows},
    )  # fmt: skip


if __name__ == "__main__":
    main()
