"""Pushing a session's step outputs to the next server of its chain, over one long-lived stream.

A push is on the critical path of every generated token: the next server starts computing when it arrives. A unary
call per push makes both daemons open a fresh libp2p stream (and the pushing process a fresh control connection):
~2 ms per call on loopback against ~0.4 ms for a round trip on an open stream. So a session keeps one stream to
the server it pushes to, writes each push into it at once (before the step's answer to the client, which is not on
the critical path), and lets the transport drain it in the background.

Pushes are best effort: the client sends its own copy of every step, so a push that fails costs only its speed-up.
A server that does not serve push streams (an older version) gets unary pushes instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine

from corolla.log import get_logger
from corolla.protocol.rpc import BLOCK_SERVER, MessageStream, RpcStub, Transport

logger = get_logger(__name__)


class PushSender:
    """The pushes of one server-side session: to one next server at a time (the client may re-route it)."""

    def __init__(self, transport: Transport, *, timeout_s: float):
        self.transport, self.timeout_s = transport, timeout_s
        self._target: str | None = None  # the peer pushed to now
        self._stream: MessageStream | None = None
        self._opening = False
        self._queued: list = []  # pushes written once the stream is open
        self._draining = False
        self._unary: set[str] = set()  # peers without push streams
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def push(self, peer_id: str, request) -> None:
        """Send ``request`` (a packed PushedStep) to ``peer_id``: written into the stream now if it is open."""
        if self._closed:
            return
        if peer_id != self._target:
            self._switch(peer_id)
        if peer_id in self._unary:
            self._spawn(self._call(peer_id, request))
        elif self._stream is not None:
            self._write([request])
        else:
            self._queued.append(request)
            if not self._opening:
                self._opening = True
                self._spawn(self._open(peer_id))

    async def close(self) -> None:
        """End the stream (the next server's handler then returns) and stop pending pushes."""
        self._closed = True
        self._queued.clear()
        stream, self._stream = self._stream, None
        for task in list(self._tasks):
            task.cancel()
        if stream is not None:
            await _quietly(stream.close())

    def _switch(self, peer_id: str) -> None:
        """Push to another server from now on; the stream to the previous one ends."""
        if self._stream is not None:
            self._spawn(_quietly(self._stream.close()))
        self._target, self._stream, self._opening, self._queued = peer_id, None, False, []

    async def _open(self, peer_id: str) -> None:
        try:
            stream = await self.transport.open_stream(
                peer_id, BLOCK_SERVER.handle("push_stream"), timeout_s=self.timeout_s
            )
        except Exception as e:
            if peer_id != self._target or self._closed:
                return
            logger.debug("No push stream to %s (%s): pushing with unary calls", peer_id, e)
            self._unary.add(peer_id)
            queued, self._queued, self._opening = self._queued, [], False
            for request in queued:
                self._spawn(self._call(peer_id, request))
            return
        if peer_id != self._target or self._closed:  # re-routed or closed meanwhile
            await _quietly(stream.close())
            return
        self._stream, self._opening = stream, False
        queued, self._queued = self._queued, []
        self._write(queued)

    def _write(self, requests: list) -> None:
        stream = self._stream
        try:
            for request in requests:
                stream.write(request)
        except Exception as e:  # the stream broke: the next push opens another
            self._broken(stream, e)
            return
        if not self._draining:
            self._draining = True
            self._spawn(self._drain(stream))

    async def _drain(self, stream: MessageStream) -> None:
        try:
            await asyncio.wait_for(stream.drain(), self.timeout_s)
        except Exception as e:
            self._broken(stream, e)
        finally:
            self._draining = False

    def _broken(self, stream: MessageStream, error: Exception) -> None:
        logger.debug("Push stream to %s broke: %s", self._target, error)
        if self._stream is stream:
            self._stream = None
            self._spawn(_quietly(stream.close()))

    async def _call(self, peer_id: str, request) -> None:
        try:
            await RpcStub(self.transport, peer_id, BLOCK_SERVER).call("push", request, timeout_s=self.timeout_s)
        except Exception as e:
            logger.debug("Push to %s failed: %s", peer_id, e)

    def _spawn(self, coroutine: Coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _quietly(coroutine: Coroutine) -> None:
    try:
        await coroutine
    except Exception as e:
        logger.debug("Closing a push stream failed: %s", e)
