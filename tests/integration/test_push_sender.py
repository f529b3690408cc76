"""PushSender over real hivemind P2P daemons on loopback: pushes travel in order on one stream per next server, a
re-route ends the old stream, and a server without push streams (an older version) gets unary pushes."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from corolla.net.transport import P2PTransport
from corolla.protocol.rpc import BLOCK_SERVER
from corolla.server.push_sender import PushSender


class Receiver:
    """A peer that records what is pushed to it: over push streams (unless ``streams`` is off) and unary pushes."""

    def __init__(self, p2p: P2P):
        self.p2p, self.got, self.ended, self.changed = p2p, [], 0, asyncio.Event()

    @classmethod
    async def start(cls, initial_peers, *, streams: bool = True) -> Receiver:
        receiver = cls(await P2P.create(initial_peers=initial_peers))
        if streams:
            await receiver.p2p.add_protobuf_handler(
                BLOCK_SERVER.handle("push_stream"), receiver.stream, runtime_pb2.ExpertRequest,
                stream_input=True, stream_output=True,
            )  # fmt: skip
        await receiver.p2p.add_protobuf_handler(BLOCK_SERVER.handle("push"), receiver.unary, runtime_pb2.ExpertRequest)
        return receiver

    def _note(self, kind: str, request) -> None:
        self.got.append((kind, request.metadata.decode()))
        self.changed.set()

    async def stream(self, requests, context):
        async for request in requests:
            self._note("stream", request)
        self.ended += 1
        self.changed.set()
        return
        yield

    async def unary(self, request, context):
        self._note("unary", request)
        return runtime_pb2.ExpertResponse()

    async def until(self, predicate, timeout_s: float = 10) -> None:
        async def wait():
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout_s)


def _request(text: str) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(metadata=text.encode())


@pytest.mark.timeout(90)
def test_pushes_go_in_order_on_one_stream_switch_with_the_route_and_fall_back_to_unary_calls():
    async def scenario():
        sender_p2p = await P2P.create()
        peers = [str(addr) for addr in await sender_p2p.get_visible_maddrs()]
        first, second = await Receiver.start(peers), await Receiver.start(peers)
        old = await Receiver.start(peers, streams=False)
        try:
            pushes = PushSender(P2PTransport(sender_p2p), timeout_s=10)
            target = first.p2p.peer_id.to_base58()
            for i in range(5):  # the first ones wait for the stream to open, the later ones are written at once
                pushes.push(target, _request(f"a{i}"))
            await first.until(lambda: len(first.got) == 5)
            pushes.push(target, _request("a5"))
            await first.until(lambda: len(first.got) == 6)
            assert first.got == [("stream", f"a{i}") for i in range(6)]

            pushes.push(second.p2p.peer_id.to_base58(), _request("b0"))  # the client re-routed the chain
            await second.until(lambda: second.got == [("stream", "b0")])
            await first.until(lambda: first.ended == 1)  # the stream to the server no longer pushed to ended

            pushes.push(old.p2p.peer_id.to_base58(), _request("c0"))
            pushes.push(old.p2p.peer_id.to_base58(), _request("c1"))
            await old.until(lambda: len(old.got) == 2)
            assert sorted(old.got) == [("unary", "c0"), ("unary", "c1")]

            await pushes.close()
        finally:
            for p2p in (sender_p2p, first.p2p, second.p2p, old.p2p):
                await p2p.shutdown()

    asyncio.run(scenario())
