"""Do two servers agree on a span's output? And when three answered, which ones lie?

A client verifies a server by sending the same inputs to a second server of the same blocks and comparing the two
outputs (hidden states [batch, tokens, hidden] or their gradients). Honest servers differ only by rounding: another
dtype, quantization, kernel or batch shape. So the comparison is relative, per token (a lie about one position of a
long prefill must not drown in the others): ``token_error`` is max over tokens of ``‖a_t − b_t‖ / ‖b_t‖``, and two
outputs agree when it is within the tolerance of the coarsest of the servers' number formats over that many blocks
(``tolerance``).

What it cannot tell apart: a lie smaller than that tolerance (over 10 blocks: 0.2 % of a hidden state's norm between
float32 servers, 5 % with a bfloat16 server, 10 % with int8 weights, 76 % with nf4 weights: against 4-bit servers only
gross lies show), and a majority of colluding servers that tell the same lie.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Rounding differences grow with the number of blocks a span runs. Measured on SmolLM2-135M (real token embeddings,
# 48 tokens), per-token relative error against float32, over 5 and 30 blocks: bfloat16 0.0105 / 0.038, int8 weights
# 0.016 / 0.072, nf4 weights 0.14 / 0.43; float32 prefill vs step-by-step decoding 5e-7 / 1.6e-6. All fit
# c * blocks^0.75 with the c below (float16 from its 3 more mantissa bits than bfloat16); the tolerance is 3x that.
_DTYPE_C = {"float32": 1e-4, "float64": 1e-4, "float16": 4e-4, "bfloat16": 3e-3}
_QUANT_C = {"none": 0.0, "int8": 6e-3, "nf4": 4.5e-2}
_UNKNOWN_DTYPE_C = _DTYPE_C["bfloat16"]  # a server that announces no dtype
_UNKNOWN_QUANT_C = _QUANT_C["nf4"]  # nor a known quantization
_MARGIN = 3.0


def tolerance(formats: Sequence[tuple[str | None, str | None]], blocks: int) -> float:
    """The largest per-token relative error that honest servers with these (dtype, quantization) pairs may show
    over ``blocks`` blocks: that of the coarsest format among them."""
    worst = 0.0
    for dtype, quant in formats:
        dtype = (dtype or "").removeprefix("torch.")
        quant_c = _QUANT_C.get(quant or "none", _UNKNOWN_QUANT_C)
        worst = max(worst, _DTYPE_C.get(dtype, _UNKNOWN_DTYPE_C), quant_c)
    return _MARGIN * worst * max(1, blocks) ** 0.75


def token_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over positions of ‖a − b‖ / ‖b‖ along the last dimension (infinite for NaN, Inf or a shape mismatch)."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    difference = (a - b).norm(dim=-1)
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-12)
    return float((difference / scale).max()) if difference.numel() else 0.0


def agree(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return token_error(a, b) <= tol


def majority(outputs: Sequence[torch.Tensor], tol: float) -> list[int] | None:
    """The indices of the outputs that agree with a strict majority of all of them, or None when no output does
    (e.g. three servers that all disagree: the client cannot tell who lies and must ask more servers)."""
    n = len(outputs)
    for i in range(n):
        group = [j for j in range(n) if j == i or agree(outputs[i], outputs[j], tol)]
        if 2 * len(group) > n:
            return group
    return None
