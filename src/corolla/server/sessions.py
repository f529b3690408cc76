"""Open inference sessions of a block server and the rules for steps that arrive twice.

With push on, a step can reach a server two ways: from the client, and pushed by the previous server of the chain
(which sends its output straight on, before the client's copy arrives). Each step is computed once and answered
once, whichever copy comes first. Only the server the client named as this session's previous hop (``pusher`` in
its steps) may push into the session: anyone else who learns a session id cannot inject steps into it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

from hivemind.proto import runtime_pb2

from corolla.errors import InvalidRequestError
from corolla.log import get_logger
from corolla.protocol.messages import InferenceOpen, InferenceStep

logger = get_logger(__name__)

CLIENT, PUSH = "client", "push"  # where a copy of a step came from
ANSWERED_HISTORY = 64  # step ids remembered per session to recognise second copies


@dataclass(kw_only=True)
class Session:
    """Server-side state of one inference session over blocks ``opened.start_block..opened.end_block-1``."""

    opened: InferenceOpen
    span: object  # the SpanModel the session started on (a rebalancing server keeps it until the session ends)
    cache: object
    length: int = 0  # tokens already in the cache
    last_step_at: float | None = None  # time.monotonic() when its last step was computed
    step_gap_s: float | None = None  # usual time from a step's answer to the arrival of the next step (average)
    pusher: str | None = None  # the peer the client named as its previous server: the only one allowed to push
    last_step_id: str | None = None
    last_output: runtime_pb2.ExpertResponse | None = None
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # (source, message) from the client and pushes
    answered: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # step id -> source
    pushes: object = None  # the PushSender of this session's outputs to the next server of its chain
    chain: object = None  # the SessionChain of the steps computed (their receipts sign its head)


class Action(enum.Enum):
    RUN = "run"  # compute the step
    SKIP = "skip"  # the other copy of a step already computed (or a stale push): no answer
    REPEAT = "repeat"  # the client sent its last step again: answer with the stored output, do not recompute


class SessionTable:
    """The sessions open on one server, by id."""

    def __init__(self):
        self._sessions: dict[str, Session] = {}
        self.steps_from_pushes = 0  # steps computed from a push before the client's copy arrived

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    @contextlib.contextmanager
    def open(self, opened: InferenceOpen, *, span, cache) -> Iterator[Session]:
        """Register a session for the duration of the ``with`` block; an id already in use is refused (and
        nothing is registered)."""
        if opened.session_id in self._sessions:
            raise InvalidRequestError(f"session id {opened.session_id!r} is already in use")
        session = Session(opened=opened, span=span, cache=cache)
        self._sessions[opened.session_id] = session
        try:
            yield session
        finally:
            del self._sessions[opened.session_id]
            session.cache = None

    def deliver_push(self, session_id: str, sender: str, message: runtime_pb2.ExpertRequest) -> None:
        """Queue a pushed step from peer ``sender``; refused unless the session's client named ``sender`` as the
        previous server."""
        session = self._sessions.get(session_id)
        if session is None:
            raise InvalidRequestError(f"no open session {session_id!r} on this server")
        if sender != session.pusher:
            raise InvalidRequestError(
                f"peer {sender} may not push into session {session_id!r}: the client did not name it as the "
                f"previous server"
            )
        session.inbox.put_nowait((PUSH, message))

    @staticmethod
    def decide(session: Session, step: InferenceStep, source: str) -> Action:
        """What to do with one copy of a step (InvalidRequestError for a repeat the server cannot answer)."""
        if source == CLIENT:
            session.pusher = step.pusher  # the client's latest word on who comes before this server
        if step.step_id in session.answered:
            first_source = session.answered[step.step_id]
            if source == PUSH or first_source == PUSH:
                session.answered[step.step_id] = CLIENT if source == CLIENT else first_source
                return Action.SKIP  # the other copy of a pushed step: it was computed and answered once
            if step.step_id == session.last_step_id and session.last_output is not None:
                return Action.REPEAT
            raise InvalidRequestError(f"step {step.step_id!r} was already processed")
        if source == PUSH and step.position != session.length:
            # a stale push (its step was already computed from the client's copy, or the client has since replaced
            # the pushing server and rewound): the client's own copy decides, a push must never break the session
            logger.debug("Ignoring a push at position %d (session at %d)", step.position, session.length)
            return Action.SKIP
        return Action.RUN

    def record(self, session: Session, step_id: str, source: str, response: runtime_pb2.ExpertResponse) -> None:
        """A step was computed from the ``source`` copy and answered with ``response``."""
        session.last_step_id, session.last_output = step_id, response
        session.answered[step_id] = source
        self.steps_from_pushes += source == PUSH
        while len(session.answered) > ANSWERED_HISTORY:
            session.answered.popitem(last=False)
