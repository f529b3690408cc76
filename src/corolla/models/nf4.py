"""4-bit NormalFloat (NF4) weights, blockwise, as defined by QLoRA (Dettmers et al., 2023), in plain torch.

A weight is flattened and cut into blocks of :data:`NF4_BLOCK` values; each block is divided by its absolute maximum
(kept as one float32 scale per block) and every normalized value is replaced by the index of the nearest of the 16
NF4 code values. Two 4-bit indices are packed into one uint8 (first value in the high nibble). Storage is therefore
0.5 byte per weight plus 4 bytes per block: 0.5625 byte per weight, about 14% of float32.

:class:`NF4Linear` keeps only the packed codes and the scales; its forward dequantizes the weight into the input's
dtype, a chunk of rows at a time (:func:`chunked_linear`), and calls ``F.linear``. It runs on any device.
"""

from __future__ import annotations

import math
from math import gcd

import torch
import torch.nn.functional as F
from torch import nn

NF4_BLOCK = 64
#: weights dequantized per chunk by :func:`chunked_linear`: 1 MiB of float32 stays in a core's L2 cache and avoids
#: allocating (and page-faulting) a whole float weight on every forward. Measured here (1 thread, 1 token, 4096x4096):
#: int8 42 ms -> 5.7 ms (float32: 5.1 ms), nf4 129 ms -> 19 ms; at 576x1536 chunking changes nothing.
CHUNK_ELEMENTS = 1 << 18

#: QLoRA's offset: the outermost quantiles are taken at 1 - delta, delta = (1/30 + 1/32) / 2, rather than at 1 (an
#: infinite quantile). Both halves start at the same offset, so after normalization the code ends exactly at -1 and +1.
_NF4_OFFSET = 1.0 - 0.5 * (1.0 / 32.0 + 1.0 / 30.0)


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 code values, ascending, float32: normal quantiles scaled to [-1, 1] with an exact zero.

    Built as QLoRA builds it: 8 positive values ``icdf(linspace(offset, 0.5, 9)[:-1])``, 7 negative values
    ``-icdf(linspace(offset, 0.5, 8)[:-1])`` and 0, all divided by the largest one. Asymmetric (8 positive, 7
    negative) so that zero is represented exactly. Equals bitsandbytes' hard-coded NF4 table to float32 precision.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(_NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(_NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).to(torch.float32)


NF4_CODE = nf4_codebook()
#: midpoints between consecutive code values: bucketize(x, _MIDPOINTS) is the index of the nearest code value
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
#: byte -> (code value of its high nibble, code value of its low nibble), each pair viewed as one int64, so that one
#: ``index_select`` dequantizes two weights. Measured on this CPU for a 1536x576 weight: ~0.4 ms, against ~2.5 ms for
#: ``F.embedding`` on a [256, 2] float table and ~6 ms for indexing a 16-entry table with unpacked nibbles.
_PAIR_TABLE = torch.stack([NF4_CODE[torch.arange(256) >> 4], NF4_CODE[torch.arange(256) & 15]], dim=1)
_PAIR_TABLE_I64 = _PAIR_TABLE.contiguous().view(torch.int64).view(-1)
_TABLES: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    if device not in _TABLES:
        _TABLES[device] = _PAIR_TABLE_I64.to(device)
    return _TABLES[device]


def quantize_nf4(weight: torch.Tensor, block: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 codes [ceil(n / block) * block / 2], float32 absmax per block [ceil(n / block)]) of ``weight``.

    The flattened weight is zero-padded up to a whole number of blocks (``block`` must be even).
    """
    if block <= 0 or block % 2:
        raise ValueError(f"the NF4 block size must be a positive even number, got {block}")
    flat = weight.detach().reshape(-1).to(torch.float32)
    padded = math.ceil(flat.numel() / block) * block
    blocks = F.pad(flat, (0, padded - flat.numel())).view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.bucketize(normalized, _MIDPOINTS.to(flat.device)).to(torch.uint8).view(-1, 2)
    packed = (codes[:, 0] << 4) | codes[:, 1]
    return packed.contiguous(), absmax.contiguous()


def dequantize_nf4(
    packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The weight of ``shape`` in ``dtype`` rebuilt from :func:`quantize_nf4`'s output."""
    pairs = _pair_table(packed.device).index_select(0, packed.long())
    values = pairs.view(torch.float32).view(absmax.numel(), -1) * absmax.unsqueeze(1)
    return values.view(-1)[: math.prod(shape)].view(shape).to(dtype)


def chunked_linear(
    x: torch.Tensor, weight_rows, out_features: int, in_features: int, row_multiple: int = 1
) -> torch.Tensor:
    """``F.linear(x, W)`` where ``weight_rows(first, last)`` returns rows ``first..last-1`` of W in x's dtype.

    Rows are requested in chunks of about :data:`CHUNK_ELEMENTS` weights (a multiple of ``row_multiple`` rows).
    Shared by the int8 and NF4 layers.
    """
    rows = max(1, CHUNK_ELEMENTS // in_features // row_multiple) * row_multiple
    if rows >= out_features:
        return F.linear(x, weight_rows(0, out_features))
    starts = range(0, out_features, rows)
    chunks = [F.linear(x, weight_rows(first, min(first + rows, out_features))) for first in starts]
    return torch.cat(chunks, dim=-1)


class NF4Linear(nn.Module):
    """``nn.Linear`` with a blockwise NF4 weight (dequantized on every forward) and a float bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        bias: torch.Tensor | None,
        block: int = NF4_BLOCK,
    ):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = NF4_BLOCK) -> NF4Linear:
        packed, absmax = quantize_nf4(linear.weight, block)
        return cls(linear.in_features, linear.out_features, packed, absmax, linear.bias, block)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._weight_rows(0, self.out_features, dtype)

    def _weight_rows(self, first: int, last: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``first..last-1`` of the weight; ``first * in_features`` must start a block."""
        first_block, last_block = first * self.in_features // self.block, -(-last * self.in_features // self.block)
        half = self.block // 2
        packed, absmax = self.packed[first_block * half : last_block * half], self.absmax[first_block:last_block]
        return dequantize_nf4(packed, absmax, (last - first, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = lambda first, last: self._weight_rows(first, last, x.dtype)
        row_multiple = self.block // gcd(self.in_features, self.block)  # so that every chunk starts a block
        out = chunked_linear(x, rows, self.out_features, self.in_features, row_multiple)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"
