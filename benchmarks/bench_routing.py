"""Time ``find_inference_route`` (and ``split_by_throughput``) on random swarms of 1,000 servers x 80 blocks.

Usage::

    python benchmarks/bench_routing.py --preset smoke   # a few seconds
    python benchmarks/bench_routing.py --preset full    # more swarms and repetitions

Prints the median and p90 wall time of one full-model route in milliseconds and its ratio to the 50 ms target
(ratio < 1 means faster than the target). Swarms are drawn from a seeded ``numpy.random.Generator``, so runs are
comparable; timings depend on the machine and on its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args

from corolla.algorithms.routing import RoutingCosts, find_inference_route, split_by_throughput
from corolla.algorithms.spans import ServerSpan

TARGET_MS = 50.0


@dataclass(frozen=True, kw_only=True)
class Preset:
    """How much work one benchmark run does."""

    swarms: int
    routes_per_swarm: int
    split_items: int


PRESETS = {
    "smoke": Preset(swarms=2, routes_per_swarm=5, split_items=64),
    "full": Preset(swarms=10, routes_per_swarm=30, split_items=1024),
}


def random_swarm(
    rng: np.random.Generator, *, num_servers: int, num_blocks: int, pings_per_server: int
) -> tuple[list[ServerSpan], dict[str, float]]:
    """A random swarm whose every block is hosted, plus client pings to about half of the servers (seconds)."""
    ids = [f"peer{i:05d}" for i in range(num_servers)]
    spans = []
    for i, peer_id in enumerate(ids):
        length = int(rng.integers(4, 25))
        start = int(rng.integers(0, num_blocks - length + 1)) if i >= num_blocks else min(i, num_blocks - length)
        targets = rng.choice(num_servers, size=min(pings_per_server, num_servers), replace=False)
        spans.append(
            ServerSpan(
                peer_id=peer_id,
                start=start,
                end=start + length,
                throughput=float(rng.lognormal(0.0, 1.0)),
                inference_rps=float(rng.uniform(5.0, 100.0)),
                cache_tokens_left=int(rng.integers(0, 10_000)),
                pings={ids[j]: float(rng.uniform(0.001, 0.3)) for j in targets.tolist() if j != i},
            )
        )
    client_pings = {peer_id: float(rng.uniform(0.001, 0.3)) for peer_id in ids if rng.random() < 0.5}
    return spans, client_pings


def time_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn`` in milliseconds."""
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def bench_swarm(
    spans: list[ServerSpan],
    client_pings: dict[str, float],
    *,
    num_blocks: int,
    preset: Preset,
    rng: np.random.Generator,
) -> tuple[list[float], float, int]:
    """(route times in ms, time of one split in ms, hops of the route) for one swarm."""
    route = functools.partial(
        find_inference_route,
        spans,
        start_block=0,
        end_block=num_blocks,
        client_pings=client_pings,
        costs=RoutingCosts(),
        required_cache_tokens=2048,
    )
    hops = len(route())  # also a warm-up: the first call pays numpy's lazy initialisation
    route_ms = [time_ms(route) for _ in range(preset.routes_per_swarm)]
    split = functools.partial(
        split_by_throughput, spans, start_block=0, end_block=num_blocks, num_items=preset.split_items, rng=rng
    )
    return route_ms, time_ms(split), hops


def main() -> None:
    """Parse arguments, run the benchmark and print one summary line per measured operation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--pings-per-server", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    add_output_args(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    run = Run("routing", args)
    rng = np.random.default_rng(args.seed)
    route_ms, split_ms, hops = [], [], []
    for _ in range(preset.swarms):
        spans, client_pings = random_swarm(
            rng, num_servers=args.servers, num_blocks=args.blocks, pings_per_server=args.pings_per_server
        )
        times, split, num_hops = bench_swarm(spans, client_pings, num_blocks=args.blocks, preset=preset, rng=rng)
        route_ms += times
        split_ms.append(split)
        hops.append(num_hops)
    median = statistics.median(route_ms)
    p90 = float(np.percentile(route_ms, 90))
    print(
        f"find_inference_route: {args.servers} servers x {args.blocks} blocks, {args.pings_per_server} pings/server, "
        f"{len(route_ms)} routes: median {median:.2f} ms, p90 {p90:.2f} ms, "
        f"median/target = {median / TARGET_MS:.3f} (target {TARGET_MS:.0f} ms), mean hops {np.mean(hops):.1f}"
    )
    split_median = statistics.median(split_ms)
    print(
        f"split_by_throughput: {preset.split_items} chains: median {split_median:.2f} ms "
        f"({split_median / preset.split_items * 1e3:.1f} us/chain)"
    )
    params = dict(
        dataclasses.asdict(preset), servers=args.servers, blocks=args.blocks, pings_per_server=args.pings_per_server,
        seed=args.seed, target_ms=TARGET_MS,
    )  # fmt: skip
    results = dict(
        routes=len(route_ms), route_median_ms=median, route_p90_ms=p90, route_min_ms=min(route_ms),
        route_max_ms=max(route_ms), median_over_target=median / TARGET_MS, mean_hops=float(np.mean(hops)),
        split_median_ms=split_median, split_us_per_chain=split_median / preset.split_items * 1e3,
    )  # fmt: skip
    run.save(params=params, results=results)


if __name__ == "__main__":
    main()
