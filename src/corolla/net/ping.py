"""Round-trip times to peers, measured with the servers' cheap info RPC (no external service involved)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable

from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from corolla.log import get_logger
from corolla.protocol.messages import ServerStatus
from corolla.protocol.rpc import BLOCK_SERVER, RpcStub, Transport

logger = get_logger(__name__)


async def ping(transport: Transport, peer_id: PeerID | str, *, timeout_s: float) -> float:
    """Seconds for one info call to ``peer_id``; ``math.inf`` if it fails or takes longer than ``timeout_s``."""
    stub = RpcStub(transport, _base58(peer_id), BLOCK_SERVER)
    started = time.perf_counter()
    try:
        await stub.call("info", runtime_pb2.ExpertUID(), timeout_s=timeout_s)
    except Exception as e:
        logger.debug("Ping to %s failed: %s", peer_id, e)
        return math.inf
    return time.perf_counter() - started


async def server_status(transport: Transport, peer_id: PeerID | str, *, timeout_s: float) -> ServerStatus:
    """What a block server says about itself now (its info RPC): span, cache left, sessions, ... Raises on a
    failed call or an answer that is not a valid status."""
    stub = RpcStub(transport, _base58(peer_id), BLOCK_SERVER)
    response = await stub.call("info", runtime_pb2.ExpertUID(), timeout_s=timeout_s)
    return ServerStatus.model_validate(MSGPackSerializer.loads(response.serialized_info))


async def ping_many(transport: Transport, peer_ids: Iterable[PeerID | str], *, timeout_s: float) -> dict[str, float]:
    """RTT seconds by base58 peer id for every peer that answered."""
    peer_ids = [_base58(peer) for peer in peer_ids]
    rtts = await asyncio.gather(*(ping(transport, peer, timeout_s=timeout_s) for peer in peer_ids))
    return {peer: rtt for peer, rtt in zip(peer_ids, rtts) if math.isfinite(rtt)}


def _base58(peer_id: PeerID | str) -> str:
    return peer_id if isinstance(peer_id, str) else peer_id.to_base58()


class RttTracker:
    """Exponential moving average of RTTs per peer (the first sample is taken as is)."""

    def __init__(self, alpha: float = 0.3):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.rtts: dict[str, float] = {}

    def update(self, samples: dict[str, float]) -> None:
        for peer, rtt in samples.items():
            old = self.rtts.get(peer)
            self.rtts[peer] = rtt if old is None else (1 - self.alpha) * old + self.alpha * rtt

    def snapshot(self, limit: int | None = None) -> dict[str, float]:
        """The tracked RTTs, fastest first, at most ``limit`` of them."""
        ordered = sorted(self.rtts.items(), key=lambda item: (item[1], item[0]))
        return dict(ordered[:limit] if limit is not None else ordered)
