"""Fault injection through the transport: delay, drop, fail, close or corrupt chosen calls.

One ``FaultPlan`` decides, for each call (or each message of a stream), whether and how it goes wrong. The same
plan works on both sides of the wire:

- a client wraps its transport: ``FaultyTransport(P2PTransport(p2p), plan)`` (``SwarmView.wrap_transport``);
- a server wraps its handlers: ``corolla.net.transport.serve(..., wrap=plan.wrap_handler)``, which is how the
  hostile-server fixture builds servers that misbehave while everything else about them is real.

Faults are chosen by a rule the test writes (``Call -> Fault | None``), so they are deterministic and need no
timing tricks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from hivemind.p2p import P2PHandlerError

from corolla.log import get_logger
from corolla.protocol.rpc import Handler, MessageStream, Rpc, Transport

logger = get_logger(__name__)


@dataclass(frozen=True)
class Call:
    """One call as a fault rule sees it.

    ``peer_id``: the other side (the server a client calls; the client that calls a server). ``rpc``: the RPC's
    name within its role (``forward``, ``inference``, ...). ``index``: how many calls of this RPC to this peer the
    plan saw before (from 0). ``message``: for streams, the index of the response within the stream (else 0).
    """

    peer_id: str
    rpc: str
    index: int
    message: int = 0


@dataclass(frozen=True)
class Delay:
    """Hold the answer back for ``seconds``, then deliver it."""

    seconds: float


@dataclass(frozen=True)
class Drop:
    """Never answer: the caller times out."""


@dataclass(frozen=True)
class Close:
    """Close the connection (the caller sees it closed, as when the peer dies)."""


@dataclass(frozen=True)
class Fail:
    """Answer with an error reply carrying ``message``."""

    message: str = "injected fault"


@dataclass(frozen=True)
class Corrupt:
    """Deliver ``transform(response)`` instead of the response."""

    transform: Callable


Fault = Delay | Drop | Close | Fail | Corrupt
Rule = Callable[[Call], "Fault | None"]


class FaultPlan:
    """Decides the fault of every call with ``rule`` and keeps a log of the faults it injected."""

    def __init__(self, rule: Rule):
        self.rule = rule
        self.injected: list[tuple[Call, Fault]] = []
        self._counters: dict[tuple[str, str], itertools.count] = defaultdict(itertools.count)

    def new_call(self, peer_id: str, rpc: str) -> int:
        """The index of a new call of ``rpc`` with ``peer_id``."""
        return next(self._counters[peer_id, rpc])

    def decide(self, call: Call) -> Fault | None:
        fault = self.rule(call)
        if fault is not None:
            self.injected.append((call, fault))
            logger.debug("Injecting %s into %s", fault, call)
        return fault

    # ---- the server side --------------------------------------------------------------------------------------
    def wrap_handler(self, rpc: Rpc, handler: Handler) -> Handler:
        """A server handler that misbehaves as the plan says (a ``corolla.net.transport.HandlerWrapper``)."""
        if rpc.stream_output:

            async def streaming(requests, context) -> AsyncIterator:
                peer = context.remote_id.to_base58()
                index = self.new_call(peer, rpc.name)
                message = 0
                async for response in handler(requests, context):
                    fault = self.decide(Call(peer, rpc.name, index, message))
                    message += 1
                    if isinstance(fault, Close):
                        return
                    yield await _server_fault(fault, response)

            return streaming

        async def unary(request, context):
            peer = context.remote_id.to_base58()
            fault = self.decide(Call(peer, rpc.name, self.new_call(peer, rpc.name)))
            if isinstance(fault, Close):
                raise ConnectionError("injected fault: connection closed")
            return await _server_fault(fault, await handler(request, context))

        return unary


async def _server_fault(fault: Fault | None, response):
    if isinstance(fault, Delay):
        await asyncio.sleep(fault.seconds)
    elif isinstance(fault, Drop):
        await asyncio.Event().wait()  # until the caller gives up and the stream is cancelled
    elif isinstance(fault, Fail):
        raise RuntimeError(fault.message)
    elif isinstance(fault, Corrupt):
        return fault.transform(response)
    return response


class FaultyTransport:
    """A ``Transport`` that injects the faults of ``plan`` into the calls of ``inner``."""

    def __init__(self, inner: Transport, plan: FaultPlan):
        self.inner, self.plan = inner, plan

    async def call(self, peer_id: str, handle: str, request, response_type: type, *, timeout_s: float):
        rpc = _rpc_name(handle)
        fault = self.plan.decide(Call(peer_id, rpc, self.plan.new_call(peer_id, rpc)))
        await _before(fault, timeout_s)
        response = await self.inner.call(peer_id, handle, request, response_type, timeout_s=timeout_s)
        return _after(fault, response)

    async def iterate(self, peer_id: str, handle: str, requests: AsyncIterator, response_type: type) -> AsyncIterator:
        rpc = _rpc_name(handle)
        index = self.plan.new_call(peer_id, rpc)
        responses = await self.inner.iterate(peer_id, handle, requests, response_type)

        async def faulty() -> AsyncIterator:
            message = 0
            async for response in responses:
                fault = self.plan.decide(Call(peer_id, rpc, index, message))
                message += 1
                await _before(fault, timeout_s=None)
                yield _after(fault, response)

        return faulty()

    async def open_stream(self, peer_id: str, handle: str, *, timeout_s: float) -> MessageStream:
        stream = await self.inner.open_stream(peer_id, handle, timeout_s=timeout_s)
        rpc = _rpc_name(handle)
        return _FaultyStream(stream, self.plan, Call(peer_id, rpc, self.plan.new_call(peer_id, rpc)))


class _FaultyStream:
    def __init__(self, inner: MessageStream, plan: FaultPlan, call: Call):
        self.inner, self.plan, self.call = inner, plan, call
        self._received = 0

    async def send(self, message) -> None:
        await self.inner.send(message)

    def write(self, message) -> None:
        self.inner.write(message)

    async def drain(self) -> None:
        await self.inner.drain()

    async def receive(self, response_type: type, timeout_s: float):
        call = Call(self.call.peer_id, self.call.rpc, self.call.index, self._received)
        self._received += 1
        fault = self.plan.decide(call)
        if isinstance(fault, Close):
            await self.inner.close()
        await _before(fault, timeout_s)
        return _after(fault, await self.inner.receive(response_type, timeout_s))

    async def close(self) -> None:
        await self.inner.close()


async def _before(fault: Fault | None, timeout_s: float | None) -> None:
    """The part of a client-side fault that happens before the answer arrives."""
    if isinstance(fault, Delay):
        await asyncio.sleep(fault.seconds)
    elif isinstance(fault, Drop):
        if timeout_s is not None:
            await asyncio.sleep(timeout_s)
        raise asyncio.TimeoutError("injected fault: no answer")
    elif isinstance(fault, Close):
        raise ConnectionError("injected fault: the connection was closed")
    elif isinstance(fault, Fail):
        raise P2PHandlerError(f"injected fault: {fault.message}")


def _after(fault: Fault | None, response):
    return fault.transform(response) if isinstance(fault, Corrupt) else response


def _rpc_name(handle: str) -> str:
    return handle.rsplit("/", 1)[-1]


__all__ = [
    "Call",
    "Close",
    "Corrupt",
    "Delay",
    "Drop",
    "Fail",
    "Fault",
    "FaultPlan",
    "FaultyTransport",
]
