"""Stochastic wiring (SWARM): which peer of a pipeline stage gets the next micro-batch.

Every trainer keeps, per stage, a virtual clock for each peer: the time at which that peer is expected to be free
of the work this trainer has given it, plus the backlog other trainers left there (the queue length its record
reports, in seconds of its measured throughput). A task goes to the peer that is expected to *finish* it first, and
that peer's clock moves on by the task's expected duration, so a peer twice as fast gets twice the work,
interleaved. The compute times that peers report feed a bias-corrected exponential moving average of seconds per
sample. A measurement is trusted for ``measurement_ttl_s``: a peer that got no work for that long (e.g. because one
slow first call, a warm-up, made it look slower than it is) is judged again by the throughput its record announces,
and its next measurement starts a fresh average, so no peer is starved by an old number.

Pure: no I/O; the time is passed in (``now``), ties are broken by the ``random.Random`` given to the wiring.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

__all__ = ["StageWiring", "ThroughputEMA", "WiringConfig"]


@dataclass
class ThroughputEMA:
    """Seconds per sample, an exponential moving average with the start-up bias removed (Adam-style)."""

    alpha: float = 0.1
    _ema: float = 0.0
    _updates: int = 0

    def update(self, seconds: float, samples: float) -> None:
        if samples <= 0 or seconds < 0:
            raise ValueError(f"a measurement needs samples > 0 and seconds >= 0, got {samples}, {seconds}")
        self._ema = self.alpha * (seconds / samples) + (1 - self.alpha) * self._ema
        self._updates += 1

    @property
    def measured(self) -> bool:
        return self._updates > 0

    @property
    def seconds_per_sample(self) -> float | None:
        if not self._updates:
            return None
        return self._ema / (1 - (1 - self.alpha) ** self._updates)

    @property
    def samples_per_second(self) -> float | None:
        sps = self.seconds_per_sample
        return None if sps is None else (float("inf") if sps == 0 else 1.0 / sps)


@dataclass(frozen=True)
class WiringConfig:
    ema_alpha: float = 0.1
    # a peer not measured yet by this trainer: the throughput its record announces, else this (samples/s)
    default_throughput: float = 1.0
    backward_cost: float = 2.5  # a backward call costs this many forward calls (it recomputes the forward)
    measurement_ttl_s: float = 30.0  # a peer measured longer ago than this is judged by its announced throughput

    def __post_init__(self):
        if not 0 < self.ema_alpha <= 1:
            raise ValueError(f"ema_alpha must be in (0, 1], got {self.ema_alpha}")
        if not self.measurement_ttl_s > 0:
            raise ValueError(f"measurement_ttl_s must be positive, got {self.measurement_ttl_s}")
        if not self.default_throughput > 0 or not self.backward_cost > 0:
            raise ValueError("default_throughput and backward_cost must be positive")


@dataclass
class _Peer:
    announced_throughput: float | None
    backlog_samples: float = 0.0  # queued work from other trainers, as the peer's record says
    free_at: float = 0.0  # virtual time at which the work given by this trainer is expected to be done
    ema: ThroughputEMA = field(default_factory=ThroughputEMA)
    measured_at: float | None = None  # when the last measurement came (None: never, or no time was given)


class StageWiring:
    """The peers of one stage, as one trainer sees them, and the choice of a peer for each task."""

    def __init__(self, config: WiringConfig | None = None, *, rng: random.Random):
        self.config = config or WiringConfig()
        self.rng = rng
        self._peers: dict[Hashable, _Peer] = {}

    # --- membership (from the stage's records) -----------------------------------------------------------------

    def update_peers(self, peers: dict[Hashable, tuple[float | None, float]], *, now: float) -> None:
        """The stage's peers now: ``peer -> (announced samples/s or None, queued samples)``. New peers start free
        at ``now`` (so that they are tried soon); peers no longer listed are forgotten."""
        for peer in list(self._peers):
            if peer not in peers:
                del self._peers[peer]
        for peer, (throughput, backlog) in peers.items():
            known = self._peers.get(peer)
            if known is None:
                known = self._peers[peer] = _Peer(throughput, ema=ThroughputEMA(self.config.ema_alpha))
                known.free_at = now
            known.announced_throughput = throughput
            known.backlog_samples = max(0.0, float(backlog))

    def remove(self, peer: Hashable) -> None:
        self._peers.pop(peer, None)

    @property
    def peers(self) -> list[Hashable]:
        return list(self._peers)

    # --- choice --------------------------------------------------------------------------------------------------

    def _fresh(self, state: _Peer, now: float | None) -> bool:
        if not state.ema.measured:
            return False
        return now is None or state.measured_at is None or now - state.measured_at <= self.config.measurement_ttl_s

    def throughput(self, peer: Hashable, *, now: float | None = None) -> float:
        """Samples/s this trainer expects of ``peer``: measured (within ``measurement_ttl_s`` of ``now``, if given),
        else announced, else the default."""
        state = self._peers[peer]
        if self._fresh(state, now):
            return state.ema.samples_per_second
        return state.announced_throughput or self.config.default_throughput

    def cost(self, samples: float, *, backward: bool = False) -> float:
        """A call's work in forward-sample units (a backward recomputes the forward, so it costs more)."""
        return samples * (self.config.backward_cost if backward else 1.0)

    def expected_finish(self, peer: Hashable, samples: float, *, now: float, backward: bool = False) -> float:
        state = self._peers[peer]
        cost = self.cost(samples, backward=backward)
        throughput = self.throughput(peer, now=now)
        return max(now, state.free_at) + (state.backlog_samples + cost) / throughput

    def choose(
        self, samples: float, *, now: float, backward: bool = False, exclude: Iterable[Hashable] = ()
    ) -> Hashable | None:
        """The peer expected to finish a task of ``samples`` first (None if every peer is excluded or none is
        known), and its clock moved on by the task's expected duration."""
        excluded = set(exclude)
        candidates = [p for p in self._peers if p not in excluded]
        if not candidates:
            return None
        finishes = {p: self.expected_finish(p, samples, now=now, backward=backward) for p in candidates}
        best = min(finishes.values())
        tied = [p for p in candidates if finishes[p] <= best * (1 + 1e-12)]
        peer = tied[0] if len(tied) == 1 else self.rng.choice(tied)
        state = self._peers[peer]
        cost = self.cost(samples, backward=backward)
        state.free_at = max(now, state.free_at) + cost / self.throughput(peer, now=now)
        return peer

    def record(
        self, peer: Hashable, samples: float, seconds: float, *, backward: bool = False, now: float | None = None
    ) -> None:
        """A finished call of ``samples``: ``seconds`` is the time the peer spent computing it (its reply says so),
        not the round trip: the time it waited behind this trainer's other calls is what ``free_at`` models, and
        behind other trainers' calls what the peer's announced queue says; counting the wait in the speed too
        would count it twice. With ``now``, a peer whose last measurement is older than ``measurement_ttl_s``
        starts a fresh average."""
        state = self._peers.get(peer)
        if state is not None:
            if now is not None and state.ema.measured and not self._fresh(state, now):
                state.ema = ThroughputEMA(self.config.ema_alpha)
            state.ema.update(seconds, self.cost(samples, backward=backward))
            if now is not None:
                state.measured_at = now

    def failed(self, peer: Hashable, *, now: float) -> None:
        """A call to ``peer`` failed or timed out: the work this trainer queued there is not coming back, so its
        clock restarts at ``now`` (the caller decides whether to ``remove`` it, e.g. a ban)."""
        state = self._peers.get(peer)
        if state is not None:
            state.free_at = now
