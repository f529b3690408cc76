"""The tiny checkpoint zoo: every family builds, shards, loads, runs, tokenizes and is deterministic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

try:
    from tests.fixtures import zoo
except ModuleNotFoundError:  # the repo root is on sys.path only once some tests/ package or conftest is imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fixtures import zoo

FAMILIES = zoo.FAMILIES
build_tiny_checkpoint, tiny_checkpoint, zoo_checkpoint = (
    zoo.build_tiny_checkpoint,
    zoo.tiny_checkpoint,
    zoo.zoo_checkpoint,
)

SENTENCE = "Hello world! The quick brown fox jumps over 42 lazy dogs, doesn't it?"
MAX_CHECKPOINT_BYTES = 4 * 2**20


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a sharded checkpoint, read through its index."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(path / shard)))
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_is_sharded_and_small(family: str) -> None:
    path = zoo_checkpoint(family)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert all((path / shard).is_file() for shard in shards)
    assert not (path / "model.safetensors").exists()
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert total < MAX_CHECKPOINT_BYTES, f"{family} checkpoint is {total} bytes"
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == family
    assert config.num_hidden_layers == 6
    assert config.hidden_size == zoo.HIDDEN


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_and_runs(family: str) -> None:
    path = zoo_checkpoint(family)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1, "random weights should give logits that depend on the input"


def test_llama_uses_grouped_query_attention() -> None:
    config = AutoConfig.from_pretrained(zoo_checkpoint("llama"))
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)


def test_mixtral_has_experts() -> None:
    config = AutoConfig.from_pretrained(zoo_checkpoint("mixtral"))
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips(family: str) -> None:
    path = zoo_checkpoint(family)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(SENTENCE)["input_ids"]
    assert tokenizer.decode(ids) == SENTENCE
    assert ids == zoo.build_tokenizer()(SENTENCE)["input_ids"], "ids must not depend on the family's tokenizer class"
    assert max(ids) < AutoConfig.from_pretrained(path).vocab_size
    assert len(tokenizer) <= AutoConfig.from_pretrained(path).vocab_size
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (zoo.BOS, zoo.EOS, zoo.PAD)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == f"<|user|>\nhi{zoo.EOS}\n<|assistant|>\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_identical_weights(family: str, tmp_path: Path) -> None:
    first = _weights(build_tiny_checkpoint(family, tmp_path / "a"))
    second = _weights(build_tiny_checkpoint(family, tmp_path / "b"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    shared = _weights(zoo_checkpoint(family))
    assert all(torch.equal(first[name], shared[name]) for name in first)


def test_other_seed_gives_other_weights(tmp_path: Path) -> None:
    first = _weights(build_tiny_checkpoint("llama", tmp_path / "a", seed=0))
    other = _weights(build_tiny_checkpoint("llama", tmp_path / "b", seed=1))
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])


def test_num_layers(tmp_path: Path) -> None:
    path = tiny_checkpoint("qwen3", tmp_path, num_layers=2)
    assert AutoConfig.from_pretrained(path).num_hidden_layers == 2
    assert path != tiny_checkpoint("qwen3", tmp_path)


def test_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llama"):
        build_tiny_checkpoint("gpt5", tmp_path)


def test_tiny_checkpoint_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_checkpoint("llama", tmp_path)
    monkeypatch.setattr(zoo, "build_tiny_checkpoint", _fail_build)
    assert tiny_checkpoint("llama", tmp_path) == path


def test_tiny_checkpoint_rebuilds_leftover_without_marker(tmp_path: Path) -> None:
    leftover = tmp_path / "llama"
    leftover.mkdir()
    (leftover / "model-00001-of-00002.safetensors").write_bytes(b"half")
    path = tiny_checkpoint("llama", tmp_path)
    assert path == leftover
    assert (path / zoo.COMPLETE_MARKER).is_file()
    assert len(_weights(path)) > 0


def test_tiny_checkpoint_keeps_winner_of_a_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process publishes first, between our build and our rename: we keep theirs and clean up ours."""
    real_build = zoo.build_tiny_checkpoint

    def build_and_lose_the_race(family: str, path: Path, **kwargs) -> Path:
        real_build(family, tmp_path / "bloom", **kwargs)
        (tmp_path / "bloom" / zoo.COMPLETE_MARKER).write_text("winner\n")
        return real_build(family, path, **kwargs)

    monkeypatch.setattr(zoo, "build_tiny_checkpoint", build_and_lose_the_race)
    path = tiny_checkpoint("bloom", tmp_path)
    assert (path / zoo.COMPLETE_MARKER).read_text() == "winner\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bloom"]


def _fail_build(*args, **kwargs) -> Path:
    raise AssertionError("tiny_checkpoint rebuilt a complete checkpoint")
