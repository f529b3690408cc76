"""Requests and replies over the transport's unary size limit: sent and received as streams of chunks.

hivemind's libp2p transport refuses unary messages over 4 MiB. A caller sends a request of up to
``MAX_UNARY_BYTES`` as one message and a bigger one through the RPC's ``*_stream`` twin
(``call_maybe_streamed``); a peer reassembles a streamed request (``receive_request``, refusing one over its own
limit) and answers in chunks (``response_chunks``). Used by the block servers and clients and by SWARM stage peers
and trainers alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from corolla.errors import InvalidRequestError
from corolla.net.tensors import STREAM_CHUNK_BYTES, combine_chunks, starts_tensor
from corolla.protocol.rpc import RpcStub

MAX_UNARY_BYTES = 2 * 2**20  # the transport refuses unary messages over 4 MiB; stream anything bigger than this


async def call_maybe_streamed(stub: RpcStub, rpc: str, request, *, timeout_s: float) -> runtime_pb2.ExpertResponse:
    """``rpc`` as one message if the request is small enough, else through ``{rpc}_stream``."""
    if request.ByteSize() <= MAX_UNARY_BYTES:
        return await stub.call(rpc, request, timeout_s=timeout_s)
    return await asyncio.wait_for(streamed_call(stub, f"{rpc}_stream", request), timeout_s)


async def streamed_call(stub: RpcStub, rpc: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
    """Send ``request`` in chunks (metadata first) and reassemble the chunked reply (metadata included)."""

    async def chunks():
        yield runtime_pb2.ExpertRequest(metadata=request.metadata)
        for tensor in request.tensors:
            for chunk in split_for_streaming(tensor, STREAM_CHUNK_BYTES):
                yield runtime_pb2.ExpertRequest(tensors=[chunk])

    parts, replies, metadata = [], 0, b""
    async for response in await stub.iterate(rpc, chunks()):
        parts.extend(response.tensors)
        metadata = metadata or response.metadata
        replies += 1
    if not replies:  # the stream was closed or reset before the server answered: fail over like any lost stream
        raise ConnectionError(f"the {rpc} stream ended without a reply")
    return runtime_pb2.ExpertResponse(metadata=metadata, tensors=combine_chunks(parts))


def tensor_response_chunks(tensors: Sequence[torch.Tensor], metadata: dict) -> Iterator[runtime_pb2.ExpertResponse]:
    """``response_chunks(pack_response(tensors, metadata))`` (uncompressed), serialized one tensor at a time as the
    stream is consumed: a large state (a stage's parameters and optimizer moments) is never held serialized whole
    next to itself."""
    serialized = (serialize_torch_tensor(t, runtime_pb2.CompressionType.NONE) for t in tensors)
    return _chunked(serialized, MSGPackSerializer.dumps(metadata))


async def streamed_tensors_call(
    stub: RpcStub, rpc: str, request: runtime_pb2.ExpertRequest
) -> tuple[bytes, list[torch.Tensor]]:
    """Call a streamed RPC whose request is small and whose reply is large: (the reply's metadata, its tensors),
    each tensor decoded as soon as its chunks are in and its chunks dropped (ValueError on one that cannot be
    decoded), so the reply is never held both serialized and decoded."""
    tensors: list[torch.Tensor] = []
    pending: list[runtime_pb2.Tensor] = []
    metadata, replies = b"", 0

    def finish() -> None:
        try:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(pending)))
        except Exception as e:
            raise ValueError(f"a tensor could not be decoded: {type(e).__name__}: {e}") from None
        pending.clear()

    async for response in await stub.iterate(rpc, _one(request)):
        replies += 1
        metadata = metadata or response.metadata
        for part in response.tensors:
            if starts_tensor(part) and pending:
                finish()
            pending.append(part)
    if not replies:
        raise ConnectionError(f"the {rpc} stream ended without a reply")
    if pending:
        finish()
    return metadata, tensors


async def _one(request):
    yield request


def response_chunks(response: runtime_pb2.ExpertResponse) -> Iterator[runtime_pb2.ExpertResponse]:
    """A response split into messages under the transport's size limit (its metadata in the first)."""
    return _chunked(response.tensors, response.metadata)


def _chunked(tensors: Iterable[runtime_pb2.Tensor], metadata: bytes) -> Iterator[runtime_pb2.ExpertResponse]:
    for tensor in tensors:
        for chunk in split_for_streaming(tensor, STREAM_CHUNK_BYTES):
            yield runtime_pb2.ExpertResponse(tensors=[chunk], metadata=metadata)
            metadata = b""
        del tensor  # dropped before a lazy ``tensors`` serializes the next one
    if metadata:  # a response without tensors
        yield runtime_pb2.ExpertResponse(metadata=metadata)


async def receive_request(
    requests: AsyncIterator[runtime_pb2.ExpertRequest], *, limit_bytes: int, timeout_s: float, too_large: str
) -> runtime_pb2.ExpertRequest:
    """Reassemble a streamed request; InvalidRequestError(``too_large``) past ``limit_bytes`` (after draining)."""
    parts, metadata, received = [], None, 0
    async for message in timed(requests, timeout_s):
        received += message.ByteSize()
        if received > limit_bytes:
            # keep reading (and dropping) the rest: closing while the client still sends resets the stream,
            # and the client would then see a broken or empty stream instead of this error
            parts = []
            if received > 4 * limit_bytes:
                break
            continue
        if metadata is None and message.metadata:
            metadata = message.metadata
        parts.extend(message.tensors)
    if received > limit_bytes:
        raise InvalidRequestError(too_large)
    return runtime_pb2.ExpertRequest(metadata=metadata or b"", tensors=combine_chunks(parts))


async def timed(iterator: AsyncIterator, timeout_s: float) -> AsyncIterator:
    """Yield from ``iterator``, failing if the next item takes longer than ``timeout_s`` to arrive."""
    iterator = aiter(iterator)
    while True:
        try:
            async with asyncio.timeout(timeout_s):  # no task per message, unlike wait_for
                item = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise InvalidRequestError(f"no message within {timeout_s} s; closing the stream") from None
        yield item
