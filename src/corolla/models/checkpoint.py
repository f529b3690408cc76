"""Finding a model's checkpoint and reading only the tensors a server needs.

A model is named by a bundled short name (``smollm2-135m``), a local folder, or a Hugging Face Hub repo id. Block
weights are read tensor by tensor from the safetensors shards listed in ``model.safetensors.index.json``, so a
server never reads (or, from the Hub, downloads) the weights of blocks it does not host; within a shard only the
byte ranges of the wanted tensors are read, in file order (``models/tensor_reader.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from corolla.errors import ModelNotFoundError
from corolla.log import get_logger
from corolla.models.tensor_reader import TensorEntry, read_header, read_tensors

logger = get_logger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_BLOCK_KEY = re.compile(r"^(?:(?P<prefix>[\w.]*?)\.)?(?:layers|h)\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A model checkpoint: a folder with a config, and a way to fetch weight files (local or from the Hub)."""

    name: str  # what the user typed
    folder: Path  # local folder holding config.json (a Hub snapshot holds only the files fetched so far)
    repo_id: str | None = None  # set when files come from the Hub
    revision: str | None = None

    def file(self, filename: str) -> Path:
        """Local path of ``filename``, downloading just that file from the Hub if needed."""
        path = self.folder / filename
        if path.exists() or self.repo_id is None:
            return path
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo_id, filename, revision=self.revision))

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard filename, from the index (or the single ``model.safetensors``)."""
        index = self.file(INDEX_NAME)
        if index.exists():
            return json.loads(index.read_text())["weight_map"]
        single = self.file(SINGLE_NAME)
        if not single.exists():
            raise ModelNotFoundError(f"{self.name}: no {INDEX_NAME} or {SINGLE_NAME} in {self.folder}")
        return dict.fromkeys(read_header(single), SINGLE_NAME)


def resolve_checkpoint(name: str, *, revision: str | None = None) -> Checkpoint:
    """Resolve a bundled short name, a local folder or a Hub repo id; raise ModelNotFoundError saying what to try."""
    from corolla.models.bundled import resolve_bundled

    bundled = resolve_bundled(name)
    if bundled is not None:
        return Checkpoint(name=name, folder=bundled)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ModelNotFoundError(f"{folder} is a folder but has no config.json: is it a transformers checkpoint?")
        return Checkpoint(name=name, folder=folder)
    return _resolve_hub(name, revision)


def _resolve_hub(repo_id: str, revision: str | None) -> Checkpoint:
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, allow_patterns=["*.json", "*.model", "*.txt", "*.jinja"], etag_timeout=10
        )
    except Exception as e:
        from corolla.models.bundled import BUNDLED_MODELS

        raise ModelNotFoundError(
            f"Model {repo_id!r} is not a local folder, not a bundled model ({', '.join(BUNDLED_MODELS)}) and could "
            f"not be fetched from the Hugging Face Hub ({type(e).__name__}: {e}). Check the name, pass a local "
            f"checkpoint folder, or use a bundled short name."
        ) from e
    return Checkpoint(name=repo_id, folder=Path(snapshot), repo_id=repo_id, revision=revision)


def parse_block_key(key: str) -> tuple[int, str] | None:
    """``model.layers.12.mlp.up_proj.weight`` -> ``(12, "mlp.up_proj.weight")``; None for non-block tensors."""
    match = _BLOCK_KEY.match(key)
    if match is None:
        return None
    return int(match["index"]), match["rest"]


def load_tensors(
    checkpoint: Checkpoint,
    keys: Iterable[str],
    weight_map: dict[str, str],
    *,
    dtypes: dict[str, torch.dtype] | None = None,
) -> dict[str, torch.Tensor]:
    """Read exactly ``keys`` from the shards that hold them (shard by shard, each tensor's bytes in file order,
    nothing else read). ``dtypes``: the dtype a key's floating tensor is cast to as soon as it is read."""
    tensors: dict[str, torch.Tensor] = {}
    for shard, shard_keys in sorted(_by_shard(keys, weight_map).items()):
        tensors.update(read_tensors(checkpoint.file(shard), shard_keys, dtypes=dtypes))
    return tensors


def tensor_entries(checkpoint: Checkpoint, keys: Iterable[str], weight_map: dict[str, str]) -> dict[str, TensorEntry]:
    """The dtype, shape and file position of each of ``keys``, from the shards' headers (no tensor data read)."""
    entries: dict[str, TensorEntry] = {}
    for shard, shard_keys in _by_shard(keys, weight_map).items():
        header = read_header(checkpoint.file(shard))
        entries.update({key: header[key] for key in shard_keys})
    return entries


def _by_shard(keys: Iterable[str], weight_map: dict[str, str]) -> dict[str, list[str]]:
    by_shard: dict[str, list[str]] = {}
    for key in keys:
        by_shard.setdefault(weight_map[key], []).append(key)
    return by_shard


def block_keys(checkpoint: Checkpoint, start: int, end: int, weight_map: dict[str, str]) -> dict[str, tuple[int, str]]:
    """The checkpoint's tensor names of blocks ``start..end-1``, each with its ``(block index, name inside the
    block)``; ModelNotFoundError naming the blocks it has no weights for."""
    wanted: dict[str, tuple[int, str]] = {}
    for key in weight_map:
        parsed = parse_block_key(key)
        if parsed is not None and start <= parsed[0] < end:
            wanted[key] = parsed
    found = {index for index, _ in wanted.values()}
    if found != set(range(start, end)):
        missing = sorted(set(range(start, end)) - found)
        raise ModelNotFoundError(f"{checkpoint.name}: the checkpoint has no weights for blocks {missing}")
    return wanted


def load_block_tensors(checkpoint: Checkpoint, start: int, end: int) -> dict[int, dict[str, torch.Tensor]]:
    """Tensors of blocks ``start..end-1``, as ``{block_index: {name_inside_block: tensor}}``."""
    weight_map = checkpoint.weight_map()
    wanted = block_keys(checkpoint, start, end, weight_map)
    tensors = load_tensors(checkpoint, wanted, weight_map)
    blocks: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(start, end)}
    for key, (index, rest) in wanted.items():
        blocks[index][rest] = tensors[key]
    logger.debug("Read %d tensors of blocks %d:%d from %s", len(tensors), start, end, checkpoint.name)
    return blocks


def load_non_block_tensors(checkpoint: Checkpoint, predicate) -> dict[str, torch.Tensor]:
    """All non-block tensors whose name satisfies ``predicate`` (embeddings, final norm, LM head)."""
    weight_map = checkpoint.weight_map()
    keys = [k for k in weight_map if parse_block_key(k) is None and predicate(k)]
    return load_tensors(checkpoint, keys, weight_map)


def default_dht_prefix(name: str) -> str:
    """The DHT namespace of a model when none is given: its short name, Hub repo id, or folder name."""
    path = Path(name).expanduser()
    base = path.name if path.is_dir() else name
    return re.sub(r"[^\w.-]", "-", base.strip("/")).replace(".", "_") or "model"
