"""Calls forwarded by a relay to a peer nobody can dial (real hivemind P2P daemons on loopback).

The target listens on no address: it only connects out, to the relay, like a server behind NAT. Each kind of call
moves far more than the 128 KiB after which p2pd's libp2p circuits are reset, so it can only have gone through the
forwarder, whose counters confirm it."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P, P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from corolla.net.forwarding import (
    FORWARD_STREAM,
    FORWARD_UNARY,
    ForwardingError,
    ForwardingService,
    open_forwarded_stream,
)
from corolla.net.transport import P2PTransport

pytestmark = pytest.mark.timeout(120)

UNARY, STREAMED, RAW = "corolla/test/v1/echo", "corolla/test/v1/echo_stream", "corolla/test/v1/raw"
BIG = 600_000  # bytes per message: past the circuit's budget several times over in every test


def _request(size: int, tag: str = "") -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid=tag, metadata=bytes(range(256)) * (size // 256))


async def _echo(request, context):
    if request.uid == "fail":
        raise ValueError("the handler refused this request")
    return runtime_pb2.ExpertResponse(metadata=request.metadata[::-1])


async def _echo_stream(requests, context):
    async for request in requests:
        yield runtime_pb2.ExpertResponse(metadata=request.metadata[::-1])


async def _raw(info, reader, writer):
    """A raw stream handler (as inference sessions use): answers each message until the caller ends."""
    while True:
        try:
            request, _ = await P2P.receive_protobuf(runtime_pb2.ExpertRequest, reader)
        except asyncio.IncompleteReadError:
            return
        if request is None:  # end of stream
            return
        await P2P.send_protobuf(runtime_pb2.ExpertResponse(metadata=request.metadata[:64]), writer)


class Swarm:
    """A relay with a forwarder, a target that only connects out (to the relay), and a caller."""

    async def __aenter__(self) -> Swarm:
        self.relay = await P2P.create(force_reachability="public")
        self.forwarder = ForwardingService(self.relay)
        await self.forwarder.start()
        relay_addrs = [str(a) for a in await self.relay.get_visible_maddrs()]
        self.target = await P2P.create(initial_peers=relay_addrs, host_maddrs=(), no_listen=True, dht_mode="client")
        await self.target.add_protobuf_handler(UNARY, _echo, runtime_pb2.ExpertRequest)
        await self.target.add_protobuf_handler(
            STREAMED, _echo_stream, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        await self.target.add_binary_stream_handler(RAW, _raw)
        self.caller = await P2P.create(initial_peers=relay_addrs, dht_mode="client")
        self.target_id = self.target.peer_id.to_base58()
        self.circuits = [f"{relay_addrs[0]}/p2p-circuit"]
        self.transport = P2PTransport(
            self.caller, relay_addrs=lambda peer: tuple(self.circuits) if peer == self.target_id else ()
        )
        self.others: list[P2P] = []

        async def target_connected() -> None:  # it dials the relay as it starts: wait until the relay sees it
            while not any(i.peer_id == self.target.peer_id for i in await self.relay.list_peers()):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(target_connected(), 30)
        return self

    async def __aexit__(self, *exc) -> None:
        for p2p in (self.caller, self.target, self.relay, *self.others):
            await p2p.shutdown()


def test_unary_streamed_and_raw_calls_are_forwarded_past_the_circuit_budget():
    async def scenario():
        async with Swarm() as swarm:
            transport, target = swarm.transport, swarm.target_id
            request = _request(BIG)
            response = await transport.call(target, UNARY, request, runtime_pb2.ExpertResponse, timeout_s=30)
            assert response.metadata == request.metadata[::-1]
            assert swarm.forwarder.forwarded_calls == 1

            with pytest.raises(P2PHandlerError, match="the handler refused this request"):  # as from a direct call
                await transport.call(target, UNARY, _request(10, "fail"), runtime_pb2.ExpertResponse, timeout_s=30)

            async def requests():
                for size in (BIG, 100, BIG):
                    yield _request(size)

            responses = await transport.iterate(target, STREAMED, requests(), runtime_pb2.ExpertResponse)
            sizes = [len(r.metadata) async for r in responses]
            assert sizes == [len(_request(s).metadata) for s in (BIG, 100, BIG)]

            stream = await transport.open_stream(target, RAW, timeout_s=30)
            for i in range(40):  # an inference session: one stream, many steps, 40 x 20 KB each way
                await stream.send(_request(20_000, str(i)))
                answer = await stream.receive(runtime_pb2.ExpertResponse, timeout_s=30)
                assert answer.metadata == _request(20_000).metadata[:64]
            await stream.close()
            assert swarm.forwarder.forwarded_streams == 2

    asyncio.run(scenario())


def test_the_forwarder_refuses_bad_requests_alone_and_keeps_serving():
    """Foreign handles, peers not connected to it (it never dials for a caller), garbage: each gets an error that
    says what was wrong, and the next good call is forwarded."""

    async def scenario():
        async with Swarm() as swarm:
            relay, caller = swarm.relay.peer_id, swarm.caller

            async def unary(body) -> dict:
                message = runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(body))
                answer = await caller.call_protobuf_handler(relay, FORWARD_UNARY, message, runtime_pb2.ExpertInfo)
                return MSGPackSerializer.loads(answer.serialized_info)

            assert (
                "only corolla/... handles"
                in (await unary({"peer": swarm.target_id, "handle": "/ipfs/id/1.0.0"}))["error"]
            )
            assert "not a peer id" in (await unary({"peer": "xyz", "handle": UNARY}))["error"]
            assert "'data'" in (await unary({"peer": swarm.target_id, "handle": UNARY, "data": 5}))["error"]
            assert "must be a map" in (await unary([1, 2]))["error"]
            answer = await unary({"peer": relay.to_base58(), "handle": UNARY, "data": b""})
            assert "not connected to this forwarder" in answer["error"]  # the relay has no connection to itself

            _, reader, writer = await caller.call_binary_stream_handler(relay, FORWARD_STREAM)
            writer.write(b"\x00garbage that claims a message of petabytes")
            await writer.drain()
            reply, _ = await P2P.receive_protobuf(runtime_pb2.ExpertInfo, reader)
            assert "at most 4096 bytes" in MSGPackSerializer.loads(reply.serialized_info)["error"]
            writer.close()

            with pytest.raises(ForwardingError, match="not connected"):
                await open_forwarded_stream(caller, relay, relay, RAW)

            request = _request(BIG)
            response = await swarm.transport.call(
                swarm.target_id, UNARY, request, runtime_pb2.ExpertResponse, timeout_s=30
            )
            assert response.metadata == request.metadata[::-1]

    asyncio.run(scenario())


def test_relays_that_cannot_be_dialed_or_do_not_forward_are_passed_over():
    """The target's record lists a relay that is gone and one that does not serve forwarding before the one that
    does: the calls go through the third, and the one that does not forward is not asked again for a while."""

    async def scenario():
        async with Swarm() as swarm:
            gone = await P2P.create()
            gone_addr = f"{(await gone.get_visible_maddrs())[0]}/p2p-circuit"
            await gone.shutdown()
            plain = await P2P.create()  # a libp2p relay that does not forward calls
            swarm.others.append(plain)
            plain_addr = f"{(await plain.get_visible_maddrs())[0]}/p2p-circuit"
            swarm.circuits[:0] = [gone_addr, plain_addr]
            request = _request(BIG)
            response = await swarm.transport.call(
                swarm.target_id, UNARY, request, runtime_pb2.ExpertResponse, timeout_s=60
            )
            assert response.metadata == request.metadata[::-1]
            assert plain.peer_id in swarm.transport._not_forwarding
            swarm.transport._not_forwarding.clear()  # the stream goes through the same relays in the same order
            swarm.transport._good_forwarder.clear()
            stream = await swarm.transport.open_stream(swarm.target_id, RAW, timeout_s=60)
            await stream.send(request)
            answer = await stream.receive(runtime_pb2.ExpertResponse, timeout_s=30)
            await stream.close()
            assert answer.metadata == request.metadata[:64]
            assert swarm.forwarder.forwarded_calls == 1 and swarm.forwarder.forwarded_streams == 1
            assert plain.peer_id in swarm.transport._not_forwarding

    asyncio.run(scenario())
