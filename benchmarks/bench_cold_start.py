"""Server cold start vs the imports every server of the model's family must do, measured in the same run.

A corolla server runs the family's real transformers layers, so before it can serve it must at least import torch
and the family's modeling module (``transformers.models.llama.modeling_llama`` for SmolLM2). This script times, in
interleaved rounds so that the machine's drift hits all three alike:

- ``import torch``: a fresh Python process that imports torch;
- ``import floor``: a fresh Python process that imports torch and the modeling module, with the same import
  speed-ups the ``corolla`` command uses (``corolla.startup``);
- ``server cold start``: ``corolla serve MODEL --blocks 0:N`` from its launch to its ONLINE record in the DHT (with
  cached weights; a watcher peer started beforehand polls one block key).

It prints medians and the server's cold start as a multiple of the import floor, and saves the results (JSON)
and a chart (``benchmarks/results.py``).

    python benchmarks/bench_cold_start.py --preset smoke   # 1 round, to a temp folder
    python benchmarks/bench_cold_start.py --preset full    # 5 rounds -> docs/results/cold_start.{json,png}
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args, save_figure  # noqa: E402

from corolla.local_swarm import LocalSwarm, wait_for  # noqa: E402
from corolla.models.checkpoint import default_dht_prefix, resolve_checkpoint  # noqa: E402
from corolla.net.dht_process import client_dht  # noqa: E402
from corolla.net.dht_records import fetch_block_records  # noqa: E402
from corolla.protocol.server_info import ServerState  # noqa: E402

TARGET_S = 4.0
PRESETS = {"smoke": dict(rounds=1), "full": dict(rounds=5)}


def _time_python(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    return time.perf_counter() - start


def _time_server(swarm: LocalSwarm, watcher, model: str, blocks: str, name: str) -> float:
    dht_prefix = f"{default_dht_prefix(model)}-{name}"  # a fresh prefix per round: no earlier record can answer
    first = int(blocks.split(":")[0])
    swarm.start_server(name, ["--blocks", blocks, "--dht-prefix", dht_prefix])
    peer_id = swarm.peer_ids[name]

    def online() -> bool:
        (records,) = fetch_block_records(watcher, dht_prefix=dht_prefix, num_blocks=first + 1, blocks=[first])
        return any(p.to_base58() == peer_id and info.state == ServerState.ONLINE for p, info in records.items())

    wait_for(online, timeout_s=120, what=f"{name} to be online", poll_s=0.05)
    elapsed = time.perf_counter() - swarm.launched_at[name]
    process = swarm.processes[name]
    process.terminate()  # one server at a time: every round measures the first server of a quiet swarm
    process.wait(timeout=30)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", default="0:10", help="the span each measured server loads")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds of the three measurements (overrides the preset)"
    )
    add_output_args(parser)
    args = parser.parse_args()
    args.rounds = args.rounds or PRESETS[args.preset]["rounds"]
    run = Run("cold_start", args)

    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(resolve_checkpoint(args.model).folder).model_type
    modeling = f"transformers.models.{model_type}.modeling_{model_type}"
    floor_code = f"from corolla import startup; startup.install(); import torch, {modeling}"
    _time_python(floor_code)  # fills corolla's import cache and the page cache, like a server's first start

    times: dict[str, list[float]] = {"import torch": [], "import floor": [], "server cold start": []}
    with LocalSwarm(model=args.model, spans=[]) as swarm:
        watcher = client_dht(swarm.initial_peers)
        try:
            _time_server(swarm, watcher, args.model, args.blocks, "warmup")
            for i in range(args.rounds):
                times["import torch"].append(_time_python("import torch"))
                times["import floor"].append(_time_python(floor_code))
                times["server cold start"].append(_time_server(swarm, watcher, args.model, args.blocks, f"s{i}"))
        finally:
            watcher.shutdown()

    medians = {name: statistics.median(values) for name, values in times.items()}
    floor = medians["import floor"]
    print(f"\n## Server cold start, {args.model} blocks {args.blocks}, {args.rounds} interleaved rounds\n")
    print(f"The import floor is `import torch, {modeling}` (with corolla's import speed-ups).\n")
    print("| measurement | median | all rounds | vs import floor |")
    print("|---|---|---|---|")
    for name, values in times.items():
        rounds = " / ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {medians[name]:.2f} s | {rounds} s | {medians[name] / floor:.2f}x |")
    server = medians["server cold start"]
    print(
        f"\nThe server's own work (DHT, config, weights, span, announcement) adds {server - floor:.2f} s to the "
        f"floor. Target: cold start < {TARGET_S:.0f} s; the floor alone is {floor:.2f} s here."
    )
    ratios = [s / f for s, f in zip(times["server cold start"], times["import floor"], strict=True)]
    run.save(
        params=dict(model=args.model, blocks=args.blocks, rounds=args.rounds, modeling=modeling, target_s=TARGET_S),
        results=dict(
            medians_s=medians, rounds_s=times, server_over_floor=server / floor,
            server_over_floor_rounds=ratios, server_minus_floor_s=server - floor,
        ),
    )  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(medians), list(medians.values()), color=["gray", "darkgray", "C0"])
    ax.axhline(TARGET_S, color="C3", linestyle="--", label=f"target {TARGET_S:.0f} s")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"{args.model}: cold start {server:.2f} s = {server / floor:.2f}x the import floor", fontsize=9)
    ax.legend()
    save_figure(fig, run.path(".png"))


if __name__ == "__main__":
    main()
