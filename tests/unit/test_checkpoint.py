"""Finding checkpoints and reading block tensors: names, folders, the Hub (offline), missing blocks."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from corolla.errors import ModelNotFoundError
from corolla.models.checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    default_dht_prefix,
    load_block_tensors,
    load_non_block_tensors,
    parse_block_key,
    resolve_checkpoint,
)
from tests.fixtures.zoo import zoo_checkpoint


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("model.layers.12.mlp.up_proj.weight", (12, "mlp.up_proj.weight")),
        ("model.layers.0.self_attn.q_proj.weight", (0, "self_attn.q_proj.weight")),
        ("transformer.h.3.self_attention.dense.weight", (3, "self_attention.dense.weight")),
        ("h.0.ln.weight", (0, "ln.weight")),
        ("layers.7.attention_norm.weight", (7, "attention_norm.weight")),
        ("model.layers.1.mlp.experts.3.w1.weight", (1, "mlp.experts.3.w1.weight")),  # the first index is the block
        ("model.language_model.layers.5.input_layernorm.weight", (5, "input_layernorm.weight")),
        ("lm_head.weight", None),
        ("model.embed_tokens.weight", None),
        ("model.norm.weight", None),
        ("transformer.word_embeddings_layernorm.weight", None),
        ("transformer.ln_f.bias", None),
        ("model.layers.3", None),  # no tensor name inside the block
        ("model.layers.x.weight", None),
        ("model.mlp_layers.3.weight", None),
    ],
)
def test_parse_block_key(key, expected):
    assert parse_block_key(key) == expected


# ---- resolve_checkpoint ---------------------------------------------------------------------------------------------


def test_resolve_a_checkpoint_folder():
    folder = zoo_checkpoint("llama")
    checkpoint = resolve_checkpoint(str(folder))
    assert checkpoint.folder == folder and checkpoint.repo_id is None and checkpoint.name == str(folder)


def test_folder_without_config_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_checkpoint(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "config.json" in message and "transformers checkpoint" in message


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: huggingface_hub reads HF_HUB_OFFLINE at import, so patch the constant as well as the env."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", ["corolla-tests/no-such-model-7f3a", "no-such-model-7f3a"])
def test_unknown_name_fails_fast_offline_and_says_what_to_do(name, hub_offline, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so that the name is surely not a folder
    began = time.monotonic()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_checkpoint(name)
    assert time.monotonic() - began < 10
    message = str(info.value)
    assert repr(name) in message
    assert "not a local folder" in message and "bundled" in message and "smollm2-135m" in message
    assert "Hugging Face Hub" in message
    assert "Check the name" in message and "local checkpoint folder" in message


# ---- default_dht_prefix ---------------------------------------------------------------------------------------------


def test_dht_prefix_of_a_folder_is_its_name(tmp_path):
    folder = tmp_path / "My.Model v2"
    folder.mkdir()
    assert default_dht_prefix(str(folder)) == "My_Model-v2"
    assert default_dht_prefix(str(folder) + "/") == "My_Model-v2"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bigscience/bloom-560m", "bigscience-bloom-560m"),
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama-Llama-3_1-8B-Instruct"),
        ("smollm2-135m", "smollm2-135m"),
    ],
)
def test_dht_prefix_of_a_hub_id_or_short_name(name, expected, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    assert default_dht_prefix(name) == expected


def test_dht_prefix_is_never_empty():
    assert default_dht_prefix("/") == "model"


# ---- reading tensors ------------------------------------------------------------------------------------------------


def test_load_block_tensors_groups_by_block():
    checkpoint = resolve_checkpoint(str(zoo_checkpoint("llama")))
    blocks = load_block_tensors(checkpoint, 4, 6)
    assert sorted(blocks) == [4, 5]
    weight_map = json.loads((checkpoint.folder / INDEX_NAME).read_text())["weight_map"]
    for index, tensors in blocks.items():
        expected = {
            k.removeprefix(f"model.layers.{index}.") for k in weight_map if k.startswith(f"model.layers.{index}.")
        }
        assert set(tensors) == expected
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())


@pytest.mark.parametrize(("start", "end", "missing"), [(4, 8, "[6, 7]"), (6, 7, "[6]")])
def test_load_block_tensors_for_blocks_the_checkpoint_lacks(start, end, missing):
    checkpoint = resolve_checkpoint(str(zoo_checkpoint("llama")))
    with pytest.raises(ModelNotFoundError, match=re.escape(f"no weights for blocks {missing}")):
        load_block_tensors(checkpoint, start, end)


def test_single_file_checkpoint(tmp_path):
    """Without an index, the tensors of ``model.safetensors`` are read directly."""
    tensors = {
        "model.embed_tokens.weight": torch.zeros(4, 2),
        "model.layers.0.mlp.up_proj.weight": torch.ones(2, 2),
        "model.layers.1.mlp.up_proj.weight": torch.full((2, 2), 2.0),
        "model.norm.weight": torch.ones(2),
    }
    save_file(tensors, str(tmp_path / SINGLE_NAME))
    checkpoint = Checkpoint(name="single", folder=tmp_path)
    assert checkpoint.weight_map() == dict.fromkeys(tensors, SINGLE_NAME)
    blocks = load_block_tensors(checkpoint, 1, 2)
    assert list(blocks) == [1] and list(blocks[1]) == ["mlp.up_proj.weight"]
    torch.testing.assert_close(blocks[1]["mlp.up_proj.weight"], tensors["model.layers.1.mlp.up_proj.weight"])
    assert sorted(load_non_block_tensors(checkpoint, lambda k: "norm" in k)) == ["model.norm.weight"]
    with pytest.raises(ModelNotFoundError, match=r"no weights for blocks \[2\]"):
        load_block_tensors(checkpoint, 1, 3)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    checkpoint = resolve_checkpoint(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=f"no {INDEX_NAME} or {SINGLE_NAME}"):
        load_block_tensors(checkpoint, 0, 1)


def test_local_checkpoint_file_paths_stay_local(tmp_path):
    checkpoint = Checkpoint(name="x", folder=Path(tmp_path))
    assert checkpoint.file("missing.safetensors") == tmp_path / "missing.safetensors"
