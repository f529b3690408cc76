"""A deterministic discrete-event simulator of SWARM training, for testing wiring and rebalancing in seconds.

Stages are served by peers of different speeds that process their calls one at a time, in arrival order.
Trainers keep micro-batches in flight; each one goes forward through every stage and then backward through every
stage in reverse, each call to a peer chosen by the trainer's ``StageWiring``. Peers die (exponential lifetimes) and
come back as new peers after a delay; a call to a dead peer fails at once (the trainer bans the peer) and a call
that takes longer than the timeout is sent to another peer of the stage (the first answer wins; the late one is
dropped and its peer told to cancel it, so that no stage accumulates a micro-batch twice). With rebalancing, every
peer checks ``choose_move`` at jittered intervals on the swarm's state and the chosen peer finishes its queue,
downloads the new stage's state and serves there; new peers take ``choose_stage_for_joiner``'s stage.

Pure: the same config (seed included) gives the same result; no clock, no I/O.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from dataclasses import dataclass, field

from corolla.algorithms.stage_balance import StagePeer, choose_move, choose_stage_for_joiner
from corolla.algorithms.stage_wiring import StageWiring, WiringConfig

__all__ = ["SimConfig", "SimResult", "simulate"]


@dataclass(frozen=True)
class SimConfig:
    # speeds[s] = the forward samples/s of each peer that starts at stage s (a stage's cost is 1 per sample)
    speeds: tuple[tuple[float, ...], ...] = ((1.0, 1.0, 2.5),) * 4
    samples_per_microbatch: int = 1
    in_flight: int = 48  # micro-batches each trainer keeps in flight
    trainers: int = 1
    horizon_s: float = 3600.0
    mean_lifetime_s: float | None = None  # None: nobody dies
    rejoin_delay_s: float = 60.0
    # without rebalancing, where a peer that comes back serves: "random" (a volunteer picks any stage) or "same"
    # (its operator restarts it with the same --stage); with rebalancing it takes choose_stage_for_joiner's stage
    rejoin: str = "random"
    timeout_s: float = 60.0
    max_retries: int = 10
    rebalance: bool = False
    rebalance_period_s: float = 60.0
    min_gain: float = 0.1
    download_s: float = 15.0
    routing: str = "wiring"  # "wiring" (expected finish time) or "random" (uniform)
    backward_cost: float = 2.5
    refresh_s: float = 5.0  # trainers re-read the swarm's membership this often
    seed: int = 0

    def __post_init__(self):
        if self.rejoin not in ("random", "same"):
            raise ValueError(f"rejoin must be random or same, got {self.rejoin!r}")
        if self.routing not in ("wiring", "random"):
            raise ValueError(f"routing must be wiring or random, got {self.routing!r}")
        if len(self.speeds) < 1 or any(not stage for stage in self.speeds):
            raise ValueError("every stage needs at least one peer at the start")


@dataclass
class SimResult:
    completed: int  # micro-batches through every stage's forward and backward
    failed: int  # micro-batches given up after max_retries
    throughput: float  # completed samples per simulated second
    calls_per_peer: dict[str, int]  # forward calls answered first, per peer
    moves: list[tuple[float, str, int, int]]  # (time, peer, from, to)
    empty_stage_seconds: float  # total time during which some stage had no serving peer
    stage_accumulations: Counter  # (micro-batch, stage) -> backward results accumulated by the stage's peers
    completions: Counter  # (micro-batch, stage, "forward" | "backward") -> first answers taken by trainers
    retries: int
    deaths: int
    started: int  # micro-batches injected; the rest of started - completed - failed were in flight at the end
    min_peers_left_by_a_move: int | None  # the fewest serving peers a move left in the stage it left


@dataclass
class _Peer:
    peer_id: str
    stage: int
    speed: float
    alive: bool = True
    serving: bool = True  # False while moving or dead
    busy_until: float = 0.0  # when its current call ends
    current: int | None = None  # the call it computes now
    queue: list = field(default_factory=list)  # call ids waiting, in order
    accumulated: set = field(default_factory=set)  # micro-batch ids of the backward calls it has applied


@dataclass
class _Call:
    call_id: int
    trainer: int
    microbatch: int
    stage: int
    backward: bool
    peer: str
    sent_at: float
    attempt: int
    done: bool = False  # answered (or given up)
    cancelled: bool = False


def simulate(config: SimConfig) -> SimResult:
    return _Simulation(config).run()


class _Simulation:
    def __init__(self, config: SimConfig):
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.num_stages = len(config.speeds)
        self.events: list = []
        self.seq = itertools.count()
        self.now = 0.0
        self.peers: dict[str, _Peer] = {}
        self.names = itertools.count()
        self.calls: dict[int, _Call] = {}
        self.call_ids = itertools.count()
        self.microbatch_ids = itertools.count()
        wiring = WiringConfig(backward_cost=config.backward_cost)
        self.wirings = [
            [
                StageWiring(wiring, rng=random.Random(config.seed * 1000 + 100 * t + stage))
                for stage in range(self.num_stages)
            ]
            for t in range(config.trainers)
        ]
        self.banned: list[set[str]] = [set() for _ in range(config.trainers)]
        self.moving: dict[str, int] = {}
        self.last_move_from: dict[int, float] = {}
        self.min_peers_left = 1 << 30  # the fewest peers a move ever left in its stage
        self.started = 0
        self.completed = self.failed = self.retries = self.deaths = 0
        self.calls_per_peer: Counter = Counter()
        self.moves: list = []
        self.stage_accumulations: Counter = Counter()
        self.completions: Counter = Counter()
        self.empty_since: float | None = None
        self.empty_total = 0.0

    # --- events --------------------------------------------------------------------------------------------------

    def at(self, time: float, kind: str, *payload) -> None:
        heapq.heappush(self.events, (time, next(self.seq), kind, payload))

    def run(self) -> SimResult:
        for stage, speeds in enumerate(self.cfg.speeds):
            for speed in speeds:
                self.add_peer(stage, speed)
        for trainer in range(self.cfg.trainers):
            self.refresh(trainer)
            for _ in range(self.cfg.in_flight):
                self.start_microbatch(trainer)
            self.at(self.cfg.refresh_s, "refresh", trainer)
        while self.events:
            time, _, kind, payload = heapq.heappop(self.events)
            if time > self.cfg.horizon_s:
                break
            self.now = time
            getattr(self, "on_" + kind)(*payload)
            self.track_empty()
        self.track_empty(final=True)
        return SimResult(
            completed=self.completed,
            failed=self.failed,
            throughput=self.completed * self.cfg.samples_per_microbatch / self.cfg.horizon_s,
            calls_per_peer=dict(self.calls_per_peer),
            moves=self.moves,
            empty_stage_seconds=self.empty_total,
            stage_accumulations=self.stage_accumulations,
            completions=self.completions,
            retries=self.retries,
            deaths=self.deaths,
            started=self.started,
            min_peers_left_by_a_move=self.min_peers_left if self.moves else None,
        )

    def track_empty(self, final: bool = False) -> None:
        serving = {p.stage for p in self.peers.values() if p.serving}
        empty = len(serving) < self.num_stages
        if empty and self.empty_since is None and not final:
            self.empty_since = self.now
        elif self.empty_since is not None and (not empty or final):
            end = self.cfg.horizon_s if final else self.now
            self.empty_total += end - self.empty_since
            self.empty_since = None

    # --- peers ---------------------------------------------------------------------------------------------------

    def add_peer(self, stage: int, speed: float) -> _Peer:
        peer = _Peer(f"p{next(self.names)}", stage, speed, busy_until=self.now)
        self.peers[peer.peer_id] = peer
        if self.cfg.mean_lifetime_s is not None:
            self.at(self.now + self.rng.expovariate(1 / self.cfg.mean_lifetime_s), "death", peer.peer_id)
        if self.cfg.rebalance:
            self.schedule_balance_check(peer)
        return peer

    def schedule_balance_check(self, peer: _Peer) -> None:
        self.at(self.now + self.cfg.rebalance_period_s * self.rng.uniform(0.5, 1.5), "balance", peer.peer_id)

    def records(self) -> list[StagePeer]:
        return [StagePeer(p.peer_id, p.stage, p.speed) for p in self.peers.values() if p.alive]

    def on_death(self, peer_id: str) -> None:
        peer = self.peers.get(peer_id)
        if peer is None or not peer.alive:
            return
        peer.alive = peer.serving = False
        self.deaths += 1
        self.moving.pop(peer_id, None)
        for call_id in [*peer.queue, *([peer.current] if peer.current is not None else [])]:
            call = self.calls[call_id]  # calls waiting there or running fail now (the connection drops)
            if not call.done and not call.cancelled:
                self.at(self.now, "failure", call_id)
        peer.queue.clear()
        peer.current = None
        del self.peers[peer_id]
        self.at(self.now + self.cfg.rejoin_delay_s, "rejoin", peer.speed, peer.stage)

    def on_rejoin(self, speed: float, old_stage: int) -> None:
        if self.cfg.rebalance:
            stage = choose_stage_for_joiner(self.records(), self.num_stages)
        elif self.cfg.rejoin == "same":
            stage = old_stage
        else:
            stage = self.rng.randrange(self.num_stages)
        self.add_peer(stage, speed)

    def on_balance(self, peer_id: str) -> None:
        peer = self.peers.get(peer_id)
        if peer is None or not peer.alive:
            return
        if peer.serving:
            period = self.cfg.rebalance_period_s
            cooling = {stage for stage, at in self.last_move_from.items() if self.now - at < period}
            records = self.records()
            move = choose_move(
                records, self.num_stages, min_gain=self.cfg.min_gain, moving=self.moving, cooling=cooling
            )
            if move is not None and move.peer_id == peer_id:
                self.last_move_from[move.from_stage] = self.now
                members = sum(1 for p in records if p.stage == move.from_stage and p.peer_id not in self.moving)
                self.min_peers_left = min(self.min_peers_left, members - 1)
                peer.serving = False
                self.moving[peer_id] = move.to_stage
                self.moves.append((self.now, peer_id, move.from_stage, move.to_stage))
                ready = self.now + self._backlog_s(peer) + self.cfg.download_s  # finishes its queue first
                self.at(ready, "arrive", peer_id, move.to_stage)
        self.schedule_balance_check(peer)

    def work(self, call: _Call) -> float:
        """A call's work in forward-sample units."""
        return self.cfg.samples_per_microbatch * (self.cfg.backward_cost if call.backward else 1.0)

    def _backlog_s(self, peer: _Peer) -> float:
        waiting = [self.calls[c] for c in peer.queue if not self.calls[c].cancelled]
        return max(0.0, peer.busy_until - self.now) + sum(self.work(c) for c in waiting) / peer.speed

    def on_arrive(self, peer_id: str, stage: int) -> None:
        peer = self.peers.get(peer_id)
        if peer is None or not peer.alive:
            return
        self.moving.pop(peer_id, None)
        peer.stage, peer.serving = stage, True
        peer.accumulated.clear()  # it downloaded the new stage's state

    # --- trainers ------------------------------------------------------------------------------------------------

    def on_refresh(self, trainer: int) -> None:
        self.refresh(trainer)
        self.at(self.now + self.cfg.refresh_s, "refresh", trainer)

    def refresh(self, trainer: int) -> None:
        live = [p for p in self.peers.values() if p.serving and p.peer_id not in self.banned[trainer]]
        for stage, wiring in enumerate(self.wirings[trainer]):
            wiring.update_peers({p.peer_id: (p.speed, 0.0) for p in live if p.stage == stage}, now=self.now)

    def start_microbatch(self, trainer: int) -> None:
        self.started += 1
        self.send(trainer, next(self.microbatch_ids), 0, backward=False, attempt=0)

    def send(self, trainer: int, microbatch: int, stage: int, *, backward: bool, attempt: int) -> None:
        if attempt > self.cfg.max_retries:
            self.failed += 1
            self.start_microbatch(trainer)
            return
        wiring = self.wirings[trainer][stage]
        samples = self.cfg.samples_per_microbatch
        if self.cfg.routing == "random":
            candidates = [p for p in wiring.peers]
            peer_id = self.rng.choice(candidates) if candidates else None
        else:
            peer_id = wiring.choose(samples, now=self.now, backward=backward)
        if peer_id is None:  # nobody serves this stage now: wait for the next refresh
            self.at(self.now + self.cfg.refresh_s, "resend", trainer, microbatch, stage, backward, attempt)
            return
        peer = self.peers.get(peer_id)
        call = _Call(next(self.call_ids), trainer, microbatch, stage, backward, peer_id, self.now, attempt)
        self.calls[call.call_id] = call
        if peer is None:  # its record has not expired yet, but the peer is gone: the call fails at once
            self.at(self.now, "failure", call.call_id)
            return
        if not peer.serving:  # moving to another stage: it refuses the call, a retryable error (no ban)
            self.at(self.now, "failure", call.call_id, False)
            return
        peer.queue.append(call.call_id)
        if peer.current is None:
            self.start_next(peer)
        self.at(self.now + self.cfg.timeout_s, "timeout", call.call_id)

    def start_next(self, peer: _Peer) -> None:
        """The peer takes the next call of its queue that nobody cancelled (calls run one at a time)."""
        peer.current = None
        while peer.queue:
            call = self.calls[peer.queue.pop(0)]
            if call.cancelled:
                continue
            peer.current = call.call_id
            peer.busy_until = self.now + self.work(call) / peer.speed
            self.at(peer.busy_until, "answer", call.call_id)
            return

    def on_resend(self, trainer, microbatch, stage, backward, attempt) -> None:
        self.send(trainer, microbatch, stage, backward=backward, attempt=attempt)

    def on_answer(self, call_id: int) -> None:
        call = self.calls[call_id]
        peer = self.peers.get(call.peer)
        if peer is None or not peer.alive or peer.current != call_id:
            return  # died meanwhile: the failure was already sent
        self.start_next(peer)
        if call.cancelled:
            return  # the trainer gave up on it and told the peer: nothing computed counts
        if call.backward:
            if call.microbatch in peer.accumulated:
                return  # a duplicate backward: never accumulated twice on a peer
            peer.accumulated.add(call.microbatch)
            self.stage_accumulations[(call.microbatch, call.stage)] += 1
        if call.done:
            return
        call.done = True
        self.calls_per_peer[call.peer] += int(not call.backward)
        self.completions[(call.microbatch, call.stage, "backward" if call.backward else "forward")] += 1
        wiring = self.wirings[call.trainer][call.stage]
        wiring.record(call.peer, self.cfg.samples_per_microbatch, self.work(call) / peer.speed, backward=call.backward)
        self.advance(call)

    def advance(self, call: _Call) -> None:
        last = self.num_stages - 1
        if not call.backward and call.stage < last:
            self.send(call.trainer, call.microbatch, call.stage + 1, backward=False, attempt=0)
        elif not call.backward:
            self.send(call.trainer, call.microbatch, last, backward=True, attempt=0)
        elif call.stage > 0:
            self.send(call.trainer, call.microbatch, call.stage - 1, backward=True, attempt=0)
        else:
            self.completed += 1
            self.start_microbatch(call.trainer)

    def on_failure(self, call_id: int, ban: bool = True) -> None:
        call = self.calls[call_id]
        if call.done:
            return
        call.done = True
        self.retries += 1
        if ban:  # until its record expires (a dead peer's name never comes back)
            self.banned[call.trainer].add(call.peer)
        self.wirings[call.trainer][call.stage].remove(call.peer)  # until the next refresh
        self.send(call.trainer, call.microbatch, call.stage, backward=call.backward, attempt=call.attempt + 1)

    def on_timeout(self, call_id: int) -> None:
        call = self.calls[call_id]
        if call.done:
            return
        call.done = call.cancelled = True  # the late answer, if any, is dropped (and the peer told to cancel)
        self.retries += 1
        self.wirings[call.trainer][call.stage].failed(call.peer, now=self.now)
        self.send(call.trainer, call.microbatch, call.stage, backward=call.backward, attempt=call.attempt + 1)
