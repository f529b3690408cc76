"""The RPC contracts of ``corolla.protocol.rpc`` over hivemind's libp2p transport: client calls and server handlers.

Every client call goes through a ``Transport`` object, so a test (or the hostile-server fixture) can wrap it to
inject faults (``corolla.net.faults``) instead of patching private methods.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from hivemind.p2p import P2P, PeerID

from corolla.errors import RemoteCallError
from corolla.protocol.rpc import Handler, MessageStream, Rpc, RpcContract


class P2PMessageStream:
    """A raw libp2p stream speaking hivemind's protobuf framing (the ``MessageStream`` of the real transport)."""

    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.peer_id, self._reader, self._writer = peer_id, reader, writer

    async def send(self, message) -> None:
        if self._writer is None:
            raise ConnectionError(f"the stream to {self.peer_id} is closed")
        await P2P.send_protobuf(message, self._writer)

    async def receive(self, response_type: type, timeout_s: float):
        try:
            response, error = await asyncio.wait_for(P2P.receive_protobuf(response_type, self._reader), timeout_s)
        except asyncio.IncompleteReadError:
            raise ConnectionError(f"server {self.peer_id} closed the stream") from None
        if error is not None:
            raise RemoteCallError(f"server {self.peer_id} refused the step: {error.message}")
        return response

    async def close(self) -> None:
        """End the stream politely (the server then frees what it holds for it at once)."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        try:
            await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        except Exception:  # the peer may be gone already: closing must not fail
            pass
        writer.close()


class P2PTransport:
    """``corolla.protocol.rpc.Transport`` over a hivemind ``P2P`` instance (peer ids as base58 strings)."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p

    async def call(self, peer_id: str, handle: str, request, response_type: type, *, timeout_s: float):
        call = self.p2p.call_protobuf_handler(PeerID.from_base58(peer_id), handle, request, response_type)
        return await asyncio.wait_for(call, timeout_s)

    async def iterate(self, peer_id: str, handle: str, requests: AsyncIterator, response_type: type) -> AsyncIterator:
        return await self.p2p.iterate_protobuf_handler(PeerID.from_base58(peer_id), handle, requests, response_type)

    async def open_stream(self, peer_id: str, handle: str, *, timeout_s: float) -> MessageStream:
        opening = self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handle)
        _, reader, writer = await asyncio.wait_for(opening, timeout_s)
        return P2PMessageStream(peer_id, reader, writer)


HandlerWrapper = Callable[[Rpc, Handler], Handler]
"""Wraps a server's handler of one RPC (e.g. ``corolla.net.faults.FaultPlan.wrap_handler``)."""


async def serve(p2p: P2P, contract: RpcContract, servicer, *, wrap: HandlerWrapper | None = None) -> None:
    """Register ``servicer.rpc_<name>`` for every RPC of ``contract`` on ``p2p``."""
    await asyncio.gather(
        *(
            p2p.add_protobuf_handler(
                contract.handle(rpc.name),
                _handler(servicer, rpc, wrap),
                rpc.request_type,
                stream_input=rpc.stream_input,
                stream_output=rpc.stream_output,
            )
            for rpc in contract.rpcs
        )
    )


async def unserve(p2p: P2P, contract: RpcContract) -> None:
    """Remove the handlers ``serve`` registered."""
    await asyncio.gather(
        *(
            p2p.remove_protobuf_handler(
                contract.handle(rpc.name), stream_input=rpc.stream_input, stream_output=rpc.stream_output
            )
            for rpc in contract.rpcs
        )
    )


def _handler(servicer, rpc: Rpc, wrap: HandlerWrapper | None) -> Handler:
    handler = getattr(servicer, f"rpc_{rpc.name}", None)
    if handler is None:
        raise TypeError(f"{type(servicer).__name__} does not implement rpc_{rpc.name}")
    return handler if wrap is None else wrap(rpc, handler)
