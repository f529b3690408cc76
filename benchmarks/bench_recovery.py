"""Recovery time of an inference session when a server is killed mid-generation, on loopback.

A swarm of SmolLM2 (blocks 0:10, 10:20 twice, 20:30). During greedy generation the server used for blocks 10:20
is SIGKILLed after token 10; the client detects the broken stream, bans the server, opens the spare and replays the
session's history to it. Reported: the extra delay of the step during which the server died over the median normal
step (median over repeats), and the replay's own compute time measured in the same run (a forward of the whole
history through 10 blocks on the spare), so the recovery overhead itself is the difference.

    python benchmarks/bench_recovery.py --preset smoke
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.results` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import Run, add_output_args  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.local_swarm import LocalSwarm  # noqa: E402

PRESETS = {"smoke": dict(repeats=1, new_tokens=20), "full": dict(repeats=5, new_tokens=40)}
KILL_AFTER = 10


class _StepTimer:
    """Records the time of every generated token and kills a server after ``KILL_AFTER`` of them."""

    def __init__(self, on_kill):
        self.times: list[float] = []
        self.on_kill = on_kill

    def put(self, value):
        self.times.append(time.perf_counter())
        if len(self.times) == KILL_AFTER + 1:  # the first put() is the prompt
            self.on_kill()

    def end(self):
        pass


def _one_run(
    model, swarm: LocalSwarm, ids, new_tokens: int, spare_index: int, killed: list[str]
) -> tuple[float, float, float]:
    """(extra delay of the failed step, median normal step, replay forward time) in seconds."""

    def kill():
        hop = next(s.hop for s in session._spans if s.hop.start <= 10 < s.hop.end)
        swarm.kill(swarm.name_of(hop.peer_id), signal.SIGKILL)
        killed.append(hop.peer_id)

    timer = _StepTimer(kill)
    with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
        model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, session=session, streamer=timer
        )
    swarm.start_server(f"spare{spare_index}", ["--blocks", "10:20"])  # a spare for the next repeat
    steps = [b - a for a, b in zip(timer.times[1:], timer.times[2:])]
    failed = steps[KILL_AFTER - 1]
    normal = statistics.median(steps[: KILL_AFTER - 1] + steps[KILL_AFTER:])
    history = torch.randn(1, ids.shape[1] + KILL_AFTER, model.config.hidden_size)
    started = time.perf_counter()
    with torch.no_grad():
        model.remote_blocks[10:20](history)
    replay = time.perf_counter() - started
    return failed - normal, normal, replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    add_output_args(parser)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    run = Run("recovery", args)
    torch.set_num_threads(1)
    ids = torch.arange(20, 40).unsqueeze(0)
    results = []
    with LocalSwarm(model="smollm2-135m", spans=["0:10", "10:20", "10:20", "20:30"]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=swarm.initial_peers, ban_timeout_s=600
        )
        killed: list[str] = []
        for repeat in range(preset["repeats"]):
            swarm.wait_until_served(min_servers=4, exclude=killed)  # the spare started last time is up
            model.remote_blocks.swarm.refresh()
            results.append(_one_run(model, swarm, ids, preset["new_tokens"], repeat, killed))
        model.shutdown()
    extra = statistics.median(r[0] for r in results)
    normal = statistics.median(r[1] for r in results)
    replay = statistics.median(r[2] for r in results)
    print(f"\n## Recovery from a SIGKILLed server, SmolLM2 float32 on loopback, {len(results)} repeats\n")
    print("| metric | value |")
    print("|---|---|")
    print(f"| normal step | {normal * 1e3:.1f} ms |")
    print(f"| extra delay of the failed step | {extra * 1e3:.1f} ms ({extra / normal:.1f}x a normal step) |")
    print(f"| replay compute (history through 10 blocks, measured) | {replay * 1e3:.1f} ms |")
    print(f"| recovery overhead = extra - replay | {(extra - replay) * 1e3:.1f} ms (target < 250 ms) |")
    overheads = [(r[0] - r[2]) * 1e3 for r in results]
    run.save(
        params=dict(preset, kill_after=KILL_AFTER, spans=["0:10", "10:20", "10:20", "20:30"], target_ms=250),
        results=dict(
            normal_step_ms=normal * 1e3, extra_delay_ms=extra * 1e3, replay_ms=replay * 1e3,
            overhead_ms=(extra - replay) * 1e3, overhead_ms_repeats=overheads,
            overhead_ms_range=[min(overheads), max(overheads)],
            repeats=[dict(extra_ms=r[0] * 1e3, normal_ms=r[1] * 1e3, replay_ms=r[2] * 1e3) for r in results],
        ),
    )  # fmt: skip


if __name__ == "__main__":
    main()
