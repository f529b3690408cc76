"""Ask stage peers how they are (the ``info`` RPC): epoch, accumulated samples, a digest of their parameters."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from corolla.protocol.rpc import STAGE_PEER, RpcStub, Transport
from corolla.protocol.stage_messages import StagePeerStatus


async def stage_peer_status(transport: Transport, peer_id: str, *, timeout_s: float = 5.0) -> StagePeerStatus:
    """One peer's status; TimeoutError or the remote error if it does not answer."""
    response = await RpcStub(transport, peer_id, STAGE_PEER).call("info", runtime_pb2.ExpertUID(), timeout_s=timeout_s)
    return StagePeerStatus.model_validate(MSGPackSerializer.loads(response.serialized_info))


def stage_peer_statuses(
    initial_peers: Sequence[str], peer_ids: Sequence[str], *, timeout_s: float = 5.0
) -> dict[str, StagePeerStatus | Exception]:
    """Each peer's status (or the error asking it), from a throwaway client peer of the swarm."""
    from corolla.net.dht_process import client_dht
    from corolla.net.transport import P2PTransport

    async def ask() -> dict:
        dht = await asyncio.to_thread(client_dht, list(initial_peers))
        try:
            transport = P2PTransport(await dht.replicate_p2p())
            answers = await asyncio.gather(
                *(stage_peer_status(transport, p, timeout_s=timeout_s) for p in peer_ids), return_exceptions=True
            )
            return dict(zip(peer_ids, answers))
        finally:
            await asyncio.to_thread(dht.shutdown)

    return asyncio.run(ask())
