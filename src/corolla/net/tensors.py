"""Tensors on the wire: hivemind serialization with optional compression, and msgpack metadata."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming

STREAM_CHUNK_BYTES = 2**20  # chunk size of tensors sent over streams (the transport caps unary messages at 4 MiB)

COMPRESSIONS = {name: getattr(runtime_pb2.CompressionType, name) for name in runtime_pb2.CompressionType.keys()}


def compression_type(name: str) -> int:
    """A hivemind CompressionType from its name (NONE, FLOAT16, BFLOAT16?, BLOCKWISE_8BIT, ...)."""
    try:
        return COMPRESSIONS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}") from None


def pack(tensors: Sequence[torch.Tensor], metadata: dict, *, compression: str = "NONE") -> runtime_pb2.ExpertRequest:
    """A request message: tensors (float ones compressed as asked; integer ones always exact) plus metadata."""
    codec = compression_type(compression)
    serialized = [
        serialize_torch_tensor(t, codec if t.is_floating_point() else runtime_pb2.CompressionType.NONE)
        for t in tensors
    ]
    return runtime_pb2.ExpertRequest(tensors=serialized, metadata=MSGPackSerializer.dumps(metadata))


def pack_response(tensors: Sequence[torch.Tensor], metadata: dict, *, compression: str = "NONE"):
    request = pack(tensors, metadata, compression=compression)
    return runtime_pb2.ExpertResponse(tensors=request.tensors, metadata=request.metadata)


def unpack_metadata(message) -> dict:
    """Metadata of a message; ValueError if it is not a msgpack dict."""
    try:
        metadata = MSGPackSerializer.loads(message.metadata) if message.metadata else {}
    except Exception as e:
        raise ValueError(f"metadata is not valid msgpack: {e}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    return metadata


def unpack_tensors(message) -> list[torch.Tensor]:
    """Tensors of a message; ValueError on a tensor that cannot be decoded."""
    try:
        return [deserialize_torch_tensor(t) for t in message.tensors]
    except Exception as e:
        raise ValueError(f"a tensor could not be decoded: {type(e).__name__}: {e}") from None


def starts_tensor(part: runtime_pb2.Tensor) -> bool:
    """Whether a chunk from split_for_streaming is a tensor's first: it alone carries the dtype (and ``chunks``,
    which is 0 for an empty tensor, so it cannot tell on its own)."""
    return bool(part.chunks or part.dtype)


def combine_chunks(parts: list[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
    """Reassemble tensors split by split_for_streaming (``starts_tensor`` says where each begins)."""
    tensors, pending = [], []
    for part in parts:
        if starts_tensor(part) and pending:
            tensors.append(combine_from_streaming(pending))
            pending = []
        pending.append(part)
    if pending:
        tensors.append(combine_from_streaming(pending))
    return tensors
