"""The RPC contracts of ``corolla.protocol.rpc`` over hivemind's libp2p transport: client calls and server handlers.

Every client call goes through a ``Transport`` object, so a test (or the hostile-server fixture) can wrap it to
inject faults (``corolla.net.faults``) instead of patching private methods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from hivemind.p2p import P2P, P2PDaemonError, PeerID

from corolla.errors import RemoteCallError
from corolla.log import get_logger
from corolla.net.forwarding import ForwardingError, forwarded_unary_call, iterate_stream, open_forwarded_stream
from corolla.net.reachability import connect_through_relays, relay_of
from corolla.protocol.rpc import Handler, MessageStream, Rpc, RpcContract

logger = get_logger(__name__)

T = TypeVar("T")

RELAY_DIAL_TIMEOUT_S = 10.0
NOT_FORWARDING_S = 300.0  # a relay that does not serve forwarding is not asked again for this long


class _RelayPassedOver(Exception):
    """A forwarded call did not reach its target through this relay (another relay may try)."""

    def __init__(self, message: str, *, unsupported: bool = False):
        super().__init__(message)
        self.unsupported = unsupported


class P2PMessageStream:
    """A raw libp2p stream speaking hivemind's protobuf framing (the ``MessageStream`` of the real transport)."""

    def __init__(
        self,
        peer_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_broken: Callable[[], None] | None = None,
    ):
        """``on_broken``: called when the stream breaks (its connection may be dead)."""
        self.peer_id, self._reader, self._writer, self._on_broken = peer_id, reader, writer, on_broken

    async def send(self, message) -> None:
        self.write(message)
        await self.drain()

    def write(self, message) -> None:
        """Queue ``message`` on the stream now, without waiting for room (``drain`` waits): in hivemind's framing,
        as one write (one system call when the socket has room, where ``P2P.send_protobuf`` makes three)."""
        if self._writer is None:
            raise ConnectionError(f"the stream to {self.peer_id} is closed")
        data = message.SerializeToString()
        self._writer.write(P2P.MESSAGE_MARKER + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data)

    async def drain(self) -> None:
        """Wait until the written messages have room in the transport's buffers."""
        if self._writer is None:
            raise ConnectionError(f"the stream to {self.peer_id} is closed")
        await self._writer.drain()

    async def receive(self, response_type: type, timeout_s: float):
        try:
            async with asyncio.timeout(timeout_s):  # no task per message, unlike wait_for
                response, error = await P2P.receive_protobuf(response_type, self._reader)
        except asyncio.IncompleteReadError:
            if self._on_broken is not None:
                self._on_broken()
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
    """``corolla.protocol.rpc.Transport`` over a hivemind ``P2P`` instance (peer ids as base58 strings).

    ``relay_addrs(peer_id)``: the relay addresses a peer behind NAT announced (its DHT record). Calls to such a peer
    are forwarded by its relays (``corolla.net.forwarding``: libp2p's own circuits are cut after 128 KiB); a relay
    that does not forward is used as a libp2p circuit, connected before the first call, so reaching the peer does
    not depend on libp2p finding its relays by itself.
    """

    def __init__(self, p2p: P2P, *, relay_addrs: Callable[[str], tuple[str, ...]] | None = None):
        self.p2p, self._relay_addrs = p2p, relay_addrs
        self._good_relay: dict[str, str] = {}  # peer id -> the relay address that worked last
        self._good_forwarder: dict[str, PeerID] = {}  # peer id -> the relay that forwarded its last call
        self._broken: set[str] = set()  # peers whose last call or stream broke: reconnect them (if relayed)
        self._warned_circuits: set[str] = set()
        self._not_forwarding: dict[PeerID, float] = {}  # relay -> until when it is not asked to forward

    def _forwarders(self, peer_id: str) -> list[tuple[PeerID, str]]:
        """The relays of a peer behind NAT (peer id, direct address), the one that forwarded last first."""
        addrs = self._relay_addrs(peer_id) if self._relay_addrs is not None else ()
        relays = [relay for relay in map(relay_of, addrs) if relay is not None]
        good = self._good_forwarder.get(peer_id)
        relays.sort(key=lambda relay: relay[0] != good)
        return relays

    async def _forwarded(self, peer_id: str, action: Callable[[PeerID, PeerID], Awaitable[T]]) -> T | None:
        """``action(relay, peer)`` through the first of the peer's relays that forwards it; None if none did (the
        caller then uses libp2p circuits). A relay is passed over only when the call cannot have reached the peer
        through it (it could not be dialed, does not forward, or could not reach the peer); any other failure
        propagates (the target's error reply as P2PHandlerError, a broken call as ConnectionError), so a call is
        never run twice by the target."""
        now = time.monotonic()
        forwarders = [r for r in self._forwarders(peer_id) if self._not_forwarding.get(r[0], 0.0) <= now]
        if not forwarders:
            return None
        peer, errors = PeerID.from_base58(peer_id), []
        for relay, direct in forwarders:
            try:
                result = await self._through(relay, direct, peer, action)
            except _RelayPassedOver as e:
                errors.append(f"{relay}: {e}")
                if self._good_forwarder.get(peer_id) == relay:
                    del self._good_forwarder[peer_id]
                if e.unsupported:
                    self._not_forwarding[relay] = time.monotonic() + NOT_FORWARDING_S
                continue
            self._good_forwarder[peer_id] = relay
            return result
        if peer_id not in self._warned_circuits:
            self._warned_circuits.add(peer_id)
            logger.warning(
                "No relay forwarded a call to %s (%s); trying libp2p circuits, which p2pd's relays cut after 128 KiB",
                peer_id,
                "; ".join(errors)[:500],
            )
        return None

    async def _through(self, relay: PeerID, direct: str, peer: PeerID, action) -> T:
        for attempt in range(2):
            if attempt:  # the relay may not be connected yet: dial it, then try once more
                try:
                    await asyncio.wait_for(connect_through_relays(self.p2p, relay, [direct]), RELAY_DIAL_TIMEOUT_S)
                except Exception as e:
                    raise _RelayPassedOver(f"could not dial the relay ({type(e).__name__}: {e})") from None
            try:
                return await action(relay, peer)
            except ForwardingError as e:
                if e.sent:
                    raise
                raise _RelayPassedOver(str(e), unsupported="did not forward" in str(e)) from None
            except TimeoutError:  # only opening a forwarded stream has its own timeout: nothing reached the peer
                raise _RelayPassedOver("the relay did not answer in time") from None
            except P2PDaemonError as e:  # the daemon could not open the stream or call to the relay
                if "protocol" in str(e).lower():
                    raise _RelayPassedOver(f"the relay does not forward ({e})", unsupported=True) from None
                last = e
        raise _RelayPassedOver(f"{type(last).__name__}: {last}")

    async def _reach(self, peer_id: str, timeout_s: float) -> PeerID:
        """The peer's id, connected through one of its relays first if it announced any and no connection is open
        (p2pd would open another circuit for each connect, and a new circuit closes the streams of the old one);
        one relay at a time, the last good one first."""
        peer = PeerID.from_base58(peer_id)
        addrs = list(self._relay_addrs(peer_id)) if self._relay_addrs is not None else []
        if not addrs:
            return peer
        if peer_id in self._broken:  # a relayed connection that broke may still be listed: drop it, dial again
            self._broken.discard(peer_id)
            try:
                await asyncio.wait_for(self.p2p._client.disconnect(peer), timeout_s)
            except Exception:
                pass
        elif any(info.peer_id == peer for info in await self.p2p.list_peers()):
            return peer
        good = self._good_relay.get(peer_id)
        addrs.sort(key=lambda addr: addr != good)
        error: Exception | None = None
        for addr in addrs:
            try:
                await asyncio.wait_for(connect_through_relays(self.p2p, peer, [addr]), timeout_s)
            except Exception as e:
                error = e
                continue
            self._good_relay[peer_id] = addr
            return peer
        raise ConnectionError(f"could not reach {peer_id} through any of its {len(addrs)} relays: {error}")

    async def call(self, peer_id: str, handle: str, request, response_type: type, *, timeout_s: float):
        async def call():
            def forward(relay: PeerID, peer: PeerID):
                return forwarded_unary_call(self.p2p, relay, peer, handle, request, response_type)

            forwarded = await self._forwarded(peer_id, forward)
            if forwarded is not None:
                return forwarded
            peer = await self._reach(peer_id, timeout_s)
            return await self.p2p.call_protobuf_handler(peer, handle, request, response_type)

        try:
            return await asyncio.wait_for(call(), timeout_s)
        except (ConnectionError, asyncio.IncompleteReadError):
            self._broken.add(peer_id)
            raise

    async def iterate(self, peer_id: str, handle: str, requests: AsyncIterator, response_type: type) -> AsyncIterator:
        forwarded = await self._forwarded(
            peer_id, lambda relay, peer: asyncio.wait_for(open_forwarded_stream(self.p2p, relay, peer, handle), 30.0)
        )
        if forwarded is not None:
            return await iterate_stream(*forwarded, requests, response_type, f"{handle} at {peer_id}")
        peer = await self._reach(peer_id, 30.0)
        return await self.p2p.iterate_protobuf_handler(peer, handle, requests, response_type)

    async def open_stream(self, peer_id: str, handle: str, *, timeout_s: float) -> MessageStream:
        async def opening():
            forwarded = await self._forwarded(
                peer_id, lambda relay, peer: open_forwarded_stream(self.p2p, relay, peer, handle)
            )
            if forwarded is not None:
                return forwarded
            peer = await self._reach(peer_id, timeout_s)
            _, reader, writer = await self.p2p.call_binary_stream_handler(peer, handle)
            return reader, writer

        reader, writer = await asyncio.wait_for(opening(), timeout_s)
        return P2PMessageStream(peer_id, reader, writer, on_broken=lambda: self._broken.add(peer_id))


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
