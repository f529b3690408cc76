"""Server-side PEFT LoRA adapters: ``corolla serve MODEL --adapters NAME_OR_PATH ...``.

An adapter is a folder written by PEFT's ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``)
for the served model. A server reads only the LoRA tensors of its own blocks (lazily, with ``safe_open``) and wraps
each targeted module of its blocks in a :class:`LoraLinear` holding every loaded adapter. Which adapter a
computation uses is chosen by :func:`use_adapter`, set by the server inside the compute task of each request, so one
server serves the base model and any of its adapters to different sessions at once:

    ``LoraLinear(x) = base(x) + scaling * B(A(x))`` for the active adapter, ``base(x)`` without one,

with ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), PEFT's unmerged inference forward
(dropout is off at inference). ``base`` is whatever module is there: ``nn.Linear`` or a quantized layer
(``--quant int8/nf4``), so adapters combine with quantization (the LoRA weights themselves stay in float).

Naming: ``NAME=PATH`` names an adapter explicitly; otherwise a local folder is named by its basename and a Hugging
Face Hub repo id by itself. Adapter options corolla does not implement (DoRA, LoRA biases, trained base biases,
modules outside the blocks, ...) are refused at startup with :class:`~corolla.errors.AdapterError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from corolla.errors import AdapterError
from corolla.log import get_logger
from corolla.models.families import FamilySpec

logger = get_logger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_NAME = re.compile(r"^[\w.\-/]{1,128}$")
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight$")
# options that change what an adapter computes and that LoraLinear does not implement: (key, value that is fine)
_UNSUPPORTED_OPTIONS = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "target_parameters": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "arrow_config": None,
    "megatron_config": None,
}

_ACTIVE: contextvars.ContextVar[str | None] = contextvars.ContextVar("corolla_active_adapter", default=None)


@contextlib.contextmanager
def use_adapter(name: str | None) -> Iterator[None]:
    """Within this block (in this thread), every :class:`LoraLinear` applies adapter ``name`` (None: none)."""
    token = _ACTIVE.set(name)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ---- naming and resolving -----------------------------------------------------------------------------------------


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """``"NAME=PATH"`` -> ``(NAME, PATH)``; a path -> (its folder name, path); a Hub repo id -> (repo id, repo id).

    ValueError for an empty or malformed name.
    """
    name, sep, location = spec.partition("=")
    if not sep or not _NAME.match(name) or Path(spec).expanduser().exists():
        location = spec.rstrip("/") or spec
        looks_like_repo_id = location.count("/") == 1 and not location.startswith((".", "~"))
        name = location if looks_like_repo_id and not Path(location).expanduser().is_dir() else Path(location).name
    if not location or not _NAME.match(name or ""):
        raise ValueError(
            f"adapter {spec!r}: expected a folder, a Hub repo id or NAME=PATH with a NAME of letters, digits and "
            f"'_.-/' (got name {name!r})"
        )
    return name, location


@dataclass(frozen=True, kw_only=True)
class AdapterSource:
    """A resolved adapter: its name (what clients select), its weights file and its PEFT config."""

    name: str
    weights: Path
    config: dict

    @property
    def r(self) -> int:
        return int(self.config["r"])


def resolve_adapter(spec: str) -> AdapterSource:
    """Find an adapter given as ``NAME=PATH``, a local folder or a Hub repo id (from the local HF cache first, then
    a download); AdapterError saying what is missing otherwise. Checks its config (see :func:`check_adapter_config`).
    """
    name, location = parse_adapter_spec(spec)
    folder = Path(location).expanduser()
    if folder.is_dir():
        config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        missing = [p.name for p in (config_path, weights) if not p.is_file()]
        if missing:
            raise AdapterError(
                f"adapter {name!r}: {folder} lacks {', '.join(missing)}; expected a folder written by PEFT's "
                f"save_pretrained (safetensors weights)"
            )
    else:
        config_path, weights = _from_hub(name, location)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: cannot read {config_path} ({e})") from None
    check_adapter_config(name, config)
    return AdapterSource(name=name, weights=weights, config=config)


def _from_hub(name: str, repo_id: str) -> tuple[Path, Path]:
    """The adapter's two files from the Hugging Face cache (or downloaded when the Hub is reachable)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        cached = [try_to_load_from_cache(repo_id, f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]
        if all(isinstance(path, str) for path in cached):
            return Path(cached[0]), Path(cached[1])
        return tuple(Path(hf_hub_download(repo_id, f, etag_timeout=10)) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    except Exception as e:
        raise AdapterError(
            f"adapter {name!r}: {repo_id!r} is not a local folder and not in the Hugging Face cache, and could not "
            f"be downloaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Pass a local folder with "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, or download it first while online."
        ) from None


def check_adapter_config(name: str, config: dict) -> None:
    """AdapterError unless ``config`` is a plain LoRA adapter that :class:`LoraLinear` computes exactly."""
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not supported, only LORA")
    for key, fine in _UNSUPPORTED_OPTIONS.items():
        value = config.get(key, fine)
        if value != fine and not (fine is None and value in ({}, [], "", False)):
            raise AdapterError(
                f"adapter {name!r}: {key}={value!r} is not supported by corolla servers (plain LoRA only: no DoRA, "
                f"LoRA biases, trained biases or extra trainable modules)"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        # these initializations change the base weights the adapter was trained against
        raise AdapterError(f"adapter {name!r}: init_lora_weights={init!r} changes the base weights; not supported")
    if not isinstance(config.get("r"), int) or config["r"] <= 0 or "lora_alpha" not in config:
        raise AdapterError(f"adapter {name!r}: adapter_config.json needs a positive integer r and lora_alpha")


# ---- the module ---------------------------------------------------------------------------------------------------


class _LoraWeights(nn.Module):
    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
        super().__init__()
        self.register_buffer("lora_A", lora_a)
        self.register_buffer("lora_B", lora_b)
        self.scaling = scaling


class LoraLinear(nn.Module):
    """A linear-like module (``nn.Linear`` or a quantized layer) plus named LoRA adapters; one applies at a time."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = _features(base)
        self.lora = nn.ModuleDict()  # "adapter<N>" -> weights (adapter names may hold characters keys cannot)
        self.keys_by_name: dict[str, str] = {}

    def add_adapter(self, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Hold adapter ``name``: ``lora_a`` [r, in_features], ``lora_b`` [out_features, r]."""
        r = lora_a.shape[0]
        if lora_a.shape != (r, self.in_features) or lora_b.shape != (self.out_features, r):
            raise ValueError(
                f"LoRA shapes A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not fit a layer of in_features="
                f"{self.in_features}, out_features={self.out_features}"
            )
        key = self.keys_by_name.get(name, f"adapter{len(self.keys_by_name)}")
        self.keys_by_name[name] = key
        self.lora[key] = _LoraWeights(lora_a, lora_b, float(scaling))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        key = self.keys_by_name.get(_ACTIVE.get())
        if key is None:
            return out
        weights = self.lora[key]
        delta = nn.functional.linear(nn.functional.linear(x.to(weights.lora_A.dtype), weights.lora_A), weights.lora_B)
        return out + (delta * weights.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.keys_by_name)}"


def _features(module: nn.Module) -> tuple[int, int]:
    try:
        return int(module.in_features), int(module.out_features)
    except AttributeError:
        raise TypeError(f"{type(module).__name__} is not a linear layer (no in_features/out_features)") from None


# ---- reading an adapter for a span of blocks ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    block: int  # global block index
    module: str  # path inside the block, e.g. self_attn.q_proj
    which: str  # "A" or "B"


def _parse_keys(source: AdapterSource, family: FamilySpec, num_layers: int | None) -> dict[str, _Entry]:
    """Tensor name -> where it goes; AdapterError for tensors outside the blocks or of something else than LoRA."""
    blocks_prefix = re.compile(
        rf"^(?:{re.escape(_PEFT_PREFIX)})?(?:{re.escape(family.base_model_attr)}\.)?"
        rf"{re.escape(family.layers_attr)}\.(?P<index>\d+)\.(?P<rest>.+)$"
    )
    with safe_open(str(source.weights), framework="pt") as f:
        keys = list(f.keys())
    entries, outside = {}, []
    for key in keys:
        match = blocks_prefix.match(key)
        lora = _LORA_KEY.match(match["rest"]) if match else None
        if lora is None:
            outside.append(key)
            continue
        entries[key] = _Entry(block=int(match["index"]), module=lora["module"], which=lora["which"])
    if outside:
        raise AdapterError(
            f"adapter {source.name!r}: {len(outside)} tensors are not LoRA weights of the {family.name} blocks "
            f"(e.g. {outside[0]!r}); corolla servers apply LoRA to the transformer blocks only"
        )
    if not entries:
        raise AdapterError(f"adapter {source.name!r}: {source.weights} holds no LoRA weights")
    beyond = [] if num_layers is None else sorted({e.block for e in entries.values() if e.block >= num_layers})
    if beyond:
        raise AdapterError(
            f"adapter {source.name!r} has weights for blocks {beyond}, but the model has {num_layers} blocks: "
            f"is it an adapter of another model?"
        )
    return entries


def check_adapter(source: AdapterSource, family: FamilySpec, num_layers: int) -> None:
    """Check (reading only the file's header) that the adapter's tensors are LoRA weights of this model's blocks."""
    _parse_keys(source, family, num_layers)


def attach_adapters(span, sources: Sequence[AdapterSource], *, dtype: torch.dtype | None = None) -> int:
    """Load ``sources`` into the blocks of ``span`` (a :class:`~corolla.models.span.SpanModel`), reading only the
    tensors of its blocks; returns how many modules got LoRA weights. AdapterError when an adapter does not fit."""
    dtype = dtype or next(span.parameters()).dtype
    device = next(span.parameters()).device
    wrapped = 0
    for source in sources:
        entries = _parse_keys(source, span.family, None)
        mine = {k: e for k, e in entries.items() if span.start <= e.block < span.end}
        pairs: dict[tuple[int, str], dict[str, str]] = {}
        for key, entry in mine.items():
            pairs.setdefault((entry.block, entry.module), {})[entry.which] = key
        with safe_open(str(source.weights), framework="pt") as f:
            for (block, module_path), keys in sorted(pairs.items()):
                if set(keys) != {"A", "B"}:
                    raise AdapterError(f"adapter {source.name!r}: block {block} {module_path} lacks lora_A or lora_B")
                lora_a, lora_b = f.get_tensor(keys["A"]), f.get_tensor(keys["B"])
                layer = _target(span, source, block, module_path)
                full_name = f"{span.family.base_model_attr}.{span.family.layers_attr}.{block}.{module_path}"
                scaling = _scaling(source, full_name, lora_a.shape[0])
                try:
                    layer.add_adapter(source.name, lora_a.to(device, dtype), lora_b.to(device, dtype), scaling)
                except ValueError as e:
                    raise AdapterError(
                        f"adapter {source.name!r}: block {block} {module_path}: {e}; is it an adapter of this model?"
                    ) from None
                wrapped += 1
        logger.info(
            "Loaded adapter %r into blocks %d:%d (%d LoRA modules)", source.name, span.start, span.end, len(pairs)
        )
    return wrapped


def _target(span, source: AdapterSource, block: int, module_path: str) -> LoraLinear:
    """The LoraLinear at ``module_path`` of global block ``block``, wrapping the module there on first use."""
    root = span.blocks[block - span.start]
    parent_path, _, child = module_path.rpartition(".")
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
        module = getattr(parent, child)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Module):
        raise AdapterError(
            f"adapter {source.name!r} targets {module_path}, which block {block} of this {span.family.name} model "
            f"does not have: is it an adapter of another model?"
        )
    if isinstance(module, LoraLinear):
        return module
    try:
        wrapper = LoraLinear(module)
    except TypeError as e:
        raise AdapterError(f"adapter {source.name!r} targets {module_path} of block {block}: {e}") from None
    setattr(parent, child, wrapper)
    return wrapper


def _scaling(source: AdapterSource, module_name: str, r: int) -> float:
    """PEFT's scaling of one module: lora_alpha (or its alpha_pattern match) over r (or sqrt(r) with rslora)."""
    config = source.config
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            alpha = value
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
