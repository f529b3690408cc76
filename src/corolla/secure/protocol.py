"""One BTARD-SGD step between peers: verified butterfly CenteredClip with commitments, checks, validators and bans.

``BtardProtocol.step(step)`` runs, for the active group G (sorted peer ids, n peers, peer i aggregates part i):

1. **commit**: the peer computes its gradient on the public batch of (step, peer), cuts it into n parts, seals
   each part's message and broadcasts their SHA-256 digests (the ones their signatures cover), its commitment for
   this step's random seed and a digest of its ban state;
2. **part**: it sends part j to peer j, and its own part also to the next peer (its witness); aggregator j checks
   every part against its sender's commitment;
3. **aggregate**: aggregator j runs CenteredClip (float64, tolerance ``clip_tol``) over the n parts of partition j
   and broadcasts the result rounded to float32 (the bytes of the all-reduce's answers);
4. **reveal**: once every aggregate is in, the peers reveal their seed values; the seed (commit–reveal) fixes the
   random directions z[j, 1..k] (``check_directions``) and the validators;
5. **check**: every peer broadcasts its projections (s along each direction, ν) for each partition
   (``algorithms.clip_verification``);
   aggregator j recomputes them from the parts it holds and accuses a peer that misreports, and its witness does
   the same for j's report on its own part; everyone checks that
   each partition's projections sum to ~0 and accuses an aggregator whose sum does not; each validator recomputes
   its target's gradient from the public data and accuses it if it differs from the commitment (or if its reports
   differ from what its true parts give);
6. **accuse**: every peer broadcasts its accusations (with the signed messages that prove them), the peers it got
   nothing from, and the signed digests of every commitment, aggregate, reveal and check it received (an echo:
   two different signed digests for one message prove equivocation).

Every peer then judges every accusation itself (``judge``) and applies the verdicts in a canonical order
(``algorithms.accusations``): a proven liar is banned, a false accuser is banned, a silent peer is eliminated with
the peer that reported it. Bans take effect from the next step. The step's update is the concatenated aggregates,
unless the step is void: a message was missing, a part, aggregate, reveal or report was proven false, or the seed
could not be drawn. An aggregate passes only if its sum vanishes along each of its k directions: with the float32
rounding a forgery of 1e-3 of the aggregate's norm slips through one random direction about 0.15 % of the time
(the rounding sets how tight the tolerance can be), through two independent ones with the square of that chance
(none of 2,000 in ``tests/unit/test_clip_verification.py``). A part or aggregate must be the partition's size of
finite float32 values, and a check report must hold k projections and a norm per partition: anything else is a
lie that its signed message proves alone. A lie caught only by a validator (a poisoned gradient) does not void
the step: CenteredClip already bounded what the lie could do. Every wait has a deadline (``phase_timeout_s``).

Transport and task are injected (``send``, ``task``): the same code runs in one process over an in-memory
transport (unit tests) and between processes over hivemind's libp2p (``secure.btard_peer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgpack
import numpy as np
import torch

from corolla.algorithms.accusations import BanState, MissingMessage, ProvenLie, apply
from corolla.algorithms.centered_clip import CenteredClipConfig, centered_clip
from corolla.algorithms.clip_verification import (
    Projection,
    check_aggregate,
    check_projection_along,
    default_tolerance,
    peer_projection_along,
    random_direction,
)
from corolla.algorithms.commit_reveal import combine, make_commitment, seed_to_generator, seed_to_int, verify_reveal
from corolla.log import get_logger
from corolla.secure.attacks import byzantine_gradients
from corolla.secure.behaviour import Behaviour
from corolla.secure.envelope import Envelope, ForgedMessage, Header, SignedDigest, Signer, open_envelope
from corolla.secure.mailbox import Mailbox

__all__ = ["BtardProtocol", "ProtocolConfig", "StepOutcome", "Task", "Verdict", "state_digest"]

logger = get_logger(__name__)

VOIDING_CLAIMS = frozenset(
    {"part_mismatch", "wrong_aggregate", "reveal", "misreport", "equivocation", "malformed", "malformed_report"}
)
ECHOED_KINDS = ("commit", "aggregate", "reveal", "check")
# the fields each kind of message must have, and their types: anything else is refused on arrival
BODY_FIELDS: dict[str, dict[str, type]] = {
    "commit": {"hashes": list, "seed_commitment": bytes, "state": bytes},
    "part": {"data": bytes},
    "aggregate": {"data": bytes},
    "reveal": {"value": bytes},
    "check": {"s": list, "nu": list},
    "accuse": {"accusations": list, "missing": list, "missing_prev": list, "echo": list},
}


class Task(Protocol):
    """What is trained: a flat parameter vector and every peer's gradient on its public batch."""

    params: torch.Tensor

    def gradient(self, step: int, peer: str, *, wrong_labels: bool = False) -> torch.Tensor: ...


@dataclass(frozen=True)
class ProtocolConfig:
    run: str
    tau: float = 1.0
    clip_iters: int = 500
    clip_tol: float = 1e-9
    # independent random directions per partition in the check: a forgery passes only if it passes along every one,
    # so two square the chance that one slips through (what a float32 aggregate needs; module docstring)
    check_directions: int = 2
    validators: int = 1
    # every wait for messages, and every send (a send runs beside the wait for the phase's messages: a message
    # of megabytes on a slow link may take most of the phase)
    phase_timeout_s: float = 10.0

    def __post_init__(self):
        if not (self.tau > 0 and self.clip_iters >= 1 and self.clip_tol >= 0 and self.validators >= 0):
            raise ValueError("need tau > 0, clip_iters >= 1, clip_tol >= 0 and validators >= 0")
        if self.check_directions < 1:
            raise ValueError(f"check_directions must be at least 1, got {self.check_directions}")
        if not self.phase_timeout_s > 0:
            raise ValueError("phase_timeout_s must be positive")


@dataclass(frozen=True)
class Verdict:
    accuser: str
    accused: str
    claim: str
    result: str  # "valid" (the accused lied), "false" (the accuser lied) or "moot" (explained by another lie)
    detail: str = ""


@dataclass
class StepOutcome:
    step: int
    group: tuple[str, ...]
    update: torch.Tensor | None  # None: the step is void
    state: BanState
    verdicts: list[Verdict] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (reporter, silent)
    void_reason: str | None = None
    diverged_from: list[str] = field(default_factory=list)  # peers whose ban state differed from ours
    seconds: dict[str, float] = field(default_factory=dict)  # per phase


def state_digest(state: BanState) -> bytes:
    return hashlib.sha256(msgpack.packb(sorted(state.active))).digest()


def _hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _part_digest(part: torch.Tensor) -> bytes:
    """The commitment to a part: the digest of its part message's body, as ``Signer.seal`` computes it."""
    return _hash(msgpack.packb({"data": _f32(part)}))


def _f32(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.float32).contiguous().numpy().tobytes()


def _from_bytes(data: bytes, dtype: np.dtype) -> torch.Tensor:
    if len(data) % np.dtype(dtype).itemsize:
        raise ValueError(f"{len(data)} bytes are not a whole number of {np.dtype(dtype).name} values")
    return torch.from_numpy(np.frombuffer(data, dtype=dtype).copy())


def _directions(seed: bytes, sizes: list[int], k: int) -> list[torch.Tensor]:
    """The k check directions of each partition, [k, size], each from its own hash of the step's seed.

    Partitions of the same size share their directions (tensor_split makes at most two sizes): a partition's check
    needs its directions to be uniform and unknown until its aggregate is committed, which they are, and not
    independent of another partition's. Drawing them costs each peer 2k instead of nk vectors per step."""
    drawn: dict[int, torch.Tensor] = {}
    for size in sizes:
        if size not in drawn:
            drawn[size] = torch.stack([
                random_direction(size, seed_to_int(_hash(seed + size.to_bytes(8, "big") + r.to_bytes(4, "big")), 63))
                for r in range(k)
            ])  # fmt: skip
    return [drawn[size] for size in sizes]


class _Step:
    """Everything one peer saw and did in one step (bodies decoded once)."""

    def __init__(self, step: int, group: tuple[str, ...]):
        self.step, self.group = step, group
        self.index = {p: i for i, p in enumerate(group)}
        self.envelopes: dict[tuple[str, str], Envelope] = {}  # (kind, sender) -> what we act on
        self.bodies: dict[tuple[str, str], dict] = {}
        self.parts_in: dict[str, Envelope] = {}  # the parts sent to us, by sender
        self.missing: dict[str, str] = {}  # silent peer -> the first kind we missed from it
        self.accusations: list[dict] = []
        self.seed: bytes | None = None
        self.aggregates: dict[str, torch.Tensor] = {}
        self.good_parts: dict[str, torch.Tensor] = {}  # the parts sent to us that match their commitments
        # as witness of the previous peer: its own part (the one it aggregates itself), checked, and its message
        self.witnessed: tuple[str, torch.Tensor, Envelope] | None = None

    def body(self, kind: str, sender: str) -> dict | None:
        return self.bodies.get((kind, sender))


class BtardProtocol:
    def __init__(
        self,
        *,
        me: str,
        signer: Signer,
        keys: Mapping[str, bytes],
        config: ProtocolConfig,
        task: Task,
        send: Callable[[str, Envelope], Awaitable[None]],
        mailbox: Mailbox,
        behaviour: Behaviour | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ):
        self.me, self.signer, self.keys, self.config = me, signer, dict(keys), config
        self.task, self.send, self.mailbox = task, send, mailbox
        self.behaviour = behaviour or Behaviour()
        self.rng = rng
        self.state = BanState.start(self.keys)
        self.clip = CenteredClipConfig(tau=config.tau, max_iters=config.clip_iters, tol=config.clip_tol)
        self._history: list[torch.Tensor] = []  # own honest gradients (the delayed attack)
        self._outgoing: set[asyncio.Task] = set()  # sends in flight
        self._missed_accuse: list[str] = []  # peers whose accusations of our previous step never came
        self.refused = 0  # messages refused on receipt (forged, malformed, foreign)

    # ---- messaging ---------------------------------------------------------------------------------------
    def _seal(self, kind: str, step: int, body: dict, slot: int = 0, sender: str | None = None) -> Envelope:
        return self.signer.seal(run=self.config.run, sender=sender or self.me, kind=kind, step=step, slot=slot,
                                body=body)  # fmt: skip

    async def _send(self, peer: str, envelope: Envelope) -> None:
        try:
            await asyncio.wait_for(self.send(peer, envelope), self.config.phase_timeout_s)
        except Exception as e:  # the receiver reports what it did not get; we only log
            logger.info("Could not send %s of step %d to %s: %s", envelope.header.kind, envelope.header.step,
                        peer[-8:], f"{type(e).__name__}: {e}")  # fmt: skip

    def _post(self, peer: str, envelope: Envelope) -> None:
        """Send in the background: the phase's wait for the others' messages starts at once."""
        task = asyncio.create_task(self._send(peer, envelope))
        self._outgoing.add(task)
        task.add_done_callback(self._outgoing.discard)

    async def _flush(self) -> None:
        """Wait for the sends in flight (each ends within the phase timeout)."""
        while self._outgoing:
            await asyncio.gather(*list(self._outgoing))

    async def _broadcast(self, s: _Step, kind: str, body: dict, slot: int = 0) -> Envelope:
        envelope = self._seal(kind, s.step, body, slot)
        await self.mailbox.put(envelope)
        if not self._silent(s.step, kind):
            for p in s.group:
                if p != self.me:
                    self._post(p, envelope)
        return envelope

    def _silent(self, step: int, kind: str) -> bool:
        return self.behaviour.does("silent", step) and kind != "commit"

    async def _collect(self, s: _Step, kind: str, slots: Mapping[str, int]) -> dict[str, Envelope]:
        """The step's messages of ``kind`` (each sender at its slot), waiting up to the phase timeout; a sender
        that sent none is recorded as missing (and not waited for again in this step)."""
        waiting = {p: slot for p, slot in slots.items() if p not in s.missing}
        deadline = time.monotonic() + self.config.phase_timeout_s
        got = await self.mailbox.collect(s.step, kind, waiting, deadline=deadline)
        for p in slots:
            if p not in got:
                s.missing.setdefault(p, kind)
        for p, envelope in got.items():
            s.bodies[(kind, p)] = envelope.decode()  # its signature was checked when it arrived
            if kind == "part":
                s.parts_in[p] = envelope
            else:
                s.envelopes[(kind, p)] = envelope
        return got

    def _check_origin(self, h: Header) -> None:
        """ValueError unless a message's header is for this run and names a peer of the run as its sender."""
        if h.run != self.config.run:
            raise ValueError(f"the message is for run {h.run!r}, not {self.config.run!r}")
        if h.sender not in self.keys:
            raise ValueError(f"{h.sender} is not a peer of run {self.config.run!r}")

    @contextlib.contextmanager
    def _refusing(self):
        """Counts and logs a message refused with a ValueError (which goes on to the sender)."""
        try:
            yield
        except ValueError as e:
            self.refused += 1
            logger.warning("Refused a message: %s", e)
            raise

    def screen(self, proof: SignedDigest) -> None:
        """Before a large message's body arrives: ValueError unless its signed header is for this run, from a peer
        of the run, signed by that peer and for a step near ours (the body is checked against it on arrival)."""
        with self._refusing():
            h = proof.header
            self._check_origin(h)
            if not proof.verify(self.keys[h.sender]):
                raise ForgedMessage(f"the {h.kind} of step {h.step} is not signed by {h.sender}")
            self.mailbox.check_step(h.step)

    async def receive(self, data: bytes) -> None:
        """A message from the network: refused (ValueError saying why) unless it is well-formed, for this run, from
        a peer of the run, signed by that peer and for a step near ours; else stored for the step that needs it."""
        with self._refusing():
            envelope = Envelope.from_wire(data)
            h = envelope.header
            self._check_origin(h)
            open_envelope(envelope, self.keys[h.sender])
            self.mailbox.check_step(h.step)
            check_body(h.kind, envelope.decode())
        await self.mailbox.put(envelope)

    def _accuse(self, s: _Step, accused: str, claim: str, evidence: list[Envelope], **extra) -> None:
        logger.info("Step %d: accusing %s (%s)", s.step, accused[-8:], claim)
        s.accusations.append({"accused": accused, "claim": claim, "evidence": [e.to_list() for e in evidence],
                              **extra})  # fmt: skip

    # ---- the step ----------------------------------------------------------------------------------------
    async def step(self, step: int) -> StepOutcome:
        try:
            return await self._step(step)
        finally:
            await self._flush()  # our last messages reach the others before we move on (or stop)

    async def _step(self, step: int) -> StepOutcome:
        group = tuple(sorted(self.state.active))
        if self.me not in group:
            raise RuntimeError(f"{self.me} is no longer active ({self.state.status(self.me)})")
        self.mailbox.forget_before(step)
        s = _Step(step, group)
        n, me_index = len(group), group.index(self.me)
        times: dict[str, float] = {}
        started = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal started
            now = time.perf_counter()
            times[name] = now - started
            started = now

        # 1. commit
        sent = self._gradient_to_send(step, group)
        parts = [p.clone() for p in torch.tensor_split(sent.to(torch.float32), n)]
        outgoing = parts  # what is committed to and sent
        if self.behaviour.does("nonfinite_part", step):  # committed to, so only its values give it away
            outgoing = [p.clone() for p in parts]
            for j in range(n):
                if j != me_index and outgoing[j].numel():
                    outgoing[j][0] = float("nan")
        # the part messages are sealed now: a commitment is the signed digest of the part's message, so neither side
        # hashes a part twice (a receiver compares the digest its signature check verified)
        sealed = [self._seal("part", step, {"data": _f32(p)}, slot=j) for j, p in enumerate(outgoing)]
        hashes = [envelope.header.digest for envelope in sealed]
        round_id = f"{self.config.run}:{step}"
        value = self.rng(32)
        commit_body = {
            "hashes": hashes,
            "seed_commitment": make_commitment(round_id, self.me, value),
            "state": state_digest(self.state),
        }
        await self._broadcast(s, "commit", commit_body)
        if self.behaviour.starts("forge", step):
            await self._forge(s, commit_body)
        commits = await self._collect(s, "commit", {p: 0 for p in group})
        for p in [p for p in commits if len(s.body("commit", p)["hashes"]) != n]:
            # hashes for another group size (a peer whose view of the bans differs): as good as no commitment
            logger.info(
                "Step %d: %s committed to %d parts, not %d", step, p[-8:], len(s.body("commit", p)["hashes"]), n
            )
            del commits[p], s.envelopes[("commit", p)], s.bodies[("commit", p)]
            s.missing.setdefault(p, "commit")
        diverged = [p for p in commits if s.body("commit", p)["state"] != commit_body["state"]]
        lap("commit")

        # 2. parts
        if not self._silent(step, "part"):
            for j, peer in enumerate(group):
                envelope = sealed[j]
                if self.behaviour.does("bad_part", step) and peer != self.me:
                    envelope = self._seal("part", step, {"data": _f32(outgoing[j] + 1.0)}, slot=j)
                if peer == self.me:
                    await self.mailbox.put(envelope)
                    if n > 1:  # our own part also goes to our witness, which checks our report on it
                        self._post(_witness(group, self.me), envelope)
                else:
                    self._post(peer, envelope)
        received = await self._collect(s, "part", {p: me_index for p in group})
        good: dict[str, torch.Tensor] = {}
        for p, envelope in received.items():
            commit = s.body("commit", p)
            if commit is None:
                continue
            data = s.body("part", p)["data"]
            # a part must match its commitment and be the partition's size of finite values: a NaN would stop
            # CenteredClip (and every honest aggregator with it)
            if _bad_part(envelope.header.digest, data, commit["hashes"][me_index], parts[me_index].numel()):
                self._accuse(s, p, "part_mismatch", [s.envelopes[("commit", p)], envelope])
                continue
            good[p] = _from_bytes(data, np.float32)
        s.good_parts = {p: t for p, t in good.items() if p != self.me}
        lap("part")

        # 3. aggregate
        # always sent (a missing part voids the step anyway; not sending would get this peer eliminated)
        good.setdefault(self.me, parts[me_index])
        stacked = torch.stack([good[p] for p in group if p in good]).to(torch.float64)
        own_aggregate = centered_clip(stacked, config=self.clip).value
        if self.behaviour.does("wrong_aggregate", step):
            own_aggregate = own_aggregate + 0.01 * own_aggregate.norm() / own_aggregate.numel() ** 0.5
        if self.behaviour.does("malformed_aggregate", step):
            own_aggregate = own_aggregate[:-1]
        if self.behaviour.does("nonfinite_aggregate", step):
            own_aggregate = own_aggregate.clone()
            own_aggregate[0] = float("inf")
        # sent in float32, as the all-reduce sends its results: computed to clip_tol in float64, then rounded (the
        # check's tolerance allows for the rounding, and its directions make up for the precision lost)
        await self._broadcast(s, "aggregate", {"data": _f32(own_aggregate)}, slot=me_index)
        aggregates = await self._collect(s, "aggregate", {p: i for i, p in enumerate(group)})
        for p in aggregates:
            data = s.body("aggregate", p)["data"]
            problem = _malformed(data, parts[s.index[p]].numel())
            if problem:
                self._accuse(s, p, "malformed", [s.envelopes[("aggregate", p)]], detail=problem)
                continue
            s.aggregates[p] = _from_bytes(data, np.float32)
        lap("aggregate")

        # 4. reveal
        reveal = self.rng(32) if self.behaviour.does("changed_reveal", step) else value
        await self._broadcast(s, "reveal", {"value": reveal})
        reveals = await self._collect(s, "reveal", {p: 0 for p in group})
        commitments = {p: s.body("commit", p)["seed_commitment"] for p in commits}
        values = {p: s.body("reveal", p)["value"] for p in reveals if p in commitments}
        drawn = combine(round_id, values, commitments) if commitments else None
        if drawn is not None:
            for p in sorted(drawn.cheaters):
                self._accuse(s, p, "reveal", [s.envelopes[("commit", p)], s.envelopes[("reveal", p)]])
            s.seed = drawn.seed
        lap("reveal")

        # 5. check (an empty report when there is nothing to check: the step is void, but we are not silent)
        directions = None
        if s.seed is None or len(s.aggregates) < n:
            await self._broadcast(s, "check", {"s": [], "nu": []})
            await self._collect(s, "check", {p: 0 for p in group})
        else:
            k = self.config.check_directions
            directions = _directions(s.seed, [p.numel() for p in parts], k)
            projections = [
                peer_projection_along(parts[j], s.aggregates[group[j]], directions[j], self.config.tau)
                for j in range(n)
            ]
            body = {
                "s": [[p.s for p in along] for along in projections],
                "nu": [along[0].norm for along in projections],
            }
            if self.behaviour.does("malformed_report", step):  # one value too many for its own partition
                body["s"][me_index] = [*body["s"][me_index], 0.0]
            if self.behaviour.does("huge_report", step):  # sums that overflow float64 (with a second such peer)
                body["s"] = [[1.7e308] * k for _ in range(n)]
            if self.behaviour.does("cancel_own_report", step):
                # as aggregator it holds every part of its partition, so it knows what the others will report and
                # reports for its own part whatever makes the sums vanish (hiding a wrong aggregate)
                others = [
                    peer_projection_along(part, s.aggregates[self.me], directions[me_index], self.config.tau)
                    for part in s.good_parts.values()
                ]
                body["s"][me_index] = [-sum(o[r].s for o in others) for r in range(k)]
            if self.behaviour.does("empty_check", step):
                body = {"s": [], "nu": []}
            if self.behaviour.does("equivocate", step):
                await self._equivocate(s, body)
            else:
                await self._broadcast(s, "check", body)
            check_deadline = time.monotonic() + self.config.phase_timeout_s
            checks = await self._collect(s, "check", {p: 0 for p in group})
            for p in checks:  # a report of another shape is a lie anyone can see in the signed message alone
                if _malformed_report(s.body("check", p), n, self.config.check_directions, self.config.tau):
                    self._accuse(s, p, "malformed_report", [s.envelopes[("check", p)]])
            self._check_reports(s, checks, directions, me_index)
            # collected only now: its transfer overlaps the aggregate and reveal phases instead of lengthening one
            await self._collect_witnessed(s, commits, deadline=check_deadline)
            self._check_witnessed(s, checks, directions)
            self._check_aggregates(s, checks)
            self._validate(s, directions)
        lap("check")

        # 6. accuse
        if self.behaviour.starts("false_accusation", step):
            victim = next((p for p in group if p != self.me and ("commit", p) in s.envelopes), None)
            if victim is not None:
                self._accuse(s, victim, "gradient", [s.envelopes[("commit", victim)]])
        echo = [e.proof.to_list() for (kind, _), e in sorted(s.envelopes.items()) if kind in ECHOED_KINDS]
        echo += [b.proof.to_list() for a, b in self.mailbox.conflicts if a.header.step == step]
        missing = sorted(s.missing)
        if self.behaviour.does("empty_check", step):
            missing = sorted({*missing, self.me})  # an excuse for the empty report that names no one else
        body = {"accusations": s.accusations, "missing": missing, "echo": echo,
                "missing_prev": [p for p in self._missed_accuse if p in s.index]}  # fmt: skip
        if not self.behaviour.does("withhold_accusations", step):
            await self._broadcast(s, "accuse", body)
        else:
            await self.mailbox.put(self._seal("accuse", step, body))
        accuse = await self._collect(s, "accuse", {p: 0 for p in group})
        lap("accuse")

        outcome = self._resolve(s, accuse, directions)
        outcome.diverged_from = diverged
        outcome.seconds = times
        # a peer whose accusations never came is reported in the next step (eliminated then, with the reporter)
        self._missed_accuse = [p for p, kind in s.missing.items() if kind == "accuse" and p in self.state.active]
        return outcome

    # ---- what to send ------------------------------------------------------------------------------------
    def _gradient(self, step: int, peer: str, *, wrong_labels: bool = False) -> torch.Tensor:
        """``peer``'s gradient on the public batch of ``step`` as everyone computes it: float32 with NaN as 0 and
        infinities at float32's largest values (an honest overflow is then not a "non-finite part" lie)."""
        gradient = self.task.gradient(step, peer, wrong_labels=wrong_labels).to(torch.float32)
        big = torch.finfo(torch.float32).max
        return torch.nan_to_num(gradient, nan=0.0, posinf=big, neginf=-big)

    def _gradient_to_send(self, step: int, group: tuple[str, ...]) -> torch.Tensor:
        attack = self.behaviour.gradient
        own = self._gradient(step, self.me, wrong_labels=attack.flips_labels(step))
        honest_own = own if not attack.flips_labels(step) else self._gradient(step, self.me)
        self._history = [*self._history[-attack.delay_steps :], honest_own]
        if not attack.active(step) or attack.kind == "label_flip":
            return own
        # the attackers know the public data: they compute the others' gradients of the step themselves
        others = [p for p in group if p != self.me]
        honest = torch.stack([self._gradient(step, p) for p in others]) if others else own[None, :0]
        stale = self._history[0][None] if len(self._history) > attack.delay_steps else None
        bad = byzantine_gradients(attack, step, own=own[None], honest=honest, stale=stale)[0]
        big = torch.finfo(torch.float32).max
        return torch.nan_to_num(bad.to(torch.float32), nan=0.0, posinf=big, neginf=-big)

    async def _forge(self, s: _Step, body: dict) -> None:
        victim = next(p for p in s.group if p != self.me)
        forged = self._seal("commit", s.step, {**body, "state": b"\0" * 32}, sender=victim)
        logger.info("Step %d: sending a commitment forged under %s's identity", s.step, victim[-8:])
        for p in s.group:
            if p not in (self.me, victim):
                self._post(p, forged)

    async def _equivocate(self, s: _Step, body: dict) -> None:
        honest = self._seal("check", s.step, body)
        lie = self._seal("check", s.step, {**body, "s": [[x + 1.0 for x in along] for along in body["s"]]})
        await self.mailbox.put(honest)
        others = [p for p in s.group if p != self.me]
        for i, p in enumerate(others):
            self._post(p, honest if i % 2 else lie)

    # ---- checks ------------------------------------------------------------------------------------------
    def _check_reports(self, s: _Step, checks, directions, me_index: int) -> None:
        """As aggregator: every peer's report on our partition must match what its part gives."""
        my_aggregate = s.aggregates.get(self.me)
        for p in checks:
            if p not in s.good_parts or _empty_report(s.body("check", p)):
                continue  # ourselves, a part that did not match its commitment (accused already), or no report
            claimed = _report(s.body("check", p), me_index)
            part = s.good_parts[p]
            if claimed is None or not check_projection_along(part, my_aggregate, directions[me_index],
                                                             self.config.tau, claimed):  # fmt: skip
                self._accuse(
                    s, p, "misreport",
                    [s.envelopes[("check", p)], s.envelopes[("commit", p)], s.envelopes[("aggregate", self.me)],
                     s.parts_in[p]],
                    partition=me_index,
                )  # fmt: skip

    async def _collect_witnessed(self, s: _Step, commits, *, deadline: float) -> None:
        """As witness of the previous peer of the group: its own part, checked against its commitment. Waited for
        no longer than the check phase (sent in the part phase, it is normally here long before): a withheld copy
        must not make the witness late for the next phase."""
        if len(s.group) < 2:
            return
        aggregator = s.group[(s.index[self.me] - 1) % len(s.group)]
        if aggregator in s.missing or aggregator not in commits:
            return
        j = s.index[aggregator]
        envelope = (await self.mailbox.collect(s.step, "part", {aggregator: j}, deadline=deadline)).get(aggregator)
        if envelope is None:
            s.missing.setdefault(aggregator, "part")
            return
        data = envelope.decode()["data"]
        commitment = s.body("commit", aggregator)["hashes"][j]
        if _bad_part(envelope.header.digest, data, commitment, _partition_size(self.task, len(s.group), j)):
            self._accuse(s, aggregator, "part_mismatch", [s.envelopes[("commit", aggregator)], envelope])
            return
        s.witnessed = (aggregator, _from_bytes(data, np.float32), envelope)

    def _check_witnessed(self, s: _Step, checks, directions) -> None:
        """As witness: the previous peer's report on its own part (which only it and we hold) must match that part.
        Without this an aggregator, which can compute everyone else's report on its partition, could report for
        its own part whatever makes the sums vanish, and pass a wrong aggregate."""
        if s.witnessed is None:
            return
        aggregator, part, envelope = s.witnessed
        report = s.body("check", aggregator)
        if aggregator not in checks or _empty_report(report) or _malformed_report(
                report, len(s.group), self.config.check_directions, self.config.tau):  # fmt: skip
            return  # no report (missing), an empty one or a malformed one: judged by their own rules
        j = s.index[aggregator]
        claimed = _report(report, j)
        if claimed is None or not check_projection_along(part, s.aggregates[aggregator], directions[j],
                                                         self.config.tau, claimed):  # fmt: skip
            self._accuse(
                s, aggregator, "misreport",
                [s.envelopes[("check", aggregator)], s.envelopes[("commit", aggregator)],
                 s.envelopes[("aggregate", aggregator)], envelope],
                partition=j,
            )  # fmt: skip

    def _check_aggregates(self, s: _Step, checks) -> None:
        reports = [s.body("check", p) for p in s.group]
        n, k = len(s.group), self.config.check_directions
        if len(checks) != n or any(
            not r or not r.get("s") or _malformed_report(r, n, k, self.config.tau) for r in reports
        ):
            return  # someone is missing, had nothing to check or sent a malformed report: the step is void anyway
        for j, aggregator in enumerate(s.group):
            if aggregator == self.me:
                continue
            if not _partition_check(s, j, self.config):
                evidence = [s.envelopes[("aggregate", aggregator)]] + [s.envelopes[("check", p)] for p in s.group]
                self._accuse(s, aggregator, "wrong_aggregate", evidence, partition=j)

    def _validate(self, s: _Step, directions) -> None:
        """The seed's validators recompute their target's gradient; ours if we are one."""
        generator = seed_to_generator(s.seed)
        n = len(s.group)
        if n < 2:
            return  # no one else to validate
        for _ in range(self.config.validators):
            v = int(generator.integers(n))
            t = int(generator.integers(n - 1))
            validator, target = s.group[v], s.group[t + (t >= v)]
            if validator != self.me or ("commit", target) not in s.envelopes:
                continue
            parts = torch.tensor_split(self._gradient(s.step, target), n)
            if [_part_digest(p) for p in parts] != s.body("commit", target)["hashes"]:
                self._accuse(s, target, "gradient", [s.envelopes[("commit", target)]])
                continue
            report = s.body("check", target)
            if _empty_report(report):
                continue  # judged by what its accusations say (``_empty_reports``)
            for j, aggregator in enumerate(s.group):
                claimed = _report(report, j) if report is not None else None
                if report is not None and (claimed is None or not check_projection_along(
                    parts[j], s.aggregates[aggregator], directions[j], self.config.tau, claimed)):  # fmt: skip
                    self._accuse(
                        s, target, "misreport",
                        [s.envelopes[("check", target)], s.envelopes[("commit", target)],
                         s.envelopes[("aggregate", aggregator)]],
                        partition=j,
                    )  # fmt: skip
                    break

    # ---- judging -----------------------------------------------------------------------------------------
    def _resolve(self, s: _Step, accuse: dict[str, Envelope], directions) -> StepOutcome:
        verdicts: list[Verdict] = []
        for accuser in sorted(accuse):
            for accusation in s.body("accuse", accuser)["accusations"]:
                verdicts.append(self.judge(s, accuser, accusation, directions))
        verdicts += self._equivocations(s, accuse)
        # a failed partition check may come from a lying report rather than the aggregate: with a proven misreport
        # in that partition, or a peer that sent different reports to different peers, the accusation is moot
        missing = []  # (reporter, silent) in this step, then in the previous step's accuse phase
        missing_before = []
        for reporter in sorted(accuse):
            body = s.body("accuse", reporter)
            for key, pairs in (("missing", missing), ("missing_prev", missing_before)):
                pairs += [
                    (reporter, silent) for silent in sorted(set(body[key])) if silent in s.index and silent != reporter
                ]
        # a partition check can fail because of a lying report, a part left out or a silent peer rather than a
        # wrong aggregate: in a step with such a proven lie or a missing message, accusing an aggregator is moot
        other_lies = any(v.result == "valid" and v.claim in ("misreport", "equivocation", "part_mismatch",
                                                             "malformed_report")
                         for v in verdicts)  # fmt: skip
        verdicts = [
            Verdict(v.accuser, v.accused, v.claim, "moot", v.detail)
            if v.claim == "wrong_aggregate" and v.result == "valid" and (other_lies or missing)
            else v
            for v in verdicts
        ]
        empty, unjustified = self._empty_reports(s, accuse, verdicts)
        state = self.state
        for v in sorted(verdicts, key=lambda v: (v.accused, v.accuser, v.claim)):
            if v.result == "moot":
                continue
            state = apply(state, ProvenLie(v.accuser, v.accused, v.result == "valid", f"{v.claim} at step {s.step}"))
        for p in unjustified:  # seen by everyone alike: shown by the first peer still active
            shown_by = next((q for q in s.group if q != p and q in state.active), None)
            if shown_by is not None:
                detail = f"an empty check with nothing missing at step {s.step}"
                state = apply(state, ProvenLie(shown_by, p, True, detail))
        for reporter, silent in sorted({*missing, *missing_before}, key=lambda m: (m[1], m[0])):
            state = apply(state, MissingMessage(reporter, silent))
        void = None
        if missing or len(accuse) < len(s.group):
            void = "a message was missing"
        elif any(v.result == "valid" and v.claim in VOIDING_CLAIMS for v in verdicts):
            void = "a part, aggregate, reveal or report was proven false"
        elif s.seed is None or len(s.aggregates) < len(s.group) or empty:
            void = "no seed, not every aggregate, or a peer had nothing to check"
        update = None if void else torch.cat([s.aggregates[p] for p in s.group]).to(torch.float32)
        for name in sorted(set(state.banned) - set(self.state.banned)):
            logger.info("Step %d: banned %s (%s)", s.step, name[-8:], state.banned[name])
        for name in sorted(state.eliminated - self.state.eliminated):
            logger.info("Step %d: eliminated %s", s.step, name[-8:])
        if void:
            logger.info("Step %d is void: %s", s.step, void)
        self.state = state
        return StepOutcome(step=s.step, group=s.group, update=update, state=state, verdicts=verdicts,
                           missing=sorted({*missing, *missing_before}), void_reason=void)  # fmt: skip

    def judge(self, s: _Step, accuser: str, accusation: object, directions) -> Verdict:
        """Check one accusation's evidence; every peer reaches the same verdict from the same messages."""
        if not isinstance(accusation, dict) or not isinstance(accusation.get("accused"), str):
            return Verdict(accuser, "?", "malformed", "moot", "an accusation that names nobody")
        accused, claim = accusation["accused"], str(accusation.get("claim"))
        partition = accusation.get("partition")
        detail = str(partition) if claim in ("misreport", "wrong_aggregate") else ""

        def verdict(valid: bool | None) -> Verdict:
            result = "moot" if valid is None else ("valid" if valid else "false")
            return Verdict(accuser, accused, claim, result, detail)

        if accused not in s.index or accused == accuser:
            return verdict(None)
        try:
            evidence = [Envelope.from_list(e) for e in accusation.get("evidence", [])]
            bodies, digests = {}, {}  # digests: as signed (open_envelope checks the body against it)
            for e in evidence:
                h = e.header
                if h.run != self.config.run or h.step != s.step or h.sender not in s.index:
                    return verdict(False)
                bodies[(h.kind, h.sender, h.slot)] = open_envelope(e, self.keys[h.sender])
                digests[(h.kind, h.sender, h.slot)] = h.digest
        except (ValueError, ForgedMessage, KeyError):
            return verdict(False)  # evidence that does not check out is a false accusation
        n = len(s.group)
        try:
            commit = bodies.get(("commit", accused, 0))
            if claim == "gradient":
                if commit is None:
                    return verdict(False)
                recomputed = torch.tensor_split(self._gradient(s.step, accused), n)
                return verdict([_part_digest(p) for p in recomputed] != list(commit["hashes"]))
            if claim == "part_mismatch":
                j = s.index[accuser]
                part = bodies.get(("part", accused, j))
                if part is None and accuser == _witness(s.group, accused):  # the accused's own part, witnessed
                    j = s.index[accused]
                    part = bodies.get(("part", accused, j))
                if commit is None or part is None:
                    return verdict(False)
                size = _partition_size(self.task, n, j)
                return verdict(_bad_part(digests[("part", accused, j)], part["data"], commit["hashes"][j], size))
            if claim == "reveal":
                reveal = bodies.get(("reveal", accused, 0))
                if commit is None or reveal is None:
                    return verdict(False)
                round_id = f"{self.config.run}:{s.step}"
                return verdict(not verify_reveal(commit["seed_commitment"], round_id, accused, reveal["value"]))
            if claim == "malformed":
                aggregate = bodies.get(("aggregate", accused, s.index[accused]))
                if aggregate is None:
                    return verdict(False)
                return verdict(_malformed(aggregate.get("data"), _partition_size(self.task, n, s.index[accused])))
            if claim == "malformed_report":
                report = bodies.get(("check", accused, 0))
                return verdict(
                    report is not None and _malformed_report(report, n, self.config.check_directions, self.config.tau)
                )
            if directions is None:
                return verdict(None)  # without the seed no one can judge the checks
            j = int(partition)
            aggregator = s.group[j]
            aggregate = bodies.get(("aggregate", aggregator, j))
            if aggregate is None:
                return verdict(False)
            value = _from_bytes(aggregate["data"], np.float32)
            if claim == "misreport":
                report = bodies.get(("check", accused, 0))
                if commit is None or report is None:
                    return verdict(False)
                if _empty_report(report):
                    return verdict(None)  # no report is no misreport (``_empty_reports`` judges it)
                sent_part = bodies.get(("part", accused, j))
                if sent_part is not None and digests[("part", accused, j)] == commit["hashes"][j]:
                    part = _from_bytes(sent_part["data"], np.float32)
                else:
                    part = torch.tensor_split(self._gradient(s.step, accused), n)[j]
                    if _part_digest(part) != commit["hashes"][j]:
                        return verdict(None)  # a poisoned gradient: its validator accuses it for that
                claimed = _report(report, j)
                return verdict(claimed is None or not check_projection_along(part, value, directions[j],
                                                                             self.config.tau, claimed))  # fmt: skip
            if claim == "wrong_aggregate":
                if aggregator != accused:
                    return verdict(False)
                reports = [bodies.get(("check", p, 0)) for p in s.group]
                if any(r is None for r in reports):
                    return verdict(False)
                projections = [_report(r, j) for r in reports]
                if any(p is None or len(p) != len(directions[j]) for p in projections):
                    return verdict(None)  # a malformed report: its sender is at fault
                return verdict(not _along_every_direction(value, projections, self.config))
        except (KeyError, IndexError, TypeError, ValueError, ArithmeticError) as e:
            logger.debug("Malformed evidence from %s against %s: %s", accuser[-8:], accused[-8:], e)
            return verdict(False)
        return verdict(False)  # a claim that does not exist

    def _empty_reports(self, s: _Step, accuse: dict[str, Envelope], verdicts: list[Verdict]) -> tuple[list, list]:
        """The peers whose check report was empty (they had nothing to check), and those of them that had no
        reason: a peer may send an empty report only if it missed a message (and says so: it is eliminated with the
        silent peer), or in a step that a proven malformed aggregate or changed reveal made void (no seed, or not
        every aggregate, for anyone). Without this rule an aggregator could send a wrong result and an empty report,
        and no partition would be checked."""
        empty = sorted(p for p in s.group if _empty_report(s.body("check", p)))
        if any(v.result == "valid" and v.claim in ("malformed", "reveal") for v in verdicts):
            return empty, []
        unjustified = []
        for p in empty:
            body = s.body("accuse", p)
            if p not in accuse or body is None:
                continue  # its accusations did not come: reported in the next step, and eliminated then
            if not [m for m in body["missing"] if m in s.index and m != p]:
                unjustified.append(p)
        return empty, unjustified

    def _equivocations(self, s: _Step, accuse: dict[str, Envelope]) -> list[Verdict]:
        """Two different signed digests from one sender for one message: it told peers different things."""
        seen: dict[tuple[str, str, int], tuple[bytes, str]] = {}  # (sender, kind, slot) -> (digest, first echoer)
        # the signed digests of the messages we received were verified on arrival: an echo of the same signature
        # over the same header needs no second check (an Ed25519 verification per echoed message adds up)
        verified = {e.proof for e in s.envelopes.values()}

        def genuine(proof: SignedDigest) -> bool:
            return proof in verified or proof.verify(self.keys[proof.header.sender])

        verdicts = []
        for echoer in sorted(accuse):
            for item in s.body("accuse", echoer)["echo"]:
                try:
                    proof = SignedDigest.from_list(item)
                except ValueError:
                    continue
                h = proof.header
                if (h.run, h.step) != (self.config.run, s.step) or h.kind not in ECHOED_KINDS:
                    continue
                if h.sender not in s.index:
                    continue
                key = (h.sender, h.kind, h.slot)
                if key not in seen:
                    if genuine(proof):
                        seen[key] = (h.digest, echoer)
                elif seen[key][0] != h.digest and genuine(proof):
                    accuser = echoer if echoer != h.sender else seen[key][1]
                    if accuser != h.sender and not any(v.accused == h.sender for v in verdicts):
                        verdicts.append(Verdict(accuser, h.sender, "equivocation", "valid", h.kind))
        return verdicts


def check_body(kind: str, body: dict) -> None:
    """ValueError saying what is wrong unless ``body`` has the fields of a ``kind`` message, with their types."""
    fields = BODY_FIELDS.get(kind)
    if fields is None:
        raise ValueError(f"unknown message kind {kind!r}: expected one of {', '.join(BODY_FIELDS)}")
    for name, expected in fields.items():
        if not isinstance(body.get(name), expected):
            raise ValueError(
                f"a {kind} message needs {name!r} as {expected.__name__}, got {type(body.get(name)).__name__}"
            )
    if kind == "commit" and not all(isinstance(h, bytes) and len(h) == 32 for h in body["hashes"]):
        raise ValueError("a commit's hashes must be 32-byte SHA-256 digests")
    if kind == "check" and not (
        all(isinstance(along, list) and all(_number(x) for x in along) for along in body["s"])
        and all(_number(x) for x in body["nu"])
    ):
        raise ValueError("a check lists, per partition, its projections along each direction and a norm: numbers")
    if kind == "accuse" and not all(isinstance(p, str) for p in body["missing"] + body["missing_prev"]):
        raise ValueError("an accuse message names missing peers by their ids (strings)")


def _witness(group: tuple[str, ...], aggregator: str) -> str:
    """The peer that also receives ``aggregator``'s own part and checks its report on it: the next one."""
    return group[(group.index(aggregator) + 1) % len(group)]


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _empty_report(body: dict | None) -> bool:
    """A check report that says "nothing to check" (sent when an aggregate or the seed is missing)."""
    return isinstance(body, dict) and body.get("s") == [] and body.get("nu") == []


def _partition_size(task: Task, n: int, j: int) -> int:
    dim = task.params.numel()
    return dim // n + (j < dim % n)  # as torch.tensor_split cuts


def _malformed(data: object, size: int) -> str:
    """What is wrong with the bytes of a part or an aggregate of ``size`` float32 values ("" if nothing)."""
    if not isinstance(data, bytes):
        return f"the values are {type(data).__name__}, not bytes"
    if len(data) != 4 * size:
        return f"{len(data)} bytes for a partition of {size} float32 values"
    if not np.isfinite(np.frombuffer(data, dtype=np.float32)).all():
        return "the values are not all finite"
    return ""


def _bad_part(digest: bytes, data: object, commitment: bytes, size: int) -> bool:
    """A part that is not the one committed to (by the digest its signature covers), or not ``size`` finite
    float32 values (a NaN would stop CenteredClip, and every honest aggregator with it)."""
    return digest != commitment or bool(_malformed(data, size))


def _malformed_report(body: dict | None, n: int, k: int, tau: float) -> bool:
    """A check report that is not empty but lacks, for some of the n partitions, k projections or a norm, or holds
    a value no honest peer can report: a projection is a clipped difference (norm at most tau) along a unit
    direction, so |s| <= tau, and a norm is finite and >= 0 (a huge value would also overflow the sums)."""
    if not isinstance(body, dict) or _empty_report(body):
        return False
    along, norms = body.get("s"), body.get("nu")
    if not (isinstance(along, list) and isinstance(norms, list) and len(along) == n and len(norms) == n):
        return True
    if not all(isinstance(values, list) and len(values) == k for values in along):
        return True
    bound = tau * (1 + 1e-9)
    return not (
        all(math.isfinite(float(x)) and abs(float(x)) <= bound for values in along for x in values)
        and all(math.isfinite(float(x)) and float(x) >= 0 for x in norms)
    )


def _report(body: dict | None, j: int) -> list[Projection] | None:
    """A peer's report on partition j: one projection per check direction (sharing one ν), None if malformed."""
    try:
        along, nu = body["s"][j], float(body["nu"][j])
        if not isinstance(along, list) or not along:
            return None
        return [Projection(s=float(s), norm=nu) for s in along]
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _partition_check(s: _Step, j: int, config: ProtocolConfig) -> bool:
    aggregate = s.aggregates[s.group[j]]
    reports = [_report(s.body("check", p), j) for p in s.group]
    if any(r is None or len(r) != config.check_directions for r in reports):
        return False
    return _along_every_direction(aggregate, reports, config)


def _along_every_direction(aggregate: torch.Tensor, reports: list[list[Projection]], config: ProtocolConfig) -> bool:
    """The fixed-point check of one aggregate along each of its directions: passed only if passed along all."""
    for r in range(len(reports[0])):
        projections = [report[r] for report in reports]
        tolerance = default_tolerance(aggregate, projections, tau=config.tau, tol=config.clip_tol)
        if not check_aggregate(projections, None, tolerance).passed:
            return False
    return True
