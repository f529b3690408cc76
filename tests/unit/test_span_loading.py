"""A span built directly from its tensors equals the one transformers' from_pretrained builds (the fallback)."""

from __future__ import annotations

import pytest
import torch

from corolla.models import span as span_module
from corolla.models.checkpoint import resolve_checkpoint
from corolla.models.span import SpanInputs, load_span
from tests.fixtures.zoo import FAMILIES, zoo_checkpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_direct_build_equals_from_pretrained(family, dtype, monkeypatch):
    checkpoint = resolve_checkpoint(str(zoo_checkpoint(family)))
    built = []
    direct = span_module._build_direct

    def spy(*args, **kwargs):
        model = direct(*args, **kwargs)
        built.append(model is not None)
        return model

    monkeypatch.setattr(span_module, "_build_direct", spy)
    fast = load_span(checkpoint, 1, 3, dtype=dtype)
    monkeypatch.setattr(span_module, "_build_direct", lambda *args, **kwargs: None)
    slow = load_span(checkpoint, 1, 3, dtype=dtype)
    assert built == [family != "mixtral"]  # Mixtral's stored experts need transformers' conversion

    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert fast_state.keys() == slow_state.keys()
    for name, tensor in slow_state.items():
        if "embed" in name:  # the span's 1-row embedding is never used
            continue
        assert fast_state[name].dtype == tensor.dtype, name
        assert torch.equal(fast_state[name], tensor), name
    buffers = dict(slow.named_buffers())
    for name, buffer in fast.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    hidden = torch.randn(2, 5, fast.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        assert torch.equal(fast(SpanInputs(hidden_states=hidden), None), slow(SpanInputs(hidden_states=hidden), None))


@pytest.mark.parametrize("family", FAMILIES)
def test_loading_a_span_leaves_the_global_default_dtype_alone(family, monkeypatch):
    """A server loads new blocks (rebalancing) while its compute thread runs: the bfloat16 build must not change
    the process-wide default dtype under that thread, on the direct path or on transformers' from_pretrained
    (Mixtral's checkpoints), which is asked for the default dtype and may only set it to what it already is."""
    import threading

    checkpoint = resolve_checkpoint(str(zoo_checkpoint(family)))
    calls, seen_elsewhere = [], []
    real = torch.set_default_dtype
    monkeypatch.setattr(torch, "set_default_dtype", lambda dtype: (calls.append(dtype), real(dtype)))
    direct = span_module._build_direct

    def build_and_look_from_another_thread(*args, **kwargs):
        model = direct(*args, **kwargs)
        probe = threading.Thread(target=lambda: seen_elsewhere.append(torch.empty(1).dtype))
        probe.start()
        probe.join()
        return model

    monkeypatch.setattr(span_module, "_build_direct", build_and_look_from_another_thread)
    converted = span_module._build_converted

    def convert_and_look_from_another_thread(*args, **kwargs):
        real_set = torch.set_default_dtype

        def set_and_look(dtype):
            real_set(dtype)
            probe = threading.Thread(target=lambda: seen_elsewhere.append(torch.empty(1).dtype))
            probe.start()
            probe.join()

        monkeypatch.setattr(torch, "set_default_dtype", set_and_look)
        try:
            return converted(*args, **kwargs)
        finally:
            monkeypatch.setattr(torch, "set_default_dtype", real_set)

    monkeypatch.setattr(span_module, "_build_converted", convert_and_look_from_another_thread)
    span = load_span(checkpoint, 0, 2, dtype=torch.bfloat16)
    if family == "mixtral":  # from_pretrained sets the default dtype (to float32, what it is), then restores it
        assert seen_elsewhere and set(seen_elsewhere) == {torch.float32}
    else:
        assert calls == [] and seen_elsewhere == [torch.float32]
    assert {p.dtype for p in span.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


def test_a_converted_bfloat16_span_equals_transformers_own_bfloat16_blocks():
    """Mixtral's span loads at the default dtype and casts its parameters afterwards: its weights and buffers are
    exactly those of transformers' whole model loaded in bfloat16."""
    from transformers import AutoModelForCausalLM

    path = str(zoo_checkpoint("mixtral"))
    span = load_span(resolve_checkpoint(path), 1, 3, dtype=torch.bfloat16)
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    reference = {
        name.removeprefix("model."): tensor
        for name, tensor in [*whole.named_parameters(), *whole.named_buffers()]
        if name.startswith(("model.layers.1.", "model.layers.2."))
    }
    own = {name: tensor for name, tensor in [*span.named_parameters(), *span.named_buffers()] if ".layers." in name}
    renamed = {}
    for name, tensor in own.items():
        index = int(name.split(".layers.")[1].split(".")[0])
        suffix = name.split(f".layers.{index}.", 1)[1]
        renamed[f"layers.{index + 1}.{suffix}"] = tensor
    assert reference and renamed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert renamed[name].dtype == tensor.dtype and torch.equal(renamed[name], tensor), name
