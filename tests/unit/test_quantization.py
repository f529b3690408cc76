"""Weight quantization of served blocks (int8, NF4): round trips, sizes, layers, and whole spans still computing."""

from __future__ import annotations

import copy
import gc
import logging
import weakref

import pytest
import torch
from torch import nn

import corolla.models.nf4 as nf4
from corolla.models.checkpoint import resolve_checkpoint
from corolla.models.nf4 import NF4_BLOCK, NF4Linear, dequantize_nf4, nf4_codebook, quantize_nf4
from corolla.models.quantization import (
    Int8Linear,
    dequantize_int8,
    quantize_blocks,
    quantize_int8,
    quantized_layers,
    weight_bytes,
)
from corolla.models.span import SpanInputs, load_span
from tests.fixtures.zoo import FAMILIES, zoo_checkpoint

#: bitsandbytes' hard-coded NF4 table (bitsandbytes/functional.py), which QLoRA's construction must reproduce
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
LAYERS = {"int8": Int8Linear, "nf4": NF4Linear}


def random_weight(out_features: int = 192, in_features: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def round_trip(mode: str, weight: torch.Tensor) -> torch.Tensor:
    if mode == "int8":
        return dequantize_int8(*quantize_int8(weight))
    return dequantize_nf4(*quantize_nf4(weight), weight.shape, torch.float32)


# ---- the NF4 code ---------------------------------------------------------------------------------------------------


def test_nf4_codebook_is_qloras():
    code = nf4_codebook()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])
    assert code[0].item() == -1.0 and code[-1].item() == 1.0 and code[7].item() == 0.0
    assert (code < 0).sum().item() == 7 and (code > 0).sum().item() == 8  # asymmetric, so that 0 is exact
    torch.testing.assert_close(code, torch.tensor(BNB_NF4), atol=1e-6, rtol=0)


def test_nf4_picks_the_nearest_code_value_of_each_block():
    weight = random_weight(48, 80)  # 3840 values: 60 blocks
    packed, absmax = quantize_nf4(weight)
    blocks = weight.reshape(-1, NF4_BLOCK)
    torch.testing.assert_close(absmax, blocks.abs().amax(dim=1), atol=0, rtol=0)
    code = nf4_codebook()
    nearest = ((blocks / absmax[:, None]).unsqueeze(-1) - code).abs().argmin(dim=-1)
    expected = (code[nearest] * absmax[:, None]).reshape(weight.shape)
    torch.testing.assert_close(dequantize_nf4(packed, absmax, weight.shape, torch.float32), expected, atol=0, rtol=0)
    assert torch.equal(packed[:4] >> 4, nearest.reshape(-1)[0:8:2].to(torch.uint8))  # high nibble = first value


# ---- round trips and sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "bound"), [("int8", 0.01), ("nf4", 0.10)])
def test_round_trip_relative_error(mode, bound):
    weight = random_weight(256, 384)
    error = relative_error(round_trip(mode, weight), weight)
    print(f"{mode}: relative Frobenius error of a N(0, 0.02^2) 256x384 weight: {error:.4f}")  # noqa: T201
    assert error < bound
    assert error > bound / 20  # really quantized: not a float copy


def test_int8_error_is_at_most_half_a_step_per_row():
    weight = random_weight()
    codes, scale = quantize_int8(weight)
    assert codes.dtype == torch.int8 and codes.shape == weight.shape and scale.shape == (weight.shape[0],)
    assert codes.abs().amax(dim=1).eq(127).all()  # every row uses the full range
    error = (dequantize_int8(codes, scale) - weight).abs()
    assert torch.all(error <= scale[:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("shape", [(192, 320), (33, 17), (1, 7)])
def test_packed_sizes(shape):
    weight = random_weight(*shape)
    float_bytes = weight.numel() * 4
    codes, scale = quantize_int8(weight)
    assert codes.numel() * codes.element_size() == weight.numel() and scale.numel() == shape[0]
    packed, absmax = quantize_nf4(weight)
    blocks = -(-weight.numel() // NF4_BLOCK)
    assert packed.dtype == torch.uint8 and packed.numel() == blocks * NF4_BLOCK // 2 and absmax.numel() == blocks
    assert round_trip("nf4", weight).shape == shape
    if shape == (192, 320):
        int8_bytes, nf4_bytes = codes.numel() + scale.numel() * 4, packed.numel() + absmax.numel() * 4
        assert 0.25 < int8_bytes / float_bytes < 0.26
        assert nf4_bytes / float_bytes == pytest.approx(1 / 8 + 1 / 64)  # 4 bits + one float32 per 64 values


def test_zero_weights_stay_zero_without_nans():
    weight = random_weight(8, 128)
    weight[2] = 0
    for mode in ("int8", "nf4"):
        restored = round_trip(mode, weight)
        assert torch.isfinite(restored).all() and torch.equal(restored[2], torch.zeros(128))


# ---- quantized layers -----------------------------------------------------------------------------------------------


def make_linear(in_features: int = 320, out_features: int = 192, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=0.02)
    if bias:
        nn.init.normal_(linear.bias, std=0.1)
    return linear


@pytest.mark.parametrize(("mode", "bound"), [("int8", 0.015), ("nf4", 0.12)])
def test_quantized_linear_output_is_close_to_float(mode, bound):
    linear = make_linear(bias=False)
    layer = LAYERS[mode].from_linear(linear)
    x = torch.randn(3, 5, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = linear(x), layer(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, x @ layer.dequantized_weight().T, atol=1e-5, rtol=1e-5)
    error = relative_error(got, expected)
    print(f"{mode}: relative error of a quantized 320->192 linear's output: {error:.4f}")  # noqa: T201
    assert error < bound


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bias_stays_float_and_exact(mode):
    linear = make_linear()
    layer = LAYERS[mode].from_linear(linear)
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, linear.bias)
    x = torch.zeros(1, 320)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear.bias[None], atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
@pytest.mark.parametrize(("in_features", "out_features"), [(320, 192), (17, 33), (100, 7)])
def test_forward_in_chunks_equals_the_whole_weight(mode, in_features, out_features, monkeypatch):
    layer = LAYERS[mode].from_linear(make_linear(in_features, out_features))
    x = torch.randn(2, 4, in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = x @ layer.dequantized_weight().T + layer.bias
        monkeypatch.setattr(nf4, "CHUNK_ELEMENTS", 1000)  # several chunks; NF4 rows still start whole blocks
        torch.testing.assert_close(layer(x), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantization_is_deterministic(mode):
    first, second = (LAYERS[mode].from_linear(make_linear()) for _ in range(2))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(first(x), second(x)) and torch.equal(first(x), copy.deepcopy(first)(x))


# ---- whole spans ----------------------------------------------------------------------------------------------------


def span_output(span, seed: int = 3) -> torch.Tensor:
    hidden = torch.randn(2, 7, span.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return span(SpanInputs(hidden_states=hidden))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("mode", "bound"), [("int8", 0.02), ("nf4", 0.2)])
def test_quantized_span_runs_close_to_float(family, mode, bound):
    checkpoint = resolve_checkpoint(str(zoo_checkpoint(family)))
    span = load_span(checkpoint, 1, 4)
    linears = sum(isinstance(m, nn.Linear) for m in span.blocks.modules())
    float_bytes = weight_bytes(span.blocks)
    expected = span_output(span)

    backend = quantize_blocks(span, mode, device="cpu")

    assert backend.startswith(f"corolla-{mode}") and backend.endswith("(CPU)")
    assert not any(isinstance(m, nn.Linear) for m in span.blocks.modules())
    assert len(quantized_layers(span)) == linears >= 3 * 2  # at least attention + MLP projections in every block
    assert weight_bytes(span.blocks) < float_bytes * {"int8": 0.27, "nf4": 0.15}[mode]  # + float32 scales
    got = span_output(span)
    error = relative_error(got, expected)
    print(f"{family} {mode}: {linears} linear layers quantized, relative error of the span output {error:.4f}")  # noqa: T201
    assert torch.isfinite(got).all() and error < bound


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_float_weights_are_released(mode):
    span = load_span(resolve_checkpoint(str(zoo_checkpoint("llama"))), 0, 2)
    weights = [weakref.ref(m.weight) for m in span.blocks.modules() if isinstance(m, nn.Linear)]
    quantize_blocks(span, mode, device="cpu")
    gc.collect()
    assert len(weights) == 14 and all(ref() is None for ref in weights)


def test_moe_experts_stay_float_and_are_logged(caplog):
    span = load_span(resolve_checkpoint(str(zoo_checkpoint("mixtral"))), 0, 2)
    experts = span.blocks[0].mlp.experts
    experts_before = {name: tensor.clone() for name, tensor in experts.named_parameters()}
    logger = logging.getLogger("corolla.models.quantization")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="corolla.models.quantization"):
            backend = quantize_blocks(span, "nf4", device="cpu")
    finally:
        logger.removeHandler(caplog.handler)
    assert len(quantized_layers(span)) == 8  # q, k, v, o in each of the 2 blocks
    for name, tensor in experts.named_parameters():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, experts_before[name])
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert backend in messages and "8 linear layers" in messages and "stay unquantized" in messages
    assert torch.isfinite(span_output(span)).all()


def test_a_module_list_of_blocks_can_be_quantized_directly():
    span = load_span(resolve_checkpoint(str(zoo_checkpoint("qwen2"))), 0, 3)
    quantize_blocks(span.blocks, "int8", device="cpu")
    assert len(quantized_layers(span.blocks)) == 21
    quantize_blocks(span, "int8", device="cpu")  # already quantized: nothing left to replace, nothing breaks
    assert len(quantized_layers(span.blocks)) == 21 and all(isinstance(m, Int8Linear) for m in quantized_layers(span))


def test_none_changes_nothing_and_unknown_modes_are_refused():
    span = load_span(resolve_checkpoint(str(zoo_checkpoint("llama"))), 0, 1)
    assert quantize_blocks(span, "none", device="cpu") == "none"
    assert not quantized_layers(span)
    with pytest.raises(ValueError, match="int4"):
        quantize_blocks(span, "int4", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_cuda_span_runs_close_to_float(mode):  # bitsandbytes when installed, else corolla's own layers on the GPU
    span = load_span(resolve_checkpoint(str(zoo_checkpoint("llama"))), 0, 3, device="cuda")
    hidden = torch.randn(2, 7, span.config.hidden_size, generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        expected = span(SpanInputs(hidden_states=hidden))
        backend = quantize_blocks(span, mode, device="cuda")
        got = span(SpanInputs(hidden_states=hidden))
    assert "CUDA" in backend and len(quantized_layers(span)) == 21
    assert relative_error(got, expected) < {"int8": 0.05, "nf4": 0.2}[mode]
