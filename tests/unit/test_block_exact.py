"""A served span computes exactly what the same blocks compute inside the transformers model, for every family.

The reference is the family's ``*ForCausalLM`` loaded by transformers from the tiny zoo checkpoint, run on a
left-padded batch the way ``generate`` runs it (attention mask with leading zeros in one row, position ids =
cumsum(mask) - 1). Forward hooks on its decoder layers record the tensor entering and leaving every block, so a span
``start:end`` is fed exactly what enters block ``start`` and compared with what leaves block ``end - 1``, before the
final norm. Only non-padded positions are compared: the outputs at padded positions are arbitrary.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.models.checkpoint import INDEX_NAME, Checkpoint, resolve_checkpoint
from corolla.models.families import family_for
from corolla.models.span import SpanInputs, SpanModel, load_span
from tests.fixtures.zoo import FAMILIES, zoo_checkpoint

ATOL = RTOL = 1e-5
BATCH, LENGTH, PADDED = 2, 9, 3  # row 1 is left-padded with PADDED zeros in its attention mask
NUM_BLOCKS = 6  # every zoo checkpoint
SPANS = [(0, 6), (0, 3), (2, 4), (3, 6), (5, 6)]


# ---- reference: the transformers model with hooks on its blocks -------------------------------------------------


@dataclass(frozen=True)
class Reference:
    mask: torch.Tensor  # [batch, length] of 0/1
    positions: torch.Tensor  # [batch, length]
    block_inputs: list[torch.Tensor]  # what enters block i
    block_outputs: list[torch.Tensor]  # what leaves block i
    hidden_states: tuple[torch.Tensor, ...]  # transformers' output_hidden_states

    @property
    def valid(self) -> torch.Tensor:
        return self.mask.bool()


@functools.cache
def _checkpoint(family: str) -> Checkpoint:
    return resolve_checkpoint(str(zoo_checkpoint(family)))


@functools.cache
def _hf_model(family: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(zoo_checkpoint(family)), dtype=torch.float32).eval()


def _hf_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    spec = family_for(model.config.model_type)
    return getattr(getattr(model, spec.base_model_attr), spec.layers_attr)


def _hf_final_norm(model: torch.nn.Module) -> torch.nn.Module:
    spec = family_for(model.config.model_type)
    return getattr(getattr(model, spec.base_model_attr), spec.final_norm_attr)


@functools.cache
def _reference(family: str, position_stride: int = 1) -> Reference:
    model = _hf_model(family)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, LENGTH), generator=generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, :PADDED] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0) * position_stride

    blocks = _hf_blocks(model)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def record_input(index, module, args, kwargs):
        inputs[index] = (args[0] if args else kwargs["hidden_states"]).clone()

    def record_output(index, module, args, output):
        outputs[index] = (output[0] if isinstance(output, tuple) else output).clone()

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(functools.partial(record_input, index), with_kwargs=True))
        handles.append(block.register_forward_hook(functools.partial(record_output, index)))
    kwargs = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    if "position_ids" in inspect.signature(model.forward).parameters:  # BLOOM has ALiBi, computed from the mask
        kwargs["position_ids"] = positions
    try:
        with torch.no_grad():
            out = model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(inputs) == sorted(outputs) == list(range(NUM_BLOCKS))
    return Reference(
        mask=mask,
        positions=positions,
        block_inputs=[inputs[i] for i in range(NUM_BLOCKS)],
        block_outputs=[outputs[i] for i in range(NUM_BLOCKS)],
        hidden_states=tuple(out.hidden_states),
    )


@functools.cache
def _span(family: str, start: int, end: int) -> SpanModel:
    return load_span(_checkpoint(family), start, end)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, valid: torch.Tensor) -> None:
    """Equal at the non-padded positions (``valid``: [batch, tokens] bool)."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual[valid], expected[valid], atol=ATOL, rtol=RTOL)


def _step_by_step(span: SpanModel, ref: Reference, cache, *, prefill: int, start=None, end=None) -> torch.Tensor:
    """Feed ``prefill`` tokens, then the rest one at a time, with the full-length mask and the new positions."""
    first = ref.block_inputs[span.start if start is None else start]
    outputs = []
    bounds = [0, *range(prefill, LENGTH + 1)]
    for a, b in zip(bounds, bounds[1:]):
        inputs = SpanInputs(
            hidden_states=first[:, a:b], attention_mask=ref.mask[:, :b], position_ids=ref.positions[:, a:b]
        )
        with torch.no_grad():
            outputs.append(span(inputs, cache, start=start, end=end))
        assert cache.get_seq_length() == b
    return torch.cat(outputs, dim=1)


def _crop_to(cache, length: int) -> None:
    """Keep the first ``length`` tokens of ``cache`` (transformers 5: ``crop`` takes minus the tokens to drop)."""
    cache.crop(length - cache.get_seq_length())
    assert cache.get_seq_length() == length


def _full_inputs(ref: Reference, start: int) -> SpanInputs:
    return SpanInputs(hidden_states=ref.block_inputs[start], attention_mask=ref.mask, position_ids=ref.positions)


# ---- 0. what transformers' hidden_states hold ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_are_block_inputs_then_final_norm(family):
    """hidden_states[i] enters block i (BLOOM: after word_embeddings_layernorm); the last one is final-normed."""
    ref = _reference(family)
    assert len(ref.hidden_states) == NUM_BLOCKS + 1
    for i in range(NUM_BLOCKS):
        torch.testing.assert_close(ref.hidden_states[i], ref.block_inputs[i], atol=0, rtol=0)
    for i in range(NUM_BLOCKS - 1):
        torch.testing.assert_close(ref.block_outputs[i], ref.block_inputs[i + 1], atol=0, rtol=0)
    with torch.no_grad():
        normed = _hf_final_norm(_hf_model(family))(ref.block_outputs[-1])
    torch.testing.assert_close(ref.hidden_states[-1], normed, atol=0, rtol=0)


# ---- 1. a span equals the same blocks inside the model --------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("start", "end"), SPANS)
def test_span_equals_the_models_blocks(family, start, end):
    ref = _reference(family)
    span = _span(family, start, end)
    assert len(span.blocks) == end - start
    with torch.no_grad():
        out = span(_full_inputs(ref, start))
    _assert_close(out, ref.block_outputs[end - 1], ref.valid)
    if end == NUM_BLOCKS:  # the span ends before the final norm: applying it gives transformers' last hidden state
        with torch.no_grad():
            normed = _hf_final_norm(_hf_model(family))(out)
        _assert_close(normed, ref.hidden_states[-1], ref.valid)


@pytest.mark.parametrize("family", FAMILIES)
def test_span_uses_the_given_position_ids(family):
    """Positions 0, 2, 4, ...: rotary attention sees other distances than with consecutive positions.

    (With left padding the consecutive positions of a padded row only shift by a constant, which rotary attention
    cannot tell apart from the default positions; this catches position ids being dropped on the way.)
    """
    if family == "bloom":
        pytest.skip("ALiBi: BLOOM derives positions from the attention mask and takes no position ids")
    ref = _reference(family, position_stride=2)
    default = _reference(family)
    assert not torch.allclose(ref.block_outputs[-1][ref.valid], default.block_outputs[-1][ref.valid], atol=1e-3)
    span = _span(family, 0, NUM_BLOCKS)
    with torch.no_grad():
        out = span(_full_inputs(ref, 0))
    _assert_close(out, ref.block_outputs[-1], ref.valid)
    cached = _step_by_step(span, ref, span.new_cache(), prefill=4)
    _assert_close(cached, ref.block_outputs[-1], ref.valid)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_row_without_mask_or_positions(family):
    """attention_mask=None, position_ids=None mean all ones / consecutive after the cache (row 0 is unpadded)."""
    ref = _reference(family)
    x, expected = ref.block_inputs[0][:1], ref.block_outputs[-1][:1]
    span = _span(family, 0, NUM_BLOCKS)
    cache = span.new_cache()
    with torch.no_grad():
        full = span(SpanInputs(hidden_states=x))
        steps = [span(SpanInputs(hidden_states=x[:, :4]), cache)]
        steps += [span(SpanInputs(hidden_states=x[:, t : t + 1]), cache) for t in range(4, LENGTH)]
    torch.testing.assert_close(full, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_span_weights_are_the_checkpoints(family):
    """Every block parameter/buffer is the checkpoint's (a misnamed key would silently be randomly initialized)."""
    start, end = 2, 4
    span = _span(family, start, end)
    model_blocks = _hf_blocks(_hf_model(family))
    for local, index in enumerate(range(start, end)):
        ours, theirs = span.blocks[local].state_dict(), model_blocks[index].state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=0, msg=f"block {index}: {name}")
    assert not any(p.requires_grad for p in span.parameters())
    assert not span.training


# ---- 2. step by step with the KV cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("start", "end"), [(0, 6), (2, 5)])
@pytest.mark.parametrize("prefill", [1, 4])
def test_cached_steps_equal_the_full_forward(family, start, end, prefill):
    ref = _reference(family)
    span = _span(family, start, end)
    out = _step_by_step(span, ref, span.new_cache(), prefill=prefill)
    _assert_close(out, ref.block_outputs[end - 1], ref.valid)


# ---- 3. a sub-range of the hosted blocks ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sub_range_equals_those_blocks(family):
    ref = _reference(family)
    span = _span(family, 0, NUM_BLOCKS)
    layer_indices = [(m, m.layer_idx) for m in span.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    with torch.no_grad():
        out = span(_full_inputs(ref, 2), start=2, end=4)
    _assert_close(out, ref.block_outputs[3], ref.valid)

    cache = span.new_cache(2, 4)
    cached = _step_by_step(span, ref, cache, prefill=4, start=2, end=4)
    _assert_close(cached, ref.block_outputs[3], ref.valid)

    # the sub-range left the hosted span as it was: layer indices restored, the full span still exact
    assert all(m.layer_idx == index for m, index in layer_indices)
    assert len(span.blocks) == NUM_BLOCKS
    with torch.no_grad():
        full = span(_full_inputs(ref, 0))
    _assert_close(full, ref.block_outputs[-1], ref.valid)


@pytest.mark.parametrize(("start", "end"), [(1, 3), (2, 5), (3, 3), (4, 2)])
def test_sub_range_outside_the_hosted_span_is_refused(start, end):
    span = _span("llama", 2, 4)
    with pytest.raises(ValueError, match="not within the hosted span 2:4"):
        span(_full_inputs(_reference("llama"), 2), start=start, end=end)


# ---- 4. loading reads only the span's tensors -----------------------------------------------------------------------


class _ReadSpy:
    """Wraps ``safe_open``: records which shards are opened with it (corolla reads shards without it)."""

    def __init__(self, real_safe_open):
        self.real, self.opened = real_safe_open, []

    def __call__(self, filename, *args, **kwargs):
        self.opened.append(Path(filename).name)
        return self.real(filename, *args, **kwargs)


_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


@pytest.mark.parametrize("family", FAMILIES)
def test_loading_reads_only_the_spans_tensors(family, monkeypatch):
    """The bytes read from the shards are exactly those of the span's tensors (reads through the page cache here,
    so that every read is exactly what was asked; ``test_span_loading`` checks the pages a real load brings in)."""
    start, end = 3, 5  # in every zoo checkpoint, some shards hold none of these blocks
    checkpoint = _checkpoint(family)
    weight_map = json.loads((checkpoint.folder / INDEX_NAME).read_text())["weight_map"]
    wanted = {k for k in weight_map if (m := _BLOCK_INDEX.search(k)) and start <= int(m[1]) < end}
    wanted_shards = {weight_map[k] for k in wanted}
    assert wanted and wanted_shards < set(weight_map.values()), "the test needs a shard holding none of the blocks"

    import os

    import safetensors
    import transformers.modeling_utils

    from corolla.models import tensor_reader

    spy = _ReadSpy(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", spy)
    monkeypatch.setattr(transformers.modeling_utils, "safe_open", spy)
    monkeypatch.setattr(tensor_reader, "_libc", lambda: None)  # no O_DIRECT: no reads rounded to whole pages
    ranges: list[tuple[str, int, int]] = []
    real_preadv = os.preadv

    def preadv(fd, buffers, offset, *args):
        count = real_preadv(fd, buffers, offset, *args)
        ranges.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, offset + count))
        return count

    monkeypatch.setattr(os, "preadv", preadv)
    span = load_span(checkpoint, start, end)

    assert spy.opened == []
    expected = []
    for shard in sorted(wanted_shards):
        header = tensor_reader.read_header(checkpoint.folder / shard)
        expected += [(shard, e.begin, e.end) for k, e in header.items() if k in wanted and e.num_bytes]
    assert _merged(ranges) == _merged(expected)  # each needed byte, no other, and no other shard
    assert len(span.blocks) == end - start


def _merged(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    merged: list[tuple[str, int, int]] = []
    for name, begin, end in sorted(ranges):
        if merged and merged[-1][0] == name and merged[-1][2] >= begin:
            merged[-1] = (name, merged[-1][1], max(merged[-1][2], end))
        else:
            merged.append((name, begin, end))
    return merged


# ---- 5. cache crop: repeated steps are idempotent -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("start", "end"), [(0, 6), (2, 4)])
def test_crop_then_refeed_gives_the_same_outputs(family, start, end):
    """Crop to ``m`` tokens and feed tokens ``m..`` again: the same outputs (how a server replays a step)."""
    ref = _reference(family)
    span = _span(family, 0, NUM_BLOCKS)  # (2, 4) runs as a sub-range of the hosted 0:6
    cache = span.new_cache(start, end)
    first = _step_by_step(span, ref, cache, prefill=4, start=start, end=end)
    _assert_close(first, ref.block_outputs[end - 1], ref.valid)
    x = ref.block_inputs[start]

    for m in (LENGTH - 1, 5, PADDED, 0):  # the last step again, a few steps back, into the padding, everything
        _crop_to(cache, m)
        inputs = SpanInputs(hidden_states=x[:, m:], attention_mask=ref.mask, position_ids=ref.positions[:, m:])
        with torch.no_grad():
            again = span(inputs, cache, start=start, end=end)
        assert cache.get_seq_length() == LENGTH
        _assert_close(again, first[:, m:], ref.valid[:, m:])

    # one step at a time, each one repeated
    _crop_to(cache, 4)
    for t in range(4, LENGTH):
        inputs = SpanInputs(
            hidden_states=x[:, t : t + 1],
            attention_mask=ref.mask[:, : t + 1],
            position_ids=ref.positions[:, t : t + 1],
        )
        with torch.no_grad():
            once = span(inputs, cache, start=start, end=end)
            _crop_to(cache, t)
            twice = span(inputs, cache, start=start, end=end)
        torch.testing.assert_close(twice, once, atol=0, rtol=0)
        _assert_close(twice, first[:, t : t + 1], ref.valid[:, t : t + 1])


def test_cache_crop_takes_tokens_to_remove_not_a_length():
    """transformers 5's ``DynamicCache.crop(n)`` drops ``-n`` tokens; an absolute length (n > 0) is refused."""
    ref = _reference("llama")
    span = _span("llama", 0, 2)
    cache = span.new_cache()
    with torch.no_grad():
        span(_full_inputs(ref, 0), cache)
    with pytest.raises(ValueError, match="positive value"):
        cache.crop(5)
    cache.crop(-2)
    assert cache.get_seq_length() == LENGTH - 2
