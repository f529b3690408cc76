"""One forward or backward call to one server for a range of its blocks, unary or streamed by payload size."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from corolla.algorithms.routing import RouteHop
from corolla.errors import RemoteCallError
from corolla.net.tensors import STREAM_CHUNK_BYTES, combine_chunks, pack, unpack_tensors
from corolla.protocol.messages import BackwardRequest, SpanRequest
from corolla.protocol.rpc import BLOCK_SERVER, RpcStub

MAX_UNARY_BYTES = 2 * 2**20  # the transport refuses unary messages over 4 MiB; stream anything bigger than this


@dataclass(frozen=True)
class SpanCallInputs:
    """What a forward or backward call sends besides the hidden states: the mask, positions and deep prompts.

    attention_mask [batch, tokens], position_ids [batch, tokens], prompts [blocks of the call, batch or 1, prefix,
    hidden] (already sliced to the call's blocks), each optional.
    """

    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    prompts: torch.Tensor | None = None

    def extras(self) -> list[torch.Tensor]:
        return [t for t in (self.attention_mask, self.position_ids, self.prompts) if t is not None]

    def flags(self) -> dict:
        return dict(
            has_attention_mask=self.attention_mask is not None,
            has_position_ids=self.position_ids is not None,
            has_prompts=self.prompts is not None,
        )


async def call_forward(swarm, hop: RouteHop, hidden: torch.Tensor, extra: SpanCallInputs) -> torch.Tensor:
    """Hidden states through blocks ``hop.start..hop.end-1`` on ``hop.peer_id``."""
    compression = swarm.config.compression
    meta = SpanRequest(
        start_block=hop.start,
        end_block=hop.end,
        output_compression=compression,
        active_adapter=swarm.config.active_adapter,
        **extra.flags(),
    )
    request = pack([hidden, *extra.extras()], meta.model_dump(), compression=compression)
    outputs = await _call(swarm, hop, request, "forward")
    if len(outputs) != 1 or outputs[0].shape != hidden.shape:
        raise RemoteCallError(f"server {hop.peer_id} returned a malformed forward result")
    return outputs[0].to(hidden.dtype)


async def call_backward(
    swarm, hop: RouteHop, hidden: torch.Tensor, grad_outputs: torch.Tensor, extra: SpanCallInputs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad of ``hidden``, grad of ``extra.prompts`` or None) for blocks ``hop.start..hop.end-1``."""
    compression = swarm.config.compression
    meta = BackwardRequest(
        start_block=hop.start,
        end_block=hop.end,
        output_compression=compression,
        active_adapter=swarm.config.active_adapter,
        **extra.flags(),
    )
    request = pack([hidden, grad_outputs, *extra.extras()], meta.model_dump(), compression=compression)
    outputs = await _call(swarm, hop, request, "backward")
    expected = 1 + int(extra.prompts is not None)
    if len(outputs) != expected or outputs[0].shape != hidden.shape:
        raise RemoteCallError(f"server {hop.peer_id} returned a malformed backward result")
    if extra.prompts is None:
        return outputs[0].to(hidden.dtype), None
    if outputs[1].shape != extra.prompts.shape:
        raise RemoteCallError(f"server {hop.peer_id} returned deep-prompt gradients of a wrong shape")
    return outputs[0].to(hidden.dtype), outputs[1].to(extra.prompts.dtype)


async def _call(swarm, hop: RouteHop, request: runtime_pb2.ExpertRequest, rpc: str) -> list[torch.Tensor]:
    stub = RpcStub(await swarm.transport(), hop.peer_id, BLOCK_SERVER)
    timeout = swarm.config.request_timeout_s
    if request.ByteSize() <= MAX_UNARY_BYTES:
        response = await stub.call(rpc, request, timeout_s=timeout)
    else:
        response = await asyncio.wait_for(_streamed(stub, f"{rpc}_stream", request), timeout)
    try:
        return unpack_tensors(response)
    except Exception as e:  # undecodable bytes are the server's fault, not a client bug
        raise RemoteCallError(f"server {hop.peer_id} sent an undecodable {rpc} reply: {e}") from e


async def _streamed(stub: RpcStub, rpc: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
    async def chunks():
        yield runtime_pb2.ExpertRequest(metadata=request.metadata)
        for tensor in request.tensors:
            for chunk in split_for_streaming(tensor, STREAM_CHUNK_BYTES):
                yield runtime_pb2.ExpertRequest(tensors=[chunk])

    parts, replies = [], 0
    async for response in await stub.iterate(rpc, chunks()):
        parts.extend(response.tensors)
        replies += 1
    if not replies:  # the stream was closed or reset before the server answered: fail over like any lost stream
        raise ConnectionError(f"the {rpc} stream ended without a reply")
    return runtime_pb2.ExpertResponse(tensors=combine_chunks(parts))
