"""The wire contract: namespaced handle names per role and version, stubs that refuse the wrong call shape, and
servicers that implement every RPC of their role."""

from __future__ import annotations

import asyncio

import pytest

from corolla.protocol.rpc import BLOCK_SERVER, STAGE_PEER, Rpc, RpcContract, RpcStub
from corolla.protocol.versions import PROTOCOL_VERSION


def test_handle_names_are_namespaced_by_role_and_version():
    assert BLOCK_SERVER.handle("inference") == f"corolla/blocks/v{PROTOCOL_VERSION}/inference"
    other = RpcContract(role="stage", version=1, rpcs=(Rpc("inference", object, object),))
    assert other.handle("inference") != BLOCK_SERVER.handle("inference")  # a second role cannot collide
    with pytest.raises(KeyError, match="has no RPC 'missing'"):
        BLOCK_SERVER.handle("missing")


def test_contracts_refuse_duplicate_rpcs_and_bad_roles():
    with pytest.raises(ValueError, match="declares an RPC twice"):
        RpcContract(role="x", version=1, rpcs=(Rpc("a", object, object), Rpc("a", object, object)))
    with pytest.raises(ValueError, match="without '/'"):
        RpcContract(role="a/b", version=1, rpcs=())


def test_block_servicer_implements_every_rpc_with_the_declared_shape():
    import inspect

    from corolla.server.handler import BlockServicer

    for rpc in BLOCK_SERVER.rpcs:
        handler = getattr(BlockServicer, f"rpc_{rpc.name}")
        assert inspect.isasyncgenfunction(handler) == rpc.stream_output, rpc.name
    assert {rpc.name for rpc in BLOCK_SERVER.rpcs} == {
        "info", "forward", "forward_stream", "backward", "backward_stream", "inference", "push", "push_stream",
    }  # fmt: skip


def test_stub_refuses_a_unary_call_of_a_streaming_rpc_and_back():
    class Unreachable:
        async def call(self, *args, **kwargs):
            raise AssertionError("the stub must refuse before calling")

        async def iterate(self, *args, **kwargs):
            raise AssertionError("the stub must refuse before calling")

    stub = RpcStub(Unreachable(), "peer")
    with pytest.raises(TypeError, match="blocks/inference is a streaming RPC"):
        asyncio.run(stub.call("inference", None, timeout_s=1))
    with pytest.raises(TypeError, match="blocks/forward is a unary RPC"):
        asyncio.run(stub.iterate("forward", None))


def test_a_streamed_call_that_ends_without_a_reply_is_a_transport_failure():
    """A stream closed or reset before the server answered must fail over (ConnectionError), not decode as an
    empty reply."""
    from hivemind.proto import runtime_pb2

    from corolla.client.failover import is_remote_failure
    from corolla.net.streaming import streamed_call

    class SilentStream:
        async def iterate(self, peer_id, handle, requests, response_type):
            async for _ in requests:  # the server reads the whole request, then the stream ends with nothing
                pass

            async def nothing():
                return
                yield

            return nothing()

    stub = RpcStub(SilentStream(), "peer")
    with pytest.raises(ConnectionError, match="forward_stream stream ended without a reply") as caught:
        asyncio.run(streamed_call(stub, "forward_stream", runtime_pb2.ExpertRequest(metadata=b"x")))
    assert is_remote_failure(caught.value)


def test_a_large_reply_streams_one_tensor_at_a_time_and_decodes_exactly():
    """tensor_response_chunks serializes lazily (the first message exists before the last tensor is serialized)
    and streamed_tensors_call decodes each tensor as its chunks complete: the tensors come back bitwise, with the
    metadata; a truncated tensor is a ValueError, a stream with nothing a ConnectionError."""
    import torch
    from hivemind.proto import runtime_pb2

    from corolla.net.streaming import streamed_tensors_call, tensor_response_chunks
    from corolla.net.tensors import STREAM_CHUNK_BYTES

    tensors = [torch.randn(3 * STREAM_CHUNK_BYTES // 4 + 5), torch.randn(7, 3), torch.zeros(0), torch.randn(2, 2)]
    serialized = []

    class Lazy(list):  # records when each tensor is read for serialization
        def __iter__(self):
            for i, t in enumerate(list.__iter__(self)):
                serialized.append(i)
                yield t

    messages = tensor_response_chunks(Lazy(tensors), {"epoch": 3})
    first = next(messages)
    assert serialized == [0] and first.metadata
    rest = list(messages)
    assert len(rest) >= 4 and all(not m.metadata for m in rest)

    class Replay:
        def __init__(self, replies):
            self.replies = replies

        async def iterate(self, peer_id, handle, requests, response_type):
            async for _ in requests:
                pass

            async def replies():
                for reply in self.replies:
                    yield reply

            return replies()

    request = runtime_pb2.ExpertRequest(metadata=b"x")
    metadata, decoded = asyncio.run(
        streamed_tensors_call(RpcStub(Replay([first, *rest]), "p", STAGE_PEER), "state_stream", request)
    )
    assert metadata == first.metadata
    assert len(decoded) == len(tensors) and all(torch.equal(a, b) for a, b in zip(decoded, tensors))
    with pytest.raises(ValueError, match="could not be decoded"):
        asyncio.run(streamed_tensors_call(RpcStub(Replay([first]), "p", STAGE_PEER), "state_stream", request))
    with pytest.raises(ConnectionError, match="ended without a reply"):
        asyncio.run(streamed_tensors_call(RpcStub(Replay([]), "p", STAGE_PEER), "state_stream", request))
