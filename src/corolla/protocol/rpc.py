"""The RPC contract between peers: explicit, namespaced handle names and the message types of every call.

A handle name is what libp2p routes a stream by, so it is part of the wire protocol. It is spelled out here per
role and protocol version (``corolla/blocks/v2/forward``) instead of being derived from a Python class name, so a
second role (a SWARM stage, a BTARD averager) cannot collide with the block server, and renaming a class changes
nothing on the wire. Clients call through ``RpcStub``; servers register their handlers with
``corolla.net.transport.serve``; both import only this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hivemind.proto import runtime_pb2

from corolla.protocol.versions import PROTOCOL_VERSION

NAMESPACE = "corolla"


@dataclass(frozen=True)
class Rpc:
    """One remote procedure: its name within the role, its protobuf types and which sides stream."""

    name: str
    request_type: type
    response_type: type
    stream_input: bool = False
    stream_output: bool = False


@dataclass(frozen=True)
class RpcContract:
    """The procedures one role serves, under ``corolla/{role}/v{version}/``."""

    role: str
    version: int
    rpcs: tuple[Rpc, ...]

    def __post_init__(self):
        names = [rpc.name for rpc in self.rpcs]
        if len(set(names)) != len(names):
            raise ValueError(f"role {self.role!r} declares an RPC twice: {names}")
        if "/" in self.role or not self.role:
            raise ValueError(f"a role name must be non-empty and without '/', got {self.role!r}")

    def __getitem__(self, name: str) -> Rpc:
        for rpc in self.rpcs:
            if rpc.name == name:
                return rpc
        raise KeyError(f"role {self.role!r} has no RPC {name!r}; it has {[r.name for r in self.rpcs]}")

    def handle(self, name: str) -> str:
        """The libp2p handle name of RPC ``name`` (KeyError for an RPC this role does not have)."""
        return f"{NAMESPACE}/{self.role}/v{self.version}/{self[name].name}"


_Request, _Response = runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse

BLOCK_SERVER = RpcContract(
    role="blocks",
    version=PROTOCOL_VERSION,
    rpcs=(
        Rpc("info", runtime_pb2.ExpertUID, runtime_pb2.ExpertInfo),  # ServerStatus as msgpack
        Rpc("forward", _Request, _Response),  # SpanRequest -> outputs
        Rpc("forward_stream", _Request, _Response, stream_input=True, stream_output=True),
        Rpc("backward", _Request, _Response),  # BackwardRequest -> grad_inputs (+ grad_prompts)
        Rpc("backward_stream", _Request, _Response, stream_input=True, stream_output=True),
        Rpc("inference", _Request, _Response, stream_input=True, stream_output=True),  # InferenceOpen, steps
        Rpc("push", _Request, _Response),  # PushedStep from the previous server of a chain
        Rpc("push_stream", _Request, _Response, stream_input=True, stream_output=True),  # PushedSteps, no answers
    ),
)
"""What a block server serves (messages in ``corolla.protocol.messages``)."""


class MessageStream(Protocol):
    """A bidirectional stream of protobuf messages to one peer (an inference session)."""

    async def send(self, message) -> None: ...

    def write(self, message) -> None:
        """Queue ``message`` without waiting (then ``drain``); ``send`` is both."""
        ...

    async def drain(self) -> None: ...

    async def receive(self, response_type: type, timeout_s: float):
        """The next message; ConnectionError if the peer closed the stream, RemoteCallError for its error reply."""
        ...

    async def close(self) -> None: ...


class Transport(Protocol):
    """How a client reaches peers. The real one is ``corolla.net.transport.P2PTransport`` (hivemind's libp2p);
    ``corolla.net.faults.FaultyTransport`` wraps any transport to delay, drop, corrupt or close calls in tests."""

    async def call(self, peer_id: str, handle: str, request, response_type: type, *, timeout_s: float): ...

    async def iterate(self, peer_id: str, handle: str, requests: AsyncIterator, response_type: type) -> AsyncIterator:
        """Open a streaming call (the stream exists once this returns); its responses as an iterator."""
        ...

    async def open_stream(self, peer_id: str, handle: str, *, timeout_s: float) -> MessageStream: ...


Handler = Callable[..., Awaitable[Any] | AsyncIterator[Any]]


class RpcStub:
    """Calls the RPCs of ``contract`` on one peer through ``transport``."""

    def __init__(self, transport: Transport, peer_id: str, contract: RpcContract = BLOCK_SERVER):
        self.transport, self.peer_id, self.contract = transport, peer_id, contract

    async def call(self, name: str, request, *, timeout_s: float):
        """A unary call; the remote error (hivemind's P2PHandlerError) or TimeoutError propagates."""
        rpc = self._rpc(name, stream=False)
        return await self.transport.call(
            self.peer_id, self.contract.handle(name), request, rpc.response_type, timeout_s=timeout_s
        )

    async def iterate(self, name: str, requests: AsyncIterator) -> AsyncIterator:
        """A streaming call: the requests go out as they are produced, the responses come back as an iterator."""
        rpc = self._rpc(name, stream=True)
        return await self.transport.iterate(self.peer_id, self.contract.handle(name), requests, rpc.response_type)

    async def open_stream(self, name: str, *, timeout_s: float) -> MessageStream:
        """A raw bidirectional stream (the caller frames messages itself, and notices a closed stream at once)."""
        self._rpc(name, stream=True)
        return await self.transport.open_stream(self.peer_id, self.contract.handle(name), timeout_s=timeout_s)

    def _rpc(self, name: str, *, stream: bool) -> Rpc:
        rpc = self.contract[name]
        if rpc.stream_output != stream:
            kind = "a streaming" if rpc.stream_output else "a unary"
            raise TypeError(f"{self.contract.role}/{name} is {kind} RPC")
        return rpc


STAGE_PEER = RpcContract(
    role="stage",
    version=PROTOCOL_VERSION,
    rpcs=(
        Rpc("info", runtime_pb2.ExpertUID, runtime_pb2.ExpertInfo),  # StagePeerStatus as msgpack
        Rpc("forward", _Request, _Response),  # StageForward + inputs -> outputs
        Rpc("forward_stream", _Request, _Response, stream_input=True, stream_output=True),  # the same, chunked
        Rpc("backward", _Request, _Response),  # StageBackward + inputs, grad_outputs or labels -> grad_inputs
        Rpc("backward_stream", _Request, _Response, stream_input=True, stream_output=True),
        # StageStateRequest -> StageStateReply + the state's tensors (a stage's state is over the unary limit)
        Rpc("state_stream", _Request, _Response, stream_input=True, stream_output=True),
    ),
)
"""What a SWARM stage peer serves (messages in ``corolla.protocol.stage_messages``)."""


BTARD_PEER = RpcContract(
    role="btard",
    version=PROTOCOL_VERSION,
    rpcs=(
        # one signed protocol message (corolla.secure.envelope, msgpack in serialized_info) -> an empty ack
        Rpc("deliver", runtime_pb2.ExpertInfo, runtime_pb2.ExpertInfo),
        # the same message cut into consecutive chunks (a large part or aggregate) -> one empty ack
        Rpc("deliver_stream", runtime_pb2.ExpertInfo, runtime_pb2.ExpertInfo, stream_input=True, stream_output=True),
    ),
)
"""What a BTARD peer serves: the mailbox of its protocol messages (``corolla.secure``)."""
