"""Backups of a stage's state without a network: which stage a peer copies, whose copy refills a stage, and the
``state`` RPC (answered from the served stage or the copy; bad requests fail alone with a message)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from hivemind.proto import runtime_pb2

from corolla.errors import InvalidRequestError
from corolla.net.tensors import combine_chunks, pack, unpack_metadata, unpack_tensors
from corolla.protocol.records import PeerState, StagePeerInfo
from corolla.protocol.stage_messages import StageStateRequest
from corolla.training.stage_backup import BackupKeeper, backup_target, download_stage_state, newest_backups
from corolla.training.stage_handler import StageHandler
from corolla.training.stage_worker import TrainingState


def _info(stage: int, *, state=PeerState.ONLINE, backup_of=None, backup_epoch=None) -> StagePeerInfo:
    return StagePeerInfo(
        experiment="exp", stage=stage, state=state, throughput_sps=1.0, backup_of=backup_of, backup_epoch=backup_epoch
    )


def test_each_stage_is_copied_by_the_stage_before_it():
    assert [backup_target(s, 3) for s in range(3)] == [1, 2, 0]
    assert backup_target(0, 2) == 1 and backup_target(1, 2) == 0
    assert backup_target(0, 1) is None  # a single stage: nobody else could refill it


def test_the_newest_copy_of_an_online_peer_comes_first():
    records = [
        [("a", _info(0, backup_of=1, backup_epoch=3)), ("b", _info(0, backup_of=1, backup_epoch=5))],
        [("c", _info(1, backup_of=2, backup_epoch=9))],
        [
            ("d", _info(2, backup_of=1, backup_epoch=7, state=PeerState.OFFLINE)),  # left: it keeps nothing now
            ("e", _info(2, backup_of=1, backup_epoch=4, state=PeerState.JOINING)),
            ("f", _info(2)),
        ],
    ]
    assert newest_backups(records, 1) == [("b", 5), ("a", 3)]
    assert newest_backups(records, 2) == [("c", 9)]
    assert newest_backups(records, 0) == []


def _state(epoch: int, value: float = 1.0) -> TrainingState:
    return TrainingState(epoch=epoch, optimizer_steps=epoch, tensors=[torch.full((2, 3), value), torch.zeros(3)])


class _Transport:
    """Answers the ``state_stream`` RPC from a dict peer -> state (a missing peer: ConnectionError); a peer in
    ``cut`` ends its answer after that many messages, as a peer killed mid-answer does."""

    def __init__(self, states: dict[str, TrainingState], cut: dict[str, int] | None = None):
        self.states, self.asked, self.cut = states, [], cut or {}

    async def iterate(self, peer_id, handle, requests, response_type):
        self.asked.append(peer_id)
        request = runtime_pb2.ExpertRequest(metadata=(await anext(aiter(requests))).metadata)
        if peer_id not in self.states:
            raise ConnectionError(f"{peer_id} is gone")
        handler = StageHandler(
            experiment="exp", current=lambda: None, executor=None, max_request_samples=1, status=None,
            state_of=lambda stage: _as_coroutine((self.states[peer_id], False)),
        )  # fmt: skip
        replies = handler.rpc_state_stream(_one(request), None)
        return replies if peer_id not in self.cut else _first(replies, self.cut[peer_id])


async def _first(messages, count: int):
    async for message in messages:
        if count <= 0:
            return
        count -= 1
        yield message


async def _as_coroutine(value):
    return value


async def _one(message):
    yield message


def test_a_keeper_copies_the_next_stage_and_keeps_its_copy_when_that_stage_empties():
    import random

    transport = _Transport({"b": _state(4, 2.0)})
    keeper = BackupKeeper(transport, experiment="exp", num_stages=2, timeout_s=5)
    assert asyncio.run(keeper.refresh([[], [("b", _info(1))]], 0, random.Random(0)))
    assert (
        keeper.stage == 1 and keeper.epoch == 4 and torch.equal(keeper.copy_of(1).tensors[0], torch.full((2, 3), 2.0))
    )
    assert keeper.copy_of(0) is None
    assert not asyncio.run(keeper.refresh([[], []], 0, random.Random(0)))  # stage 1 is empty now
    assert keeper.epoch == 4  # the copy that can refill it
    asyncio.run(keeper.refresh([[], []], 1, random.Random(0)))  # this peer moved to stage 1: it copies stage 0 now
    assert keeper.stage == 0 and keeper.state is None


def test_an_emptied_stage_is_restored_from_the_newest_copy_that_downloads():
    transport = _Transport({"old": _state(2), "new": _state(6)})  # "newest" is gone
    keeper = BackupKeeper(transport, experiment="exp", num_stages=3, timeout_s=5)
    records = [
        [("old", _info(0, backup_of=1, backup_epoch=2))],
        [],
        [("newest", _info(2, backup_of=1, backup_epoch=8)), ("new", _info(2, backup_of=1, backup_epoch=6))],
    ]
    errors = []
    state, source = asyncio.run(keeper.restore(records, 1, lambda peer, e: errors.append((peer, str(e)))))
    assert state.epoch == 6 and source == "the copy kept by new"
    assert transport.asked == ["newest", "new"] and errors == [("newest", "newest is gone")]
    keeper.stage, keeper.state = 1, _state(7)  # this peer's own copy is newer than every one it can download
    assert asyncio.run(keeper.restore(records, 1, lambda *_: None))[1] == "this peer's own copy"
    assert asyncio.run(keeper.restore([[], [], []], 2, lambda *_: None)) is None


def test_a_state_cut_short_never_replaces_a_copy():
    """A peer killed while it answers ends the stream early, at a tensor boundary: the download must fail (the
    reply says how many tensors follow) and the keeper must keep its older copy."""
    transport = _Transport({"b": _state(4, 2.0), "c": _state(5, 3.0)}, cut={"c": 1})  # c's stream: one tensor
    keeper = BackupKeeper(transport, experiment="exp", num_stages=2, timeout_s=5)
    records = [[], [("b", _info(1))]]
    assert asyncio.run(keeper.refresh(records, 0, random.Random(0)))
    with pytest.raises(ValueError, match="sent 1 of the state's 2 tensors"):
        asyncio.run(download_stage_state(transport, "c", experiment="exp", stage=1, timeout_s=5))
    with pytest.raises(ValueError, match="sent 1 of the state's 2 tensors"):  # the refresh fails (and is retried)
        asyncio.run(keeper.refresh([[], [("c", _info(1))]], 0, random.Random(0)))
    assert keeper.epoch == 4 and torch.equal(keeper.copy_of(1).tensors[0], torch.full((2, 3), 2.0))


async def _ask(handler: StageHandler, request) -> runtime_pb2.ExpertResponse:
    replies = [m async for m in handler.rpc_state_stream(_one(request), None)]
    return runtime_pb2.ExpertResponse(
        metadata=replies[0].metadata, tensors=combine_chunks([t for r in replies for t in r.tensors])
    )


def _state_handler() -> StageHandler:
    async def state_of(stage: int):
        if stage == 0:
            return _state(3), False
        if stage == 2:
            return _state(1), True
        raise InvalidRequestError(f"this peer neither serves stage {stage} nor keeps a copy of its state")

    return StageHandler(
        experiment="exp", current=lambda: None, executor=None, max_request_samples=1, status=None, state_of=state_of
    )


def test_the_state_rpc_answers_from_the_stage_or_the_copy():
    handler = _state_handler()
    for stage, epoch, backup in [(0, 3, False), (2, 1, True)]:
        response = asyncio.run(_ask(handler, pack([], StageStateRequest(experiment="exp", stage=stage).model_dump())))
        meta = unpack_metadata(response)
        assert (meta["stage"], meta["epoch"], meta["from_backup"]) == (stage, epoch, backup)
        assert [t.shape for t in unpack_tensors(response)] == [(2, 3), (3,)]


@pytest.mark.parametrize(
    ("tensors", "meta", "message"),
    [
        ([], {"stage": 1}, "neither serves stage 1 nor keeps a copy"),
        ([], {"experiment": "other"}, "trains experiment 'exp', not 'other'"),
        ([], {"stage": -1}, "malformed state request"),
        ([torch.zeros(2)], {}, "carries no tensors"),
        ([], {"protocol_version": 0}, "speaks corolla protocol 0"),
    ],
    ids=["no-such-state", "wrong-experiment", "negative-stage", "tensors", "old-protocol"],
)
def test_bad_state_requests_fail_alone_with_a_message(tensors, meta, message):
    handler = _state_handler()
    fields = dict(experiment="exp", stage=0) | meta
    request = pack(tensors, StageStateRequest.model_construct(**fields).model_dump())
    with pytest.raises(InvalidRequestError, match=message):
        asyncio.run(_ask(handler, request))
    ok = asyncio.run(_ask(handler, pack([], StageStateRequest(experiment="exp", stage=0).model_dump())))
    assert unpack_metadata(ok)["epoch"] == 3  # and the next request is served
