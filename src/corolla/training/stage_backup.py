"""Copies of a stage's training state kept by peers of another stage, so that a stage whose every peer is gone
does not lose its training.

Every stage peer keeps a copy of the *next* stage's state (stage ``(k + 1) % S`` for a peer of stage ``k``),
refreshed every ``--backup-period-s`` from that stage's most advanced peer over the ``state`` RPC, and says so in its
record (``backup_of``, ``backup_epoch``). A peer that takes over an emptied stage downloads the newest copy from
the peers that keep one. It loses at most a backup period of that stage's training, instead of all of it.

The price: each peer holds one more stage's parameters and both AdamW moments in memory, and sends or receives one
stage state per period.
"""

from __future__ import annotations

import asyncio

from hivemind.proto import runtime_pb2
from pydantic import ValidationError

from corolla.errors import InvalidRequestError
from corolla.net.streaming import streamed_tensors_call
from corolla.net.tensors import pack, unpack_metadata
from corolla.protocol.records import PeerState, StagePeerInfo
from corolla.protocol.rpc import STAGE_PEER, RpcStub, Transport
from corolla.protocol.stage_messages import StageStateReply, StageStateRequest
from corolla.training.stage_worker import TrainingState


def backup_target(stage: int, num_stages: int) -> int | None:
    """The stage whose state a peer of ``stage`` keeps a copy of (None with a single stage: nobody to refill it)."""
    return None if num_stages < 2 else (stage + 1) % num_stages


def newest_backups(records: list[list[tuple[object, StagePeerInfo]]], stage: int) -> list[tuple[object, int]]:
    """(peer, epoch) of the online peers that keep a copy of ``stage``, newest copy first."""
    holders = [
        (peer, info.backup_epoch)
        for found in records
        for peer, info in found
        if info.state == PeerState.ONLINE and info.backup_of == stage and info.backup_epoch is not None
    ]
    return sorted(holders, key=lambda holder: -holder[1])


async def download_stage_state(
    transport: Transport, peer_id: str, *, experiment: str, stage: int, timeout_s: float
) -> tuple[TrainingState, StageStateReply]:
    """A stage's state from a peer that serves it or keeps a copy of it; raises on a failed or malformed answer."""
    request = pack([], StageStateRequest(experiment=experiment, stage=stage).model_dump())
    stub = RpcStub(transport, peer_id, STAGE_PEER)
    try:
        metadata, tensors = await asyncio.wait_for(streamed_tensors_call(stub, "state_stream", request), timeout_s)
        reply = StageStateReply.model_validate(unpack_metadata(runtime_pb2.ExpertResponse(metadata=metadata)))
    except (ValueError, ValidationError) as e:
        raise ValueError(f"peer {peer_id} sent a malformed state: {' '.join(str(e).split())}") from None
    if reply.stage != stage:
        raise ValueError(f"peer {peer_id} sent the state of stage {reply.stage}, not of stage {stage}")
    if reply.num_tensors is not None and len(tensors) != reply.num_tensors:
        # a peer that dies mid-answer can end the stream early: a partial state must never replace a copy
        raise ValueError(f"peer {peer_id} sent {len(tensors)} of the state's {reply.num_tensors} tensors")
    if not all(t.is_floating_point() for t in tensors):
        raise ValueError(f"peer {peer_id} sent a state with non-float tensors")
    tensors = [t.float() for t in tensors]
    return TrainingState(epoch=reply.epoch, optimizer_steps=reply.optimizer_steps, tensors=tensors), reply


def parse_state_request(request, experiment: str) -> StageStateRequest:
    """The ``state`` RPC's request, checked (InvalidRequestError on a malformed one or another experiment)."""
    try:
        meta = StageStateRequest.model_validate(unpack_metadata(request))
    except (ValueError, ValidationError) as e:
        raise InvalidRequestError(f"malformed state request: {' '.join(str(e).split())}") from None
    if request.tensors:
        raise InvalidRequestError(f"a state request carries no tensors, got {len(request.tensors)}")
    if meta.experiment != experiment:
        raise InvalidRequestError(f"this peer trains experiment {experiment!r}, not {meta.experiment!r}")
    return meta


class BackupKeeper:
    """One peer's copy of another stage's state: refreshed by ``refresh``, handed out by ``copy_of`` (the ``state``
    RPC) and used by ``restore`` when this peer refills an emptied stage."""

    def __init__(self, transport: Transport, *, experiment: str, num_stages: int, timeout_s: float):
        self.transport, self.experiment, self.num_stages, self.timeout_s = transport, experiment, num_stages, timeout_s
        self.stage: int | None = None  # the stage the copy is of
        self.state: TrainingState | None = None

    @property
    def epoch(self) -> int | None:
        return None if self.state is None else self.state.epoch

    def copy_of(self, stage: int) -> TrainingState | None:
        return self.state if self.stage == stage else None

    async def refresh(self, records: list[list[tuple[object, StagePeerInfo]]], serving: int, rng) -> bool:
        """Copy the state of the stage after ``serving`` from one of its online peers (``rng`` picks which); False
        if it has none (the old copy is kept: it is what would refill that stage). Raises if the download fails."""
        target = backup_target(serving, self.num_stages)
        if target != self.stage:  # this peer moved: a copy of its old target is no use to anyone now
            self.stage, self.state = target, None
        if target is None:
            return False
        peers = [peer for peer, info in records[target] if info.state == PeerState.ONLINE]
        if not peers:
            return False
        state, _ = await download_stage_state(
            self.transport, str(rng.choice(peers)), experiment=self.experiment, stage=target, timeout_s=self.timeout_s
        )
        if self.state is None or state.epoch >= self.state.epoch:
            self.state = state
        return True

    async def restore(
        self, records: list[list[tuple[object, StagePeerInfo]]], stage: int, on_error
    ) -> tuple[TrainingState, str] | None:
        """The newest copy of ``stage`` (this peer's own, or one downloaded from a peer that keeps one) and where it
        came from; None if nobody keeps one. ``on_error(peer, exception)`` hears of each failed download."""
        own = self.copy_of(stage)
        for peer, epoch in newest_backups(records, stage):
            if own is not None and own.epoch >= epoch:
                break
            try:
                state, _ = await download_stage_state(
                    self.transport, str(peer), experiment=self.experiment, stage=stage, timeout_s=self.timeout_s
                )
            except Exception as e:  # the next holder, or none
                on_error(peer, e)
                continue
            return state, f"the copy kept by {peer}"
        return (own, "this peer's own copy") if own is not None else None
