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


# ---- the reader: exact tensors, only the span's bytes, bounded memory -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_span_equals_the_same_blocks_of_transformers_own_model(family, dtype):
    """Every parameter and buffer of a loaded span is exactly that of transformers' whole model loaded in
    ``dtype`` (its own loader, not corolla's)."""
    from transformers import AutoModelForCausalLM

    path = str(zoo_checkpoint(family))
    span = load_span(resolve_checkpoint(path), 1, 3, dtype=dtype)
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    spec = span.family
    layers = getattr(getattr(whole, spec.base_model_attr), spec.layers_attr)
    for i, block in enumerate(span.blocks):
        reference = dict([*layers[1 + i].named_parameters(), *layers[1 + i].named_buffers()])
        own = dict([*block.named_parameters(), *block.named_buffers()])
        assert own.keys() == reference.keys()
        for name, tensor in reference.items():
            assert own[name].dtype == tensor.dtype and torch.equal(own[name], tensor), (family, i, name)


@pytest.mark.parametrize("path_kind", ["direct", "page cache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_read_tensors_equals_safetensors(family, path_kind, monkeypatch):
    """Both ways of reading (O_DIRECT, as for files not in the page cache; and through the page cache) give
    exactly the tensors safetensors gives, for every shard of every family."""
    from safetensors.torch import load_file

    from corolla.models import tensor_reader

    if path_kind == "direct":
        if tensor_reader._libc() is None or not hasattr(__import__("os"), "O_DIRECT"):
            pytest.skip("no O_DIRECT here")
        monkeypatch.setattr(tensor_reader._File, "_cached", lambda self, entry: False)
    else:
        monkeypatch.setattr(tensor_reader, "_libc", lambda: None)
    for shard in sorted(zoo_checkpoint(family).glob("*.safetensors")):
        expected = load_file(str(shard))
        got = tensor_reader.read_tensors(shard, list(expected))
        assert got.keys() == expected.keys()
        for key, tensor in expected.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), (shard.name, key)


def test_a_truncated_shard_is_reported_not_read_short(tmp_path):
    from safetensors.torch import save_file

    from corolla.errors import ModelNotFoundError
    from corolla.models.tensor_reader import read_tensors

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(1000), "b": torch.zeros(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    assert torch.equal(read_tensors(path, ["a"])["a"], torch.ones(1000))  # what is there can still be read
    with pytest.raises(ModelNotFoundError, match="truncated"):
        read_tensors(path, ["b"])


def _write_llama_checkpoint(folder, *, hidden: int, intermediate: int, layers: int, dtype: torch.dtype) -> dict:
    """A LlamaForCausalLM checkpoint with random block weights only, in safetensors shards cut every 1.5 blocks
    (so that shards hold blocks on both sides of a span). Returns the index's weight map."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=32, tie_word_embeddings=False,
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {f"model.{k}": v.shape for k, v in LlamaModel(config).state_dict().items() if k.startswith("layers.")}
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}
    block_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if n.startswith("model.layers.0."))
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.numel() * tensor.element_size() > 1.5 * block_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.numel() * tensor.element_size()
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / filename))
        weight_map.update(dict.fromkeys(shard, filename))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _evict(paths) -> bool:
    """Drop ``paths`` from the page cache; False if they are still cached (a file system that keeps them)."""
    import os

    from corolla.models.tensor_reader import cached_bytes

    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    cached = [cached_bytes(path) for path in paths]
    return None not in cached and sum(cached) < 0.05 * sum(path.stat().st_size for path in paths)


def _read_bytes() -> int:
    from pathlib import Path

    lines = Path("/proc/self/io").read_text().splitlines()
    return int(next(line for line in lines if line.startswith("read_bytes:")).split()[1])


def test_no_byte_of_a_block_outside_the_span_is_read(tmp_path):
    """From a cold page cache, loading blocks 2:4 of 6 (shards mixing them with blocks 1 and 4) brings no page of
    another block's tensors into the page cache (what a loader reading or mapping whole shards would do) and reads
    from the disk only about the span's bytes (what a loader reading whole shards with O_DIRECT would exceed)."""
    import os
    from pathlib import Path

    from corolla.models.checkpoint import parse_block_key
    from corolla.models.tensor_reader import cached_bytes, read_header

    if not Path("/proc/self/io").exists() or not hasattr(os, "posix_fadvise"):
        pytest.skip("needs Linux's /proc/self/io and posix_fadvise")
    weight_map = _write_llama_checkpoint(tmp_path, hidden=256, intermediate=1024, layers=6, dtype=torch.float32)
    shards = sorted({tmp_path / name for name in weight_map.values()})
    start, end = 2, 4
    inside, outside = [], []
    for shard in shards:
        for key, entry in read_header(shard).items():
            (inside if start <= parse_block_key(key)[0] < end else outside).append((shard, entry))
    span_bytes = sum(entry.num_bytes for _, entry in inside)
    mixed = {shard for shard, _ in inside} & {shard for shard, _ in outside}
    assert len(mixed) >= 2, "the checkpoint must have shards holding blocks inside and outside the span"
    if not _evict(shards):
        pytest.skip("the page cache cannot be evicted on this file system")
    checkpoint = resolve_checkpoint(str(tmp_path))
    before = _read_bytes()
    span = load_span(checkpoint, start, end)
    read = _read_bytes() - before

    assert len(span.blocks) == end - start
    page = os.sysconf("SC_PAGE_SIZE")
    for shard, entry in outside:
        # the page an outside tensor shares with a span tensor or the header may be cached; no other
        whole_pages = cached_bytes(shard, -(-entry.begin // page) * page, entry.end // page * page)
        assert whole_pages == 0, (shard.name, entry)
    if read == 0:
        pytest.skip("this file system does not account read bytes (/proc/self/io)")
    whole_shards = sum(shard.stat().st_size for shard in mixed | {shard for shard, _ in inside})
    assert span_bytes * 0.99 <= read <= span_bytes + len(shards) * (256 << 10), (read, span_bytes, whole_shards)


_MEMORY_PROBE = """
import json, sys
from pathlib import Path
import torch, transformers.models.llama.modeling_llama
from corolla.models.checkpoint import resolve_checkpoint
from corolla.models.span import load_span
def status(field):  # kB
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field)).split()[1])
Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
rss = status("VmRSS:")
span = load_span(resolve_checkpoint(sys.argv[1]), 1, 9, dtype=torch.bfloat16)
span_bytes = sum(p.numel() * p.element_size() for p in span.blocks.parameters())
print(json.dumps({"growth": (status("VmHWM:") - rss) * 1024, "span_bytes": span_bytes}))
"""


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_loading_takes_about_the_spans_bytes_of_memory(stored, tmp_path):
    """A ~190 MB bfloat16 span, from a bfloat16 checkpoint and from a float32 one (cast while reading): the peak
    resident memory of a fresh process grows by at most 1.3x the span's bytes (it was ~2x: tensors read, then
    copied into the model). The peak is the process's own VmHWM, reset after the imports: ``ru_maxrss`` of a
    child starts at its parent's peak (the memory map it had before exec), here pytest's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/statm").exists():
        pytest.skip("needs Linux's /proc")
    _write_llama_checkpoint(tmp_path, hidden=1024, intermediate=2816, layers=10, dtype=stored)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["span_bytes"] > 150e6
    assert result["growth"] <= 1.3 * result["span_bytes"], result
