"""The session table of a block server: ids, who may push, and steps that arrive twice (client copy and push)."""

from __future__ import annotations

import pytest
from hivemind.proto import runtime_pb2

from corolla.errors import InvalidRequestError
from corolla.protocol.messages import InferenceOpen, InferenceStep
from corolla.server.sessions import CLIENT, PUSH, Action, SessionTable

OPEN = InferenceOpen(session_id="s1", max_length=16, start_block=0, end_block=2)
ANSWER = runtime_pb2.ExpertResponse(metadata=b"answer")


def _step(step_id: str, position: int = 0, pusher: str | None = None) -> InferenceStep:
    return InferenceStep(step_id=step_id, position=position, pusher=pusher)


def test_a_duplicate_id_is_refused_and_counted_nowhere():
    table = SessionTable()
    with table.open(OPEN, span=None, cache="cache") as session:
        assert len(table) == 1
        with pytest.raises(InvalidRequestError, match="session id 's1' is already in use"):
            with table.open(OPEN, span=None, cache="other"):
                pass
        assert len(table) == 1 and table.get("s1") is session and session.cache == "cache"
    assert len(table) == 0 and session.cache is None  # the cache is dropped with the session


def test_a_session_ends_whatever_way_its_block_exits():
    table = SessionTable()
    with pytest.raises(RuntimeError):
        with table.open(OPEN, span=None, cache="cache"):
            raise RuntimeError("the client vanished")
    assert len(table) == 0


def test_only_the_named_previous_server_may_push():
    table = SessionTable()
    message = runtime_pb2.ExpertRequest()
    with pytest.raises(InvalidRequestError, match="no open session 's1'"):
        table.deliver_push("s1", "A", message)
    with table.open(OPEN, span=None, cache=None) as session:
        with pytest.raises(InvalidRequestError, match="may not push"):
            table.deliver_push("s1", "A", message)  # the client named nobody yet
        table.decide(session, _step("1", pusher="A"), CLIENT)
        table.deliver_push("s1", "A", message)
        assert session.inbox.get_nowait() == (PUSH, message)
        with pytest.raises(InvalidRequestError, match="peer B may not push into session 's1'"):
            table.deliver_push("s1", "B", message)  # e.g. an earlier server of the chain that learned the id
        table.decide(session, _step("2", pusher="C"), CLIENT)  # the client replaced A by C
        with pytest.raises(InvalidRequestError, match="peer A may not push"):
            table.deliver_push("s1", "A", message)
        table.decide(session, _step("3", pusher="A"), PUSH)  # a push cannot name its own pusher
        assert session.pusher == "C"


def test_each_step_is_computed_once_whichever_copy_comes_first():
    table = SessionTable()
    with table.open(OPEN, span=None, cache=None) as session:
        # the push comes first: computed from it; the client's copy then needs no answer
        assert table.decide(session, _step("p", 0), PUSH) is Action.RUN
        session.length = 1
        table.record(session, "p", PUSH, ANSWER)
        assert table.decide(session, _step("p", 0), CLIENT) is Action.SKIP
        assert table.steps_from_pushes == 1
        # the client's copy comes first: the push that follows is skipped
        assert table.decide(session, _step("c", 1), CLIENT) is Action.RUN
        session.length = 2
        table.record(session, "c", CLIENT, ANSWER)
        assert table.decide(session, _step("c", 1), PUSH) is Action.SKIP
        # the client repeats its last step: answered again, not recomputed; an older repeat is refused
        assert table.decide(session, _step("c", 1), CLIENT) is Action.REPEAT
        assert table.decide(session, _step("d", 2), CLIENT) is Action.RUN
        session.length = 3
        table.record(session, "d", CLIENT, ANSWER)
        with pytest.raises(InvalidRequestError, match="step 'c' was already processed"):
            table.decide(session, _step("c", 1), CLIENT)
        # a stale push (for a position the session has moved past) never breaks the session
        assert table.decide(session, _step("late", 1), PUSH) is Action.SKIP
        # the client rewinds (a replay): computed again from the client's copy
        assert table.decide(session, _step("replay", 0), CLIENT) is Action.RUN
        assert table.steps_from_pushes == 1


def test_the_answered_history_is_bounded():
    from corolla.server.sessions import ANSWERED_HISTORY

    table = SessionTable()
    with table.open(OPEN, span=None, cache=None) as session:
        for i in range(3 * ANSWERED_HISTORY):
            table.record(session, str(i), CLIENT, ANSWER)
        assert len(session.answered) == ANSWERED_HISTORY
