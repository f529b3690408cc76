"""``RemoteSequential``: the model's blocks as one ``nn.Module`` whose computation happens on the swarm."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from hivemind.p2p import PeerID
from torch import nn

from corolla.client.inference_session import InferenceSession
from corolla.client.swarm import SwarmView
from corolla.errors import RemoteCallError
from corolla.log import get_logger
from corolla.net.loop import run_sync
from corolla.net.tensors import STREAM_CHUNK_BYTES, combine_chunks, pack, unpack_tensors
from corolla.protocol.messages import SpanRequest
from corolla.server.handler import BlockServicer

logger = get_logger(__name__)

MAX_UNARY_BYTES = 2 * 2**20  # the transport refuses unary messages over 4 MiB; stream anything bigger than this


class RemoteSequential(nn.Module):
    """Blocks ``start..end-1`` of a model served by the swarm. Sliceable; ``forward`` maps hidden states."""

    def __init__(self, swarm: SwarmView, start: int = 0, end: int | None = None, *, seed: int | None = None):
        super().__init__()
        self.swarm = swarm
        self.start, self.end = start, swarm.num_blocks if end is None else end
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index) -> RemoteSequential:
        if isinstance(index, int):
            index = range(len(self))[index]
            return RemoteSequential(self.swarm, self.start + index, self.start + index + 1)
        if isinstance(index, slice):
            blocks = range(self.start, self.end)[index]
            if blocks.step != 1 or len(blocks) == 0:
                raise IndexError("RemoteSequential supports only non-empty contiguous slices")
            return RemoteSequential(self.swarm, blocks.start, blocks.stop)
        raise TypeError(f"RemoteSequential indices must be int or slice, not {type(index).__name__}")

    def extra_repr(self) -> str:
        return f"blocks={self.start}:{self.end}, model={self.swarm.model_name!r}"

    def inference_session(self, *, max_length: int) -> InferenceSession:
        """Open a session that keeps attention caches on the servers (use in a ``with`` block)."""
        return InferenceSession(self.swarm, start=self.start, end=self.end, max_length=max_length)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [batch, tokens, hidden] through all blocks (no cache), retrying failed servers."""
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            raise NotImplementedError(
                "gradients through remote blocks are not supported yet; run under torch.no_grad()"
            )
        return run_sync(self._forward(hidden_states, attention_mask, position_ids))

    async def _forward(self, hidden, mask, positions) -> torch.Tensor:
        block = self.start
        failures = 0
        while block < self.end:
            route = await asyncio.to_thread(self.swarm.forward_route, block, self.end, self._rng)
            hop = route[0]
            try:
                hidden = await self._call(hop, hidden, mask, positions)
            except Exception as e:
                failures += 1
                if failures > self.swarm.config.max_retries:
                    raise RemoteCallError(f"blocks {hop.start}:{hop.end} failed {failures} times: {e}") from e
                logger.warning("Server %s failed on blocks %d:%d (%s); retrying", hop.peer_id, hop.start, hop.end, e)
                self.swarm.ban(hop.peer_id)
                continue
            block = hop.end
        return hidden

    async def _call(self, hop, hidden, mask, positions) -> torch.Tensor:
        meta = SpanRequest(
            start_block=hop.start,
            end_block=hop.end,
            has_attention_mask=mask is not None,
            has_position_ids=positions is not None,
            output_compression=self.swarm.config.compression,
        ).model_dump()
        tensors = [hidden] + [t for t in (mask, positions) if t is not None]
        request = pack(tensors, meta, compression=self.swarm.config.compression)
        p2p = await self.swarm.p2p()
        stub = BlockServicer.get_stub(p2p, PeerID.from_base58(hop.peer_id))
        timeout = self.swarm.config.request_timeout_s
        if request.ByteSize() <= MAX_UNARY_BYTES:
            response = await stub.rpc_forward(request, timeout=timeout)
            outputs = unpack_tensors(response)
        else:
            outputs = await asyncio.wait_for(_forward_streaming(stub, request), timeout)
        if len(outputs) != 1 or outputs[0].shape != hidden.shape:
            raise RemoteCallError(f"server {hop.peer_id} returned a malformed forward result")
        return outputs[0].to(hidden.dtype)


async def _forward_streaming(stub, request) -> list[torch.Tensor]:
    from hivemind.proto import runtime_pb2
    from hivemind.utils.streaming import split_for_streaming

    async def chunks():
        yield runtime_pb2.ExpertRequest(metadata=request.metadata)
        for tensor in request.tensors:
            for chunk in split_for_streaming(tensor, STREAM_CHUNK_BYTES):
                yield runtime_pb2.ExpertRequest(tensors=[chunk])

    parts = []
    async for response in await stub.rpc_forward_stream(chunks()):
        parts.extend(response.tensors)
    combined = runtime_pb2.ExpertResponse(tensors=combine_chunks(parts))
    return unpack_tensors(combined)
