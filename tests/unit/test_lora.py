"""Server-side LoRA (corolla.models.lora): a span holding PEFT adapters equals PEFT's merged model, block for block."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from corolla.errors import AdapterError
from corolla.models.checkpoint import resolve_checkpoint
from corolla.models.families import family_for
from corolla.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraLinear,
    attach_adapters,
    check_adapter,
    parse_adapter_spec,
    resolve_adapter,
    use_adapter,
)
from corolla.models.quantization import Int8Linear, quantize_blocks
from corolla.models.span import SpanInputs, load_span
from tests.fixtures.adapters import make_adapter, merged_model
from tests.fixtures.zoo import zoo_checkpoint

ATOL = RTOL = 1e-5
NUM_BLOCKS = 6


@functools.cache
def _path() -> str:
    return str(zoo_checkpoint("llama"))


@functools.cache
def _ids() -> torch.Tensor:
    return torch.randint(4, 400, (2, 7), generator=torch.Generator().manual_seed(0))


def _hidden_states(model) -> tuple[torch.Tensor, ...]:
    """What enters each block (index i), from transformers' own run."""
    with torch.no_grad():
        return model(input_ids=_ids(), output_hidden_states=True).hidden_states


def _span_output(span, hidden: torch.Tensor, adapter: str | None) -> torch.Tensor:
    with torch.no_grad(), use_adapter(adapter):
        return span(SpanInputs(hidden_states=hidden))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "plain": make_adapter(_path(), root / "plain", seed=1),
        "rslora": make_adapter(
            _path(), root / "rslora", seed=2, r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "up_proj"]
        ),
        "patterns": make_adapter(
            _path(),
            root / "patterns",
            seed=3,
            target_modules=["q_proj", "gate_proj"],
            rank_pattern={"gate_proj": 2},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32},
            layers_to_transform=[1, 2, 4],
        ),
    }


@pytest.mark.parametrize("kind", ["plain", "rslora", "patterns"])
@pytest.mark.parametrize("blocks", [(0, 3), (2, 5)])
def test_span_with_adapter_equals_peft_merged(adapters, kind, blocks):
    start, end = blocks
    span = load_span(resolve_checkpoint(_path()), start, end)
    attach_adapters(span, [resolve_adapter(str(adapters[kind]))])
    merged = _hidden_states(merged_model(_path(), adapters[kind]))
    base = _hidden_states(AutoModelForCausalLM.from_pretrained(_path()).eval())
    with_adapter = _span_output(span, merged[start], kind)
    torch.testing.assert_close(with_adapter, merged[end], atol=ATOL, rtol=RTOL)
    without = _span_output(span, base[start], None)
    torch.testing.assert_close(without, base[end], atol=ATOL, rtol=RTOL)
    assert not torch.allclose(merged[end], base[end], atol=1e-3)  # the adapter does change the outputs


def test_several_adapters_in_one_span(adapters):
    span = load_span(resolve_checkpoint(_path()), 1, 4)
    attach_adapters(span, [resolve_adapter(str(adapters["plain"])), resolve_adapter(f"other={adapters['rslora']}")])
    for name, kind in (("plain", "plain"), ("other", "rslora")):
        merged = _hidden_states(merged_model(_path(), adapters[kind]))
        torch.testing.assert_close(_span_output(span, merged[1], name), merged[4], atol=ATOL, rtol=RTOL)
    wrapped = [m for m in span.modules() if isinstance(m, LoraLinear)]
    assert wrapped and all(set(m.keys_by_name) <= {"plain", "other"} for m in wrapped)


def test_span_reads_only_its_blocks_tensors(adapters, monkeypatch):
    import corolla.models.lora as lora_module

    read = []
    real_open = lora_module.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(lora_module, "safe_open", Spy)
    span = load_span(resolve_checkpoint(_path()), 4, 6)
    attach_adapters(span, [resolve_adapter(str(adapters["plain"]))])
    assert read and all(".layers.4." in key or ".layers.5." in key for key in read)


def test_adapter_wraps_quantized_layers(adapters):
    span = load_span(resolve_checkpoint(_path()), 0, 2)
    quantize_blocks(span, "int8", device="cpu")
    attach_adapters(span, [resolve_adapter(str(adapters["plain"]))])
    layer = span.blocks[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base, Int8Linear)
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    weights = layer.lora[layer.keys_by_name["plain"]]
    expected = layer.base(x) + weights.scaling * (x @ weights.lora_A.T @ weights.lora_B.T)
    with torch.no_grad(), use_adapter("plain"):
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x))
    assert math.isclose(weights.scaling, 8 / 4)


def test_spec_names():
    assert parse_adapter_spec("/tmp/some/my-lora/") == ("my-lora", "/tmp/some/my-lora")
    assert parse_adapter_spec("./my-lora") == ("my-lora", "./my-lora")
    assert parse_adapter_spec("user/repo-lora") == ("user/repo-lora", "user/repo-lora")
    assert parse_adapter_spec("chat=/x/y") == ("chat", "/x/y")
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_adapter_spec("bad name=/x")


def _rewrite(folder, tmp_path, *, config=None, tensors=None):
    """A copy of the adapter at ``folder`` with its config updated by ``config`` and its tensors by ``tensors``."""
    out = tmp_path / "edited"
    out.mkdir()
    loaded = json.loads((folder / ADAPTER_CONFIG).read_text())
    (out / ADAPTER_CONFIG).write_text(json.dumps({**loaded, **(config or {})}))
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    save_file({**weights, **(tensors or {})}, str(out / ADAPTER_WEIGHTS))
    return out


@pytest.mark.parametrize(
    "config,match",
    [
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"init_lora_weights": "pissa"}, "pissa"),
    ],
)
def test_unsupported_options_are_refused(adapters, tmp_path, config, match):
    with pytest.raises(AdapterError, match=match):
        resolve_adapter(str(_rewrite(adapters["plain"], tmp_path, config=config)))


def test_adapter_of_another_model_is_refused(adapters, tmp_path):
    family = family_for("llama")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    wrong_shape = _rewrite(adapters["plain"], tmp_path, tensors={key: torch.zeros(4, 96)})
    span = load_span(resolve_checkpoint(_path()), 0, 1)
    with pytest.raises(AdapterError, match="do not fit"):
        attach_adapters(span, [resolve_adapter(str(wrong_shape))])
    with pytest.raises(AdapterError, match="blocks \\[4, 5\\].*4 blocks"):
        check_adapter(resolve_adapter(str(adapters["plain"])), family, 4)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ADAPTER_CONFIG).write_text((adapters["plain"] / ADAPTER_CONFIG).read_text())
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, str(outside / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterError, match="not LoRA weights of the llama blocks"):
        check_adapter(resolve_adapter(str(outside)), family, NUM_BLOCKS)
    (tmp_path / "x").mkdir()
    nope = "base_model.model.model.layers.0.self_attn.nope.lora_"
    missing_module = _rewrite(
        adapters["plain"],
        tmp_path / "x",
        tensors={nope + "A.weight": torch.zeros(4, 64), nope + "B.weight": torch.zeros(64, 4)},
    )
    with pytest.raises(AdapterError, match="self_attn.nope"):
        attach_adapters(load_span(resolve_checkpoint(_path()), 0, 1), [resolve_adapter(str(missing_module))])


def test_missing_folder_or_files(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait in tests
    with pytest.raises(AdapterError, match=ADAPTER_WEIGHTS):
        (tmp_path / "empty").mkdir()
        resolve_adapter(str(tmp_path / "empty"))
    with pytest.raises(AdapterError, match="not in the Hugging Face cache"):
        resolve_adapter("nobody-xyz/no-such-adapter-corolla")


def test_server_config_adapter_names(tmp_path):
    from corolla.server.config import SpanConfig

    (tmp_path / "mine").mkdir()
    config = SpanConfig(adapters=(str(tmp_path / "mine"), "chat=/x", "org/lora"))
    assert config.adapter_names() == ("mine", "chat", "org/lora")
    with pytest.raises(ValueError, match="same name"):
        SpanConfig(adapters=("/a/lora", "/b/lora"))
