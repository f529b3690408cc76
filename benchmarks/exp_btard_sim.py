"""BTARD in simulation: test accuracy per aggregator and attack, 16 peers of which 7 are Byzantine.

Usage::

    python benchmarks/exp_btard_sim.py --preset smoke   # < 1 min: 2 attacks, 2 aggregators, 100 steps
    python benchmarks/exp_btard_sim.py --preset full    # the whole grid, ~10 min -> docs/results/

Runs ``corolla.secure.simulation`` (one process, deterministic): an MLP 64-64-10 trained on scikit-learn's digits
by data-parallel SGD (lr 0.1, momentum 0.9, batch 16 per peer, public batch seeds); the last 7 of 16 peers attack
from step 100 (``corolla.secure.attacks``). Aggregators: the mean (plain all-reduce), the coordinate-wise median,
CenteredClip over the whole vector, butterfly CenteredClip (one part per peer, no checks), and BTARD (butterfly
CenteredClip, one validation per step with its seed from commit-reveal, bans); ``btard, false accusers`` is BTARD
where Byzantine validators also accuse honest peers. tau = 1, at most 50 CenteredClip iterations.

The gates checked (full preset; the issue's acceptance criteria): BTARD >= 0.95 under every attack and within 0.01
of the mean without attack; the mean <= 0.2 under sign flip, random direction and IPM (eps = 2); every attacker
banned within 300 steps of the attack's start; no honest peer ever banned. The results say which passed.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.experiment import experiment_parser, machine_line, save_figure  # noqa: E402
from benchmarks.results import Run  # noqa: E402

ATTACKS = {
    "none": dict(kind="none"),
    "sign flip (x-1000)": dict(kind="sign_flip", scale=1000.0),
    "random direction (shared)": dict(kind="random_direction", scale=1000.0),
    "label flip": dict(kind="label_flip"),
    "delayed (10 steps)": dict(kind="delayed", delay_steps=10),
    "IPM (eps 2)": dict(kind="ipm", ipm_epsilon=2.0),
    "IPM (eps 0.5)": dict(kind="ipm", ipm_epsilon=0.5),
    "ALIE (z 1)": dict(kind="alie", alie_z=1.0),
}
AGGREGATORS = {
    "mean": dict(aggregator="mean"),
    "median": dict(aggregator="median"),
    "CenteredClip": dict(aggregator="centered_clip"),
    "butterfly CenteredClip": dict(aggregator="butterfly_clip"),
    "BTARD": dict(aggregator="btard"),
    "BTARD, false accusers": dict(aggregator="btard", false_accusations=True),
}
PRESETS = {
    "smoke": dict(steps=100, attack_start=40, attacks=["none", "sign flip (x-1000)"], aggregators=["mean", "BTARD"]),
    "full": dict(steps=600, attack_start=100, attacks=list(ATTACKS), aggregators=list(AGGREGATORS)),
}  # fmt: skip
MEAN_COLLAPSES = ("sign flip (x-1000)", "random direction (shared)", "IPM (eps 2)")
BAN_WITHIN_STEPS = 300


def run_grid(preset: dict, progress) -> dict:
    from corolla.secure.attacks import AttackConfig
    from corolla.secure.simulation import SimulationConfig, simulate

    cells = {}
    for attack in preset["attacks"]:
        for aggregator in preset["aggregators"]:
            cfg = SimulationConfig(
                steps=preset["steps"],
                attack=AttackConfig(start_step=preset["attack_start"], **ATTACKS[attack]),
                **AGGREGATORS[aggregator],
            )
            result = simulate(cfg)
            cells[f"{attack} | {aggregator}"] = dict(
                attack=attack,
                aggregator=aggregator,
                final_accuracy=result.final_accuracy,
                accuracy=result.accuracy,
                banned_at={str(p): s for p, s in sorted(result.banned_at.items())},
                honest_banned=result.honest_banned,
                attackers_never_banned=result.byzantine_left,
                all_attackers_banned_by=result.all_attackers_banned_by,
                seconds=round(result.seconds, 2),
                diverged_at=result.diverged_at,
            )
            progress(attack, aggregator, cells[f"{attack} | {aggregator}"])
    return cells


def gates(cells: dict, preset: dict) -> dict:
    """Each acceptance criterion: passed or not, and the numbers behind it (cells the preset has only)."""

    def cell(attack, aggregator):
        return cells.get(f"{attack} | {aggregator}")

    out = {}
    btard = {a: cell(a, "BTARD") for a in preset["attacks"] if cell(a, "BTARD")}
    attacked = {a: c for a, c in btard.items() if a != "none"}
    if attacked:
        worst = min(c["final_accuracy"] for c in attacked.values())
        out["BTARD >= 0.95 under every attack"] = dict(passed=worst >= 0.95, worst=worst)
    if cell("none", "BTARD") and cell("none", "mean"):
        gap = cell("none", "mean")["final_accuracy"] - cell("none", "BTARD")["final_accuracy"]
        out["BTARD within 0.01 of the mean without attack"] = dict(passed=gap <= 0.01, gap=gap)
    collapses = {a: cell(a, "mean")["final_accuracy"] for a in MEAN_COLLAPSES if cell(a, "mean")}
    if collapses:
        out["mean <= 0.2 under sign flip, random direction, IPM (eps 2)"] = dict(
            passed=all(v <= 0.2 for v in collapses.values()), accuracy=collapses
        )
    btards = [c for c in cells.values() if c["aggregator"].startswith("BTARD") and c["attack"] != "none"]
    if btards:
        late = [
            c["all_attackers_banned_by"]
            for c in btards
            if c["all_attackers_banned_by"] is None
            or c["all_attackers_banned_by"] - preset["attack_start"] > BAN_WITHIN_STEPS
        ]
        slowest = max((c["all_attackers_banned_by"] or 10**9) - preset["attack_start"] for c in btards)
        out[f"every attacker banned within {BAN_WITHIN_STEPS} steps of the attack"] = dict(
            passed=not late, slowest_steps_after_start=slowest if slowest < 10**9 else None
        )
    honest = sum(len(c["honest_banned"]) for c in cells.values())
    out["no honest peer ever banned"] = dict(passed=honest == 0, honest_bans=honest)
    return out


def table(cells: dict, preset: dict) -> str:
    header = ["attack", *preset["aggregators"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for attack in preset["attacks"]:
        row = [attack]
        for aggregator in preset["aggregators"]:
            c = cells[f"{attack} | {aggregator}"]
            text = f"{c['final_accuracy']:.3f}"
            if c.get("diverged_at") is not None:
                text += f" (diverged at step {c['diverged_at']})"
            if aggregator.startswith("BTARD") and attack != "none":
                by = c["all_attackers_banned_by"]
                text += f" (all banned by step {by})" if by is not None else " (not all banned)"
            row.append(f"**{text}**" if aggregator == "BTARD" else text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(cells: dict, preset: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in preset["attacks"] if a != "none"]
    columns = min(4, len(attacks))
    rows = -(-len(attacks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False, sharey=True)
    for ax, attack in zip(axes.flat, attacks):
        for aggregator in preset["aggregators"]:
            c = cells[f"{attack} | {aggregator}"]
            steps, accuracy = zip(*c["accuracy"])
            ax.plot(steps, accuracy, label=aggregator, linewidth=1.3)
        ax.axvline(preset["attack_start"], color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(attack, fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("step", fontsize=8)
    for ax in axes.flat[len(attacks) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("test accuracy")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("digits MLP, 16 peers of which 7 attack from the dotted line", fontsize=10)
    save_figure(fig, png)


def main() -> int:
    parser = experiment_parser(__doc__, PRESETS)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    run = Run("btard_sim", args)
    from tqdm import tqdm

    bar = tqdm(total=len(preset["attacks"]) * len(preset["aggregators"]), unit="run", file=sys.stderr)

    def progress(attack, aggregator, cell):
        bar.update()
        bar.write(f"{attack:<28} {aggregator:<24} accuracy {cell['final_accuracy']:.3f} ({cell['seconds']:.1f} s)")

    cells = run_grid(preset, progress)
    bar.close()
    checked = gates(cells, preset)
    from corolla.secure.simulation import SimulationConfig

    params = dict(preset=preset, simulation=asdict(replace(SimulationConfig(), steps=preset["steps"])))
    params["simulation"].pop("attack")
    run.save(params=params, results=dict(cells=cells, gates=checked))
    lines = [
        f"## BTARD in simulation ({args.preset})",
        "",
        f"- date: {run.started.date().isoformat()}; machine: {machine_line(args.machine)}",
        f"- command: `{run.command}`",
        f"- 16 peers (7 Byzantine, attacking from step {preset['attack_start']}), {preset['steps']} steps; final test "
        "accuracy; for BTARD the step by which every attacker was banned",
        "",
        table(cells, preset),
        "Gates: " + "; ".join(f"{name}: {'passed' if g['passed'] else 'FAILED'}" for name, g in checked.items()),
        "",
    ]
    run.path(".md").write_text("\n".join(lines))
    plot(cells, preset, run.path(".png"))
    print(table(cells, preset))
    for name, g in checked.items():
        print(f"{'passed' if g['passed'] else 'FAILED'}: {name} {g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
