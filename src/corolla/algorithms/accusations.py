"""BTARD-SGD accusations as a pure state machine: who is banned, who is eliminated, who stays.

``apply(state, event)`` returns a new ``BanState`` (the input is never modified). The rules:

* ``ProvenLie(accuser, accused, evidence_valid)``: the accuser broadcast evidence that the accused lied (signed
  messages that contradict each other, a recomputed gradient that differs from its commitment, a wrong aggregate);
  the caller has re-checked it. Valid evidence: the **accused** is banned. Invalid evidence: the **accuser** is banned
  (a false accusation). Messages are signed, so valid evidence against a peer that did not lie cannot exist, and an
  honest peer never accuses falsely: either way the banned peer is Byzantine, and no honest peer is ever banned.
* ``MissingMessage(reporter, silent)``: ``reporter`` says it received nothing from ``silent`` in time. Nobody else
  can tell whether ``silent`` withheld the message or ``reporter`` lies about it, so **both** are eliminated: removed
  from the active peers, but not banned (no lie was proven; an eliminated peer may come back through admission).
  Under BTARD's assumption that honest peers always reach each other in time, at least one of the two is Byzantine,
  so an elimination never raises the Byzantine share among the active peers while it is at most 1/2 (``b`` of ``n``:
  ``(b-1)/(n-2) <= b/n`` iff ``b <= n/2``), and a Byzantine peer trades itself for at most one honest peer.
* An event that names a peer that is not active (banned, eliminated, or never seen) is **ignored** and logged as
  such: the accusation is resolved among the current collaboration only, so an accusation against a removed peer
  is not re-checked (and its accuser not punished), and a removed peer's reports are not heard.
* A peer cannot accuse or report itself: constructing such an event raises ValueError.

Every event, ignored or not, appends one ``Decision`` to ``state.log``.

Pure: plain values in, a new state out; no clock, no randomness.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

__all__ = [
    "BanState",
    "Decision",
    "Event",
    "MissingMessage",
    "ProvenLie",
    "apply",
    "apply_all",
    "byzantine_share",
]


@dataclass(frozen=True)
class ProvenLie:
    """``accuser`` says ``accused`` lied; ``evidence_valid`` is the caller's verdict on the evidence."""

    accuser: str
    accused: str
    evidence_valid: bool
    detail: str = ""  # what the evidence shows, e.g. "gradient part 3 differs from its commitment"

    def __post_init__(self):
        if self.accuser == self.accused:
            raise ValueError(f"peer {self.accuser!r} cannot accuse itself")


@dataclass(frozen=True)
class MissingMessage:
    """``reporter`` got no required message from ``silent`` within the timeout."""

    reporter: str
    silent: str

    def __post_init__(self):
        if self.reporter == self.silent:
            raise ValueError(f"peer {self.reporter!r} cannot report itself silent")


Event = ProvenLie | MissingMessage


@dataclass(frozen=True)
class Decision:
    """What one event did: the peers it banned or eliminated, or why it was ignored."""

    event: Event
    banned: frozenset[str] = frozenset()
    eliminated: frozenset[str] = frozenset()
    ignored_because: str | None = None


@dataclass(frozen=True)
class BanState:
    """The peers of a collaboration: each known peer is in exactly one of ``active``, ``banned`` (peer -> reason,
    permanent) and ``eliminated``. Containers are made immutable on construction."""

    active: frozenset[str]
    banned: Mapping[str, str] = field(default_factory=dict)
    eliminated: frozenset[str] = frozenset()
    log: tuple[Decision, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "active", frozenset(self.active))
        object.__setattr__(self, "banned", MappingProxyType(dict(self.banned)))
        object.__setattr__(self, "eliminated", frozenset(self.eliminated))
        object.__setattr__(self, "log", tuple(self.log))
        overlap = (self.active & self.banned.keys()) | (self.active & self.eliminated)
        overlap |= self.banned.keys() & self.eliminated
        if overlap:
            raise ValueError(f"peers {sorted(overlap)} are in more than one of active, banned and eliminated")

    @classmethod
    def start(cls, peers: Iterable[str]) -> BanState:
        return cls(active=frozenset(peers))

    def status(self, peer: str) -> str:
        """'active', 'banned', 'eliminated' or 'unknown'."""
        if peer in self.active:
            return "active"
        if peer in self.banned:
            return "banned"
        return "eliminated" if peer in self.eliminated else "unknown"


def _inactive(state: BanState, peers: Iterable[str]) -> str | None:
    gone = [f"{p} is {state.status(p)}" for p in peers if p not in state.active]
    return ", ".join(gone) if gone else None


def _ban(state: BanState, event: Event, peer: str, reason: str) -> BanState:
    return replace(
        state,
        active=state.active - {peer},
        banned={**state.banned, peer: reason},
        log=(*state.log, Decision(event, banned=frozenset({peer}))),
    )


def apply(state: BanState, event: Event) -> BanState:
    """The state after ``event`` (module docstring); ``state`` is not modified."""
    if isinstance(event, ProvenLie):
        ignored = _inactive(state, (event.accuser, event.accused))
        if ignored is None:
            detail = f": {event.detail}" if event.detail else ""
            if event.evidence_valid:
                return _ban(state, event, event.accused, f"proven lie, shown by {event.accuser}{detail}")
            return _ban(state, event, event.accuser, f"false accusation against {event.accused}{detail}")
    elif isinstance(event, MissingMessage):
        ignored = _inactive(state, (event.reporter, event.silent))
        if ignored is None:
            pair = frozenset({event.reporter, event.silent})
            return replace(
                state,
                active=state.active - pair,
                eliminated=state.eliminated | pair,
                log=(*state.log, Decision(event, eliminated=pair)),
            )
    else:
        raise TypeError(f"unknown event {event!r}: expected ProvenLie or MissingMessage")
    return replace(state, log=(*state.log, Decision(event, ignored_because=ignored)))


def apply_all(state: BanState, events: Iterable[Event]) -> BanState:
    for event in events:
        state = apply(state, event)
    return state


def byzantine_share(state: BanState, byzantine: set[str] | frozenset[str]) -> float:
    """The fraction of active peers that are in ``byzantine`` (0.0 when no peer is active)."""
    if not state.active:
        return 0.0
    return len(state.active & byzantine) / len(state.active)
