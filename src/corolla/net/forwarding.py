"""Calls to peers behind NAT, forwarded by a public peer over the connection the NATed peer keeps to it.

libp2p's circuit relay v2, as hivemind's p2pd serves it, resets every relayed connection after 128 KiB in either
direction or 2 minutes: go-libp2p's default relay resources. p2pd's ``-relayDataLimit``/``-relayTimeLimit`` flags
are not applied to its relay service (measured: a relay started with them still logs ``relayed 131072 bytes`` and
resets the stream). An inference session of SmolLM2 moves ~2.3 KB per token each way, so a relayed session broke after
a few dozen tokens, and a replay of its history broke at once; one prefill of a 70B-class model is bigger than the
whole budget. So circuits serve only to find out that a peer is reachable; the calls themselves are forwarded.

A peer behind NAT keeps an outbound connection to its relays (the initial peers; ``Peer`` re-dials them when they
drop). A forwarding peer (``corolla dht`` runs ``ForwardingService``) opens streams to it over that connection on a
caller's behalf:

- ``FORWARD_STREAM``: the caller opens a stream to the forwarder and sends a header naming the peer and the handle;
  the forwarder opens a stream to that handle of that peer, answers ``ok`` (or an error), then copies bytes both
  ways until either side ends. The caller then speaks the handle's own protocol on the stream.
- ``FORWARD_UNARY``: one request, one response; the forwarder makes the unary call for the caller.

The forwarder enforces: only corolla's own handles (``corolla/...``); only peers already connected to it (it never
dials for a caller, so nobody can use it to reach arbitrary addresses); at most ``max_streams_per_caller`` open
forwarded streams per caller and ``max_streams`` in all; streams idle for ``idle_timeout_s`` are closed. A malformed
request fails alone, with a message, and the forwarder keeps serving.

Trust: the forwarder terminates both libp2p connections, so it sees, and could alter, the forwarded bytes (a libp2p
circuit is end-to-end encrypted, but unusable here). A server names its relays in its signed record (its
``--relays``, by default its initial peers: the swarm's bootstrap peers), so a client trusts them as far as it trusts
that server's answers; a client that trusts no one checks answers with ``verify=``. The target sees the relay, not
the caller, as the remote peer: a server behind NAT cannot check who pushes to it through a relay (it drops such
pushes and uses the client's copy of the step), and a forwarder must not run on a server.
"""

from __future__ import annotations

import asyncio
import collections
import resource
import time
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass

import multihash
from hivemind.p2p import P2P, P2PContext, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from corolla.log import get_logger
from corolla.protocol.rpc import NAMESPACE

logger = get_logger(__name__)

FORWARD_STREAM = "corolla.forward.v1"
FORWARD_UNARY = "corolla.forward_unary.v1"
MAX_HANDLE_CHARS = 200
MAX_HEADER_BYTES = 4096
COPY_CHUNK_BYTES = 2**16


@dataclass(frozen=True)
class ForwardingConfig:
    """Limits of a forwarding peer."""

    max_streams_per_caller: int = 32
    max_streams: int = 256  # each takes two sockets of this process (its file limit is raised at start)
    max_calls_per_caller: int = 32  # unary calls in flight
    max_calls: int = 256
    idle_timeout_s: float = 600.0  # a forwarded stream with no bytes either way for this long is closed
    open_timeout_s: float = 15.0  # reading the header and opening the stream to the target
    unary_timeout_s: float = 120.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


class ForwardingError(ConnectionError):
    """A forwarded call failed outside the target's handler. ``sent``: the request may have reached the target (it
    must not be sent again through another relay); otherwise the forwarder refused it or could not reach the target,
    and another relay may try."""

    def __init__(self, message: str, *, sent: bool = False):
        super().__init__(message)
        self.sent = sent


def parse_request(body: object) -> tuple[PeerID, str]:
    """The target peer and handle of a forwarding request (a msgpack dict); ValueError saying what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the request must be a map with 'peer' and 'handle'")
    peer, handle = body.get("peer"), body.get("handle")
    if not isinstance(handle, str) or not handle.startswith(f"{NAMESPACE}/") or len(handle) > MAX_HANDLE_CHARS:
        raise ValueError(f"only {NAMESPACE}/... handles (at most {MAX_HANDLE_CHARS} characters) are forwarded")
    if any(c.isspace() for c in handle):
        raise ValueError("a handle has no whitespace")
    if not isinstance(peer, str) or not 0 < len(peer) <= 100:
        raise ValueError("'peer' must be a base58 peer id")
    try:
        parsed = PeerID.from_base58(peer)
        multihash.decode(parsed.to_bytes())  # a peer id is a multihash of its public key
    except Exception as e:
        raise ValueError(f"'peer' is not a peer id ({type(e).__name__})") from None
    return parsed, handle


def _message(body: dict) -> runtime_pb2.ExpertInfo:
    return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(body))


def _body(message: runtime_pb2.ExpertInfo) -> object:
    try:
        return MSGPackSerializer.loads(message.serialized_info)
    except Exception as e:
        raise ValueError(f"the request is not msgpack ({type(e).__name__})") from None


class ForwardingService:
    """Serves ``FORWARD_STREAM`` and ``FORWARD_UNARY`` on ``p2p`` (see the module's docstring)."""

    def __init__(self, p2p: P2P, config: ForwardingConfig = ForwardingConfig()):
        self.p2p, self.config = p2p, config
        self._open: collections.Counter[PeerID] = collections.Counter()  # streams per caller
        self._calls: collections.Counter[PeerID] = collections.Counter()  # unary calls in flight per caller
        self.forwarded_streams = 0  # opened so far (for logs and tests)
        self.forwarded_calls = 0

    async def start(self) -> None:
        _raise_file_limit()
        await self.p2p.add_binary_stream_handler(FORWARD_STREAM, self._handle_stream)
        await self.p2p.add_protobuf_handler(FORWARD_UNARY, self._handle_unary, runtime_pb2.ExpertInfo)

    async def _target(self, body: object, caller: PeerID) -> tuple[PeerID, str]:
        peer, handle = parse_request(body)
        if peer == caller:
            raise ValueError("a peer does not need a forwarder to reach itself")
        if not any(info.peer_id == peer for info in await self.p2p.list_peers()):
            raise ForwardingError(f"peer {peer} is not connected to this forwarder")
        return peer, handle

    # ---- unary ------------------------------------------------------------------------------------------------
    async def _handle_unary(self, request: runtime_pb2.ExpertInfo, context: P2PContext) -> runtime_pb2.ExpertInfo:
        caller = context.remote_id
        if self._calls[caller] >= self.config.max_calls_per_caller or sum(self._calls.values()) >= (
            self.config.max_calls
        ):
            return _message({"error": "too many forwarded calls are running; retry later"})
        self._calls[caller] += 1
        try:
            return await self._forward_unary(caller, request)
        finally:
            self._calls[caller] -= 1
            if self._calls[caller] <= 0:
                del self._calls[caller]

    async def _forward_unary(self, caller: PeerID, request: runtime_pb2.ExpertInfo) -> runtime_pb2.ExpertInfo:
        try:
            body = _body(request)
            peer, handle = await self._target(body, caller)
            data = body.get("data")
            if not isinstance(data, bytes):
                raise ValueError("'data' must be the serialized request (bytes)")
        except (ValueError, ForwardingError) as e:
            return _message({"error": str(e)})
        except Exception as e:  # e.g. this peer's daemon failing: not the target's doing
            return _message({"error": f"this forwarder failed ({type(e).__name__}: {e})"[:500]})
        try:
            response = await asyncio.wait_for(
                self.p2p._client.call_unary_handler(peer, handle, data), self.config.unary_timeout_s
            )
        except P2PHandlerError as e:  # the target's handler failed: the caller sees it as from the target itself
            return _message({"error": str(e), "handler": True})
        except Exception as e:
            return _message({"error": f"the call to {peer} failed ({type(e).__name__}: {e})"[:500], "sent": True})
        self.forwarded_calls += 1
        return _message({"data": response})

    # ---- streams ----------------------------------------------------------------------------------------------
    async def _handle_stream(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        caller = info.peer_id
        with closing(writer):
            if self._open[caller] >= self.config.max_streams_per_caller or sum(self._open.values()) >= (
                self.config.max_streams
            ):
                await _answer(writer, {"error": "too many forwarded streams are open; close some and retry"})
                return
            self._open[caller] += 1
            try:
                await self._forward(caller, reader, writer)
            finally:
                self._open[caller] -= 1
                if self._open[caller] <= 0:
                    del self._open[caller]

    async def _forward(self, caller: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.config.open_timeout_s):
                peer, handle = await self._target(_body(await _read_header(reader)), caller)
        except (ValueError, ForwardingError) as e:
            await _answer(writer, {"error": str(e)})
            return
        except TimeoutError:
            await _answer(writer, {"error": f"no whole header in {self.config.open_timeout_s:g} s"})
            return
        except (asyncio.IncompleteReadError, ConnectionError):  # the caller hung up before its header
            return
        except Exception as e:  # e.g. this peer's daemon failing
            logger.debug("Forwarding a stream for %s failed: %s: %s", caller, type(e).__name__, e)
            await _answer(writer, {"error": f"this forwarder failed ({type(e).__name__})"})
            return
        try:
            async with asyncio.timeout(self.config.open_timeout_s):
                _, target_reader, target_writer = await self.p2p.call_binary_stream_handler(peer, handle)
        except Exception as e:
            await _answer(writer, {"error": f"could not open {handle} at {peer} ({type(e).__name__}: {e})"[:500]})
            return
        self.forwarded_streams += 1
        started = time.monotonic()
        with closing(target_writer):
            await _answer(writer, {"ok": True})
            sent, received = await pipe(
                reader, writer, target_reader, target_writer, idle_timeout_s=self.config.idle_timeout_s
            )
        logger.info(
            "Forwarded a stream %s -> %s (%s): %d bytes there, %d back in %.1f s",
            caller, peer, handle, sent, received, time.monotonic() - started,
        )  # fmt: skip


def _raise_file_limit() -> None:
    """Every forwarded stream holds two sockets of this process: take the hard file limit, not the soft one (often
    1024, which ``max_streams`` would reach before anything else)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            logger.debug("Could not raise the open-file limit from %d: %s", soft, e)


async def _read_header(reader: asyncio.StreamReader) -> runtime_pb2.ExpertInfo:
    """A forwarding header in hivemind's framing, at most ``MAX_HEADER_BYTES`` (a caller cannot make the forwarder
    wait for, or hold, a huge first message)."""
    marker = await reader.readexactly(1)
    size = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if marker != P2P.MESSAGE_MARKER or size > MAX_HEADER_BYTES:
        raise ValueError(f"the first message must be a forwarding header of at most {MAX_HEADER_BYTES} bytes")
    try:
        return runtime_pb2.ExpertInfo.FromString(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        raise
    except Exception as e:
        raise ValueError(f"the header is not an ExpertInfo message ({type(e).__name__})") from None


async def _answer(writer: asyncio.StreamWriter, body: dict) -> None:
    try:
        await P2P.send_protobuf(_message(body), writer)
    except Exception:  # the caller is gone
        pass


async def pipe(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    *,
    idle_timeout_s: float,
) -> tuple[int, int]:
    """Copy a -> b and b -> a until either side ends or fails, or no byte moved for ``idle_timeout_s``; the bytes
    copied each way."""
    last, moved = [time.monotonic()], [0, 0]

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: int) -> None:
        while True:
            data = await reader.read(COPY_CHUNK_BYTES)
            if not data:
                return
            last[0] = time.monotonic()
            moved[way] += len(data)
            writer.write(data)
            await writer.drain()

    async def watchdog() -> None:
        while time.monotonic() - last[0] < idle_timeout_s:
            await asyncio.sleep(min(idle_timeout_s, 5.0))

    tasks = [asyncio.create_task(copy(a_reader, b_writer, 0)), asyncio.create_task(copy(b_reader, a_writer, 1))]
    tasks.append(asyncio.create_task(watchdog()))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return moved[0], moved[1]


# ---- the caller's side ----------------------------------------------------------------------------------------
async def open_forwarded_stream(
    p2p: P2P, forwarder: PeerID, peer: PeerID, handle: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to ``handle`` of ``peer`` through ``forwarder``; ForwardingError if the forwarder refuses."""
    _, reader, writer = await p2p.call_binary_stream_handler(forwarder, FORWARD_STREAM)
    try:
        await P2P.send_protobuf(_message({"peer": peer.to_base58(), "handle": handle}), writer)
        answer, _ = await P2P.receive_protobuf(runtime_pb2.ExpertInfo, reader)
        body = _body(answer)
    except BaseException:
        writer.close()
        raise
    if not isinstance(body, dict) or not body.get("ok"):
        writer.close()
        error = body.get("error") if isinstance(body, dict) else None
        raise ForwardingError(f"relay {forwarder} could not reach {peer}: {error or 'no reason given'}")
    return reader, writer


async def forwarded_unary_call(p2p: P2P, forwarder: PeerID, peer: PeerID, handle: str, request, response_type):
    """A unary call to ``handle`` of ``peer`` through ``forwarder``. The target's handler error comes back as
    P2PHandlerError (as from a direct call); the forwarder's as ForwardingError."""
    wrapped = _message({"peer": peer.to_base58(), "handle": handle, "data": request.SerializeToString()})
    try:
        answer = await p2p.call_protobuf_handler(forwarder, FORWARD_UNARY, wrapped, runtime_pb2.ExpertInfo)
    except P2PHandlerError as e:  # the forwarding handler itself failed, or this relay does not forward
        raise ForwardingError(f"relay {forwarder} did not forward the call ({e})") from None
    try:
        body = _body(answer)
        if not isinstance(body, dict):
            raise ValueError("not a map")
        if isinstance(body.get("data"), bytes):
            return response_type.FromString(body["data"])
    except Exception as e:  # the call did reach the target: it must not be sent again elsewhere
        raise ForwardingError(f"relay {forwarder} sent an unreadable answer ({e})", sent=True) from None
    if body.get("handler"):
        raise P2PHandlerError(str(body.get("error")))
    error = body.get("error") or "no reason given"
    raise ForwardingError(f"relay {forwarder} could not reach {peer}: {error}", sent=bool(body.get("sent")))


async def iterate_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: AsyncIterator, response_type, what: str
) -> AsyncIterator:
    """hivemind's streaming-RPC protocol on an open stream: the requests (then end of stream) go out while the
    responses come back; an error reply raises P2PHandlerError, as a direct call does."""

    async def write() -> None:
        async for request in requests:
            await P2P.send_protobuf(request, writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)

    async def read() -> AsyncIterator:
        with closing(writer):
            try:
                while True:
                    try:
                        response, error = await P2P.receive_protobuf(response_type, reader)
                    except asyncio.IncompleteReadError:
                        break
                    if error is not None:
                        raise P2PHandlerError(f"Failed to call {what}: {error.message}")
                    yield response
                await writing
            finally:
                writing.cancel()

    writing = asyncio.create_task(write())
    return read()
