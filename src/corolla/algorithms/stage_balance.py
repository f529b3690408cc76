"""Rebalancing of SWARM stages: which stage a joining peer takes, and which peer (if any) moves to the bottleneck.

A pipeline runs as fast as its slowest stage, whose capacity is the sum of its peers' throughputs (samples/s; a
stage with no peer has capacity 0 and stops the pipeline). Stages may cost differently (the first holds the
embeddings, the last the LM head and the loss): a peer's throughput at another stage is estimated as its current
throughput times ``cost[current] / cost[other]``.

The rule every peer evaluates on the same records (so all agree on one move without talking to each other):

* a stage that is empty is refilled first: a peer of the stage that keeps the most capacity without it moves there;
* otherwise the move of one peer to the bottleneck stage that raises the pipeline's throughput the most is made if
  it raises it by more than ``min_gain`` (a fraction: hysteresis against noisy measurements);
* a stage's last peer never moves, nor does a peer that was told its stage (``movable=False``); at most one move
  per evaluation, and (with ``cooling``) per stage per period;
  among equally good moves the slowest peer moves, then the lowest peer id.

Pure: plain values in, a decision out; no clock, no randomness.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Move", "StagePeer", "choose_move", "choose_stage_for_joiner", "pipeline_throughput", "stage_capacities"]


@dataclass(frozen=True)
class StagePeer:
    peer_id: str
    stage: int
    throughput: float  # samples/s at its stage, as measured
    movable: bool = True  # False: the peer was told its stage (it counts where it is, and never moves)


@dataclass(frozen=True)
class Move:
    peer_id: str
    from_stage: int
    to_stage: int
    throughput_before: float
    throughput_after: float  # estimated


def _costs(num_stages: int, costs: Sequence[float] | None) -> list[float]:
    if costs is None:
        return [1.0] * num_stages
    if len(costs) != num_stages or any(not c > 0 for c in costs):
        raise ValueError(f"need {num_stages} positive stage costs, got {list(costs)}")
    return [float(c) for c in costs]


def stage_capacities(peers: Sequence[StagePeer], num_stages: int) -> list[float]:
    capacity = [0.0] * num_stages
    for p in peers:
        if not 0 <= p.stage < num_stages:
            raise ValueError(f"peer {p.peer_id} is at stage {p.stage}, outside 0..{num_stages - 1}")
        capacity[p.stage] += max(0.0, p.throughput)
    return capacity


def pipeline_throughput(peers: Sequence[StagePeer], num_stages: int) -> float:
    return min(stage_capacities(peers, num_stages))


def _moved(capacity: list[float], peer: StagePeer, to_stage: int, costs: list[float]) -> list[float]:
    after = list(capacity)
    after[peer.stage] -= peer.throughput
    after[to_stage] += peer.throughput * costs[peer.stage] / costs[to_stage]
    return after


def choose_stage_for_joiner(peers: Sequence[StagePeer], num_stages: int) -> int:
    """The stage a new (or restarted) peer should take: the bottleneck, i.e. an empty stage first, else the one with
    the lowest capacity (adding capacity anywhere else cannot raise the pipeline's throughput); ties: lowest."""
    capacity = stage_capacities(peers, num_stages)
    return min(range(num_stages), key=lambda s: (capacity[s], s))


def choose_move(
    peers: Sequence[StagePeer],
    num_stages: int,
    *,
    min_gain: float = 0.1,
    costs: Sequence[float] | None = None,
    moving: Mapping[str, int] | None = None,
    cooling: Iterable[int] = (),
) -> Move | None:
    """The single move that the swarm should make now, or None. ``moving``: peers already on their way to a stage
    (counted there, and not moved again). ``cooling``: stages that gave a peer less than a period ago and give no
    other now (at most one move per stage per period), unless a stage is empty."""
    if num_stages < 2:
        return None
    cost = _costs(num_stages, costs)
    moving = dict(moving or {})
    settled = [p for p in peers if p.peer_id not in moving]
    counted = list(settled)
    for p in peers:
        if p.peer_id in moving:
            stage = moving[p.peer_id]
            counted.append(StagePeer(p.peer_id, stage, p.throughput * cost[p.stage] / cost[stage]))
    capacity = stage_capacities(counted, num_stages)
    members: dict[int, list[StagePeer]] = {s: [] for s in range(num_stages)}
    for p in counted:
        members[p.stage].append(p)
    before = min(capacity)
    empty = [s for s in range(num_stages) if not members[s]]
    targets = empty[:1] if empty else [min(range(num_stages), key=lambda s: (capacity[s], s))]

    best: tuple[tuple, Move] | None = None
    for target in targets:
        for p in settled:
            if p.stage == target or len(members[p.stage]) < 2 or not p.movable:  # never empty a stage
                continue
            if p.stage in cooling and not empty:
                continue
            after = _moved(capacity, p, target, cost)
            if empty:  # refill: keep as much as possible elsewhere
                key = (min(c for s, c in enumerate(after) if s != target), after[target], p.peer_id)
            else:
                key = (min(after), -p.throughput, p.peer_id)
            move = Move(p.peer_id, p.stage, target, before, min(after))
            if best is None or _better(key, best[0]):
                best = (key, move)
    if best is None:
        return None
    move = best[1]
    if empty:
        return move
    if move.throughput_after > before * (1 + min_gain):
        return move
    return None


def _better(key: tuple, other: tuple) -> bool:
    """Higher throughput first; then (for equal throughput) the smaller tie-breakers, peer id last."""
    if key[0] != other[0]:
        return key[0] > other[0]
    if key[1] != other[1]:
        return key[1] > other[1]
    return key[2] < other[2]
