"""BTARD's overhead: step time of a verified BTARD step vs hivemind's butterfly all-reduce, same peers, same sizes.

Usage::

    python benchmarks/bench_btard_overhead.py --preset smoke               # ~1 min: 4 peers, 100k values
    python benchmarks/bench_btard_overhead.py --preset full                # loopback, 100k and 1M values
    python benchmarks/bench_btard_overhead.py --preset full --link lab     # the network lab (root; RTT, rate)

Each peer is its own process (``corolla.local_swarm``) with its own DHT node and p2pd. In every round, every peer
computes a gradient (a deterministic random vector of ``dim`` values from the public seed of round and peer, so that
a validator can recompute it) and aggregates it twice, in an order that alternates from round to round:

* **BTARD**: ``secure.protocol.BtardProtocol.step``: commitments, butterfly scatter, CenteredClip per partition
  (float64, tol 1e-9), commit–reveal seed, projected checks, one validator, accusations (none: all are honest);
* **all-reduce**: hivemind's ``DecentralizedAverager.step`` over the same group (butterfly all-reduce of the mean,
  float32, no compression), with its matchmaking; the all-reduce alone is timed inside the averager as well.

The ratio is per round (BTARD / all-reduce, and BTARD / the all-reduce alone), summarised by the median over
rounds, with BTARD's time split by phase. Results: ``docs/results/btard_overhead[_lab].json``, a table in
``docs/benchmarks.md`` and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "smoke": dict(peers=4, dims=[100_000], rounds=6, warmup=1),
    "full": dict(peers=4, dims=[100_000, 1_000_000], rounds=24, warmup=2),
}
LAB = dict(delay_ms=5.0, rate_mbit=100.0)  # each host's link: RTT 20 ms between two hosts, 100 Mbit/s
MATCHMAKING_S = 1.0
SIGNAL_STD, NOISE_STD = 0.1, 0.05


# ---- the worker (one peer) --------------------------------------------------------------------------------------
class SyntheticTask:
    """A gradient of ``dim`` values per (round, peer), recomputable by anyone (``secure.protocol.Task``): a signal
    shared by all peers of the round (N(0, 0.1²) per value) plus the peer's own noise (N(0, 0.05²) per value)."""

    def __init__(self, dim: int):
        import torch

        self.dim = dim
        self.params = torch.zeros(dim)

    def gradient(self, step: int, peer: str, *, wrong_labels: bool = False):
        import torch

        def normal(key: str):
            seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
            return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

        return normal(f"{step}") * SIGNAL_STD + normal(f"{step}:{peer}") * NOISE_STD


def clip_radius(dim: int, peers: int) -> float:
    """CenteredClip's tau: twice the norm of a peer's noise in one partition, so that honest parts are within tau
    of their center (the regime CenteredClip is tuned for: it clips outliers, not the honest spread)."""
    return 2 * NOISE_STD * (dim / peers) ** 0.5


def _timed_averager_class():
    from hivemind.averaging import DecentralizedAverager

    class TimedAverager(DecentralizedAverager):
        """hivemind's averager, reporting how long each all-reduce itself took (after matchmaking)."""

        def __init__(self, *args, **kwargs):
            self.allreduce_seconds = mp.Queue()
            super().__init__(*args, **kwargs)

        async def _aggregate_with_group(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return await super()._aggregate_with_group(*args, **kwargs)
            finally:
                self.allreduce_seconds.put(time.perf_counter() - started)

    return TimedAverager


async def _worker(args: argparse.Namespace) -> dict:
    import torch

    from corolla.net.peer import Peer
    from corolla.net.peer_config import PeerConfig
    from corolla.secure.btard_peer import join_run
    from corolla.secure.envelope import Signer
    from corolla.secure.mailbox import Mailbox
    from corolla.secure.protocol import BtardProtocol, ProtocolConfig

    torch.set_num_threads(1)
    config = PeerConfig(
        initial_peers=tuple(args.initial_peers),
        identity=args.identity,
        host_maddrs=tuple(args.host_maddrs) if args.host_maddrs else ("/ip4/127.0.0.1/tcp/0",),
    )
    async with Peer(config, role="benchmark peer") as peer:
        await peer.joined()
        signer = Signer()
        mailroom, keys, send = await join_run(peer, signer, run=args.run, peers=args.peers, wait_s=300, timeout_s=120)
        me = str(peer.peer_id)
        task = SyntheticTask(args.dim)
        config = ProtocolConfig(run=args.run, tau=clip_radius(args.dim, args.peers), phase_timeout_s=120)
        protocol = BtardProtocol(
            me=me, signer=signer, keys=keys, config=config, task=task, send=send, mailbox=Mailbox()
        )
        await mailroom.start(protocol)
        averager = _timed_averager_class()(
            [torch.zeros(args.dim)],
            dht=peer.dht,
            prefix=f"{args.run}_allreduce",
            target_group_size=args.peers,
            min_group_size=args.peers,
            min_matchmaking_time=MATCHMAKING_S,
            request_timeout=MATCHMAKING_S / 2,
            allreduce_timeout=120,
            start=True,
        )
        loop = asyncio.get_running_loop()
        rounds = []
        for r in range(args.rounds):
            row: dict = {"round": r}
            for method in ("btard", "allreduce") if r % 2 == 0 else ("allreduce", "btard"):
                started = time.perf_counter()
                if method == "btard":
                    outcome = await protocol.step(r)
                    if outcome.update is None or outcome.verdicts or outcome.missing:
                        raise RuntimeError(f"round {r}: an honest BTARD step failed ({outcome.void_reason})")
                    row["btard_phases"] = outcome.seconds
                else:
                    gradient = task.gradient(r, me)
                    with averager.get_tensors() as tensors:
                        tensors[0].copy_(gradient)
                    await loop.run_in_executor(None, lambda: averager.step(timeout=300))
                    row["allreduce_only"] = await loop.run_in_executor(None, averager.allreduce_seconds.get, True, 60)
                row[method] = time.perf_counter() - started
            rounds.append(row)
        averager.shutdown()
        return {"peer": me, "dim": args.dim, "rounds": rounds}


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="one peer of the BTARD overhead benchmark")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--host-maddrs", nargs="*")
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    Path(args.result).write_text(json.dumps(asyncio.run(_worker(args))))
    return 0


# ---- the driver -------------------------------------------------------------------------------------------------
def run_dim(dim: int, preset: dict, link: str, log_root: Path, lab=None) -> list[dict]:
    from corolla.local_swarm import LocalSwarm, wait_for

    hosts = {f"p{i}": f"h{i}" for i in range(preset["peers"])} | {"bootstrap": "boot"}
    swarm = LocalSwarm(
        model="none",
        log_dir=log_root / f"{link}-{dim}",
        start_timeout_s=120,
        command_prefix=(lambda name: lab.prefix(hosts[name])) if lab else None,
        process_args=(lambda name: ["--host-maddrs", f"/ip4/{lab.address(hosts[name])}/tcp/0"]) if lab else None,
    )
    out = Path(tempfile.mkdtemp(prefix="corolla-btard-overhead-"))
    with swarm:
        for i in range(preset["peers"]):
            args = ["--peers", str(preset["peers"]), "--dim", str(dim), "--rounds", str(preset["rounds"])]
            args += ["--run", f"overhead{dim}", "--result", str(out / f"p{i}.json")]
            swarm.start_btard_peer(f"p{i}", args, entry=[str(Path(__file__).resolve()), "worker"])

        def done() -> bool:
            for name, process in swarm.processes.items():
                if name != "bootstrap" and process.poll() not in (None, 0):
                    log = (log_root / f"{link}-{dim}" / f"{name}.log").read_text()[-3000:]
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{log}")
            return all((out / f"p{i}.json").exists() for i in range(preset["peers"]))

        wait_for(done, timeout_s=1800, what="the benchmark peers", poll_s=1.0)
    return [json.loads((out / f"p{i}.json").read_text()) for i in range(preset["peers"])]


def summarise(peers: list[dict], warmup: int) -> dict:
    """Per round, the slowest peer's time of each method (a step ends for the group when its last peer is done)."""
    rounds = len(peers[0]["rounds"])
    keep = range(warmup, rounds)
    btard = [max(p["rounds"][r]["btard"] for p in peers) for r in keep]
    allreduce = [max(p["rounds"][r]["allreduce"] for p in peers) for r in keep]
    only = [max(p["rounds"][r]["allreduce_only"] for p in peers) for r in keep]
    phases = {
        name: statistics.median(statistics.mean(p["rounds"][r]["btard_phases"][name] for p in peers) for r in keep)
        for name in peers[0]["rounds"][0]["btard_phases"]
    }
    ratio = [b / a for b, a in zip(btard, allreduce)]
    ratio_only = [b / a for b, a in zip(btard, only)]
    return dict(
        btard_s=statistics.median(btard),
        allreduce_s=statistics.median(allreduce),
        allreduce_only_s=statistics.median(only),
        ratio=statistics.median(ratio),
        ratio_range=[min(ratio), max(ratio)],
        ratio_vs_allreduce_only=statistics.median(ratio_only),
        btard_phase_s=phases,
        rounds=len(btard),
    )


def table(results: dict) -> str:
    lines = [
        "| link | values | BTARD step (s) | hivemind step (s) | all-reduce alone (s) | BTARD / hivemind step | "
        "BTARD / all-reduce alone | BTARD's phases (s): commit, part, aggregate, reveal, check, accuse |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results["cells"].items():
        link, dim = key.split(":")
        phases = ", ".join(f"{v:.3f}" for v in r["btard_phase_s"].values())
        lines.append(
            f"| {link} | {int(dim):,} | {r['btard_s']:.3f} | {r['allreduce_s']:.3f} | {r['allreduce_only_s']:.3f} | "
            f"**{r['ratio']:.2f}x** ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) | "
            f"{r['ratio_vs_allreduce_only']:.2f}x | {phases} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from benchmarks.experiment import save_figure

    cells = results["cells"]
    labels = [f"{k.split(':')[0]}\n{int(k.split(':')[1]):,}" for k in cells]
    x = range(len(cells))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(cells), 3.2))
    width = 0.27
    ax.bar([i - width for i in x], [c["allreduce_only_s"] for c in cells.values()], width, label="all-reduce alone")
    ax.bar(list(x), [c["allreduce_s"] for c in cells.values()], width, label="hivemind step (with matchmaking)")
    bottom = [0.0] * len(cells)
    for phase in next(iter(cells.values()))["btard_phase_s"]:
        values = [c["btard_phase_s"][phase] for c in cells.values()]
        ax.bar([i + width for i in x], values, width, bottom=bottom, label=f"BTARD: {phase}")
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("seconds per step (median)")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("BTARD vs butterfly all-reduce, 4 peers", fontsize=10)
    save_figure(fig, png)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker_main(sys.argv[2:])
    from benchmarks.experiment import experiment_parser, machine_line
    from benchmarks.results import Run

    parser = experiment_parser(__doc__, PRESETS, log_dir="keep the peers' logs here")
    parser.add_argument("--link", choices=["loopback", "lab"], default="loopback")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="corolla-bench-btard-"))
    name = "btard_overhead" if args.link == "loopback" else "btard_overhead_lab"
    run = Run(name, args)
    cells = {}
    lab_report = None
    if args.link == "lab":
        from benchmarks.netlab import Lab, LinkShape, unavailable_reason

        reason = unavailable_reason()
        if reason:
            print(f"error: cannot run the network lab here: {reason}", file=sys.stderr)
            return 2
        hosts = [f"h{i}" for i in range(preset["peers"])] + ["boot"]
        with Lab(hosts=hosts) as lab:
            lab.enter("boot")  # this process's helpers live in the lab too
            lab_report = lab.shape(LinkShape(**LAB))
            for dim in preset["dims"]:
                cells[f"lab:{dim}"] = summarise(run_dim(dim, preset, "lab", log_root, lab), preset["warmup"])
                print(f"lab {dim:,}: {cells[f'lab:{dim}']['ratio']:.2f}x", flush=True)
    else:
        for dim in preset["dims"]:
            cells[f"loopback:{dim}"] = summarise(run_dim(dim, preset, "loopback", log_root), preset["warmup"])
            print(f"loopback {dim:,}: {cells[f'loopback:{dim}']['ratio']:.2f}x", flush=True)
    results = dict(cells=cells, lab_shape=LAB if args.link == "lab" else None, lab_check=lab_report)
    params = dict(preset=preset, link=args.link, matchmaking_s=MATCHMAKING_S, signal_std=SIGNAL_STD,
                  noise_std=NOISE_STD, tau={d: clip_radius(d, preset["peers"]) for d in preset["dims"]})  # fmt: skip
    run.save(params=params, results=results)
    plot(results, run.path(".png"))
    text = [
        f"## BTARD overhead ({args.link}, {args.preset})",
        "",
        f"- date: {run.started.date().isoformat()}; machine: {machine_line(args.machine)}",
        f"- command: `{run.command}`",
        "",
        table(results),
    ]
    run.path(".md").write_text("\n".join(text))
    print("\n".join(text))
    print(f"peer logs: {log_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
