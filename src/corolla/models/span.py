"""A span of consecutive transformer blocks, run exactly as transformers runs them.

``SpanModel`` wraps the family's transformers base model (``LlamaModel``, ``BloomModel``, ...) built with only
the hosted blocks: the token embedding is shrunk to nothing, the final norm (and BLOOM's embedding norm) become
identities. Causal masks, padding, rotary or ALiBi positions and the KV cache are then computed by transformers
itself, which makes a served span equal to the same blocks inside the local model by construction.
"""

from __future__ import annotations

import contextlib
import copy
import logging as _stdlib_logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, PretrainedConfig
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from corolla.log import get_logger
from corolla.models.checkpoint import Checkpoint, block_keys, load_tensors, tensor_entries
from corolla.models.families import FamilySpec, family_for

logger = get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class SpanInputs:
    """One call into a span: new hidden states plus the positions/mask that place them in the sequence.

    hidden_states: [batch, new_tokens, hidden]; attention_mask: [batch, past + new_tokens] of 0/1 (None = all ones);
    position_ids: [batch, new_tokens] (None = consecutive positions after the cache).
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


def slice_layers(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of ``config`` for blocks ``start..end-1`` only (per-layer fields sliced)."""
    config = copy.deepcopy(config)
    num_layers = config.num_hidden_layers
    for name in ("layer_types", "mlp_only_layers"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            setattr(config, name, list(value[start:end]))
    config.num_hidden_layers = end - start
    return config


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """The config of a span model made of blocks ``start..end-1`` of ``config``'s model."""
    config = slice_layers(config, start, end)
    config.vocab_size = 1  # the span never embeds tokens; keep the unused embedding tiny
    config.pad_token_id = None
    config.tie_word_embeddings = False
    return config


class SpanModel(nn.Module):
    """Blocks ``start..end-1`` of a model: hidden states in, hidden states out, with an optional KV cache."""

    def __init__(self, base_model: nn.Module, family: FamilySpec, start: int, end: int):
        super().__init__()
        self.base_model, self.family, self.start, self.end = base_model, family, start, end
        setattr(base_model, family.final_norm_attr, nn.Identity())
        if family.input_norm_attr is not None:
            setattr(base_model, family.input_norm_attr, nn.Identity())

    @property
    def config(self) -> PretrainedConfig:
        return self.base_model.config

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.base_model, self.family.layers_attr)

    def new_cache(self, start: int | None = None, end: int | None = None) -> DynamicCache:
        """An empty attention cache for one session over blocks ``start..end-1`` (default: the whole span)."""
        start, end = self._range(start, end)
        if (start, end) == (self.start, self.end):
            return _rewindable(DynamicCache(config=self.config))
        return _rewindable(DynamicCache(config=slice_layers(self.config, start - self.start, end - self.start)))

    def forward(
        self,
        inputs: SpanInputs,
        cache: DynamicCache | None = None,
        *,
        start: int | None = None,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start..end-1`` (default: all hosted); with ``cache``, append the new keys/values to it.

        ``prompts`` [end - start, batch or 1, prefix, hidden] are deep prompts: before block ``start + i`` runs,
        ``prompts[i]`` is added to the hidden states of the first ``prefix`` new tokens (differentiably).
        Returns hidden states [batch, new_tokens, hidden]. Not thread-safe for sub-ranges: call from one thread.
        """
        start, end = self._range(start, end)
        first, last = start - self.start, end - self.start
        with _deep_prompts(self.blocks[first:last] if prompts is not None else (), prompts):  # (slicing costs)
            if (start, end) == (self.start, self.end):
                return self._run(self.base_model, inputs, cache)
            with self._sub_range(first, last) as view:
                return self._run(view, inputs, cache)

    def _range(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are not within the hosted span {self.start}:{self.end}")
        return start, end

    @staticmethod
    def _run(base_model: nn.Module, inputs: SpanInputs, cache: DynamicCache | None) -> torch.Tensor:
        out = base_model(
            inputs_embeds=inputs.hidden_states,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    @contextlib.contextmanager
    def _sub_range(self, first: int, last: int):
        """A base model over local blocks ``first..last-1``: their layer indices temporarily renumbered from 0."""
        view = copy.copy(self.base_model)
        view._modules = dict(self.base_model._modules)
        view._modules[self.family.layers_attr] = nn.ModuleList(self.blocks[first:last])
        view.config = slice_layers(self.config, first, last)
        renumbered = [
            (module, module.layer_idx)
            for block in self.blocks[first:last]
            for module in block.modules()
            if isinstance(getattr(module, "layer_idx", None), int)
        ]
        try:
            for module, layer_idx in renumbered:
                module.layer_idx = layer_idx - first
            yield view
        finally:
            for module, layer_idx in renumbered:
                module.layer_idx = layer_idx


def _rewindable(cache: DynamicCache) -> DynamicCache:
    """``cache`` with its sliding-window layers replaced by full ones.

    A sliding-window layer keeps only the last ``sliding_window - 1`` keys, so once a session is past the window it
    cannot be cropped back to an earlier position, which a server must do when a client replays steps. A full layer
    keeps every key; the window is still applied, by the sliding-window attention mask transformers builds for
    those layers. The session's memory is reserved for its whole ``max_length`` either way.
    """
    cache.layers = [
        DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer for layer in cache.layers
    ]
    return cache


@contextlib.contextmanager
def _deep_prompts(blocks, prompts: torch.Tensor | None):
    """While active, each block adds its slice of ``prompts`` to the first hidden states it receives."""
    if prompts is None:
        yield
        return
    if prompts.shape[0] != len(blocks):
        raise ValueError(f"deep prompts are for {prompts.shape[0]} blocks, the range has {len(blocks)}")

    def add_prompt(prompt: torch.Tensor):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            prefix = min(prompt.shape[1], hidden.shape[1])
            prompted = torch.cat([hidden[:, :prefix] + prompt[:, :prefix].to(hidden.dtype), hidden[:, prefix:]], 1)
            if args:
                return (prompted, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": prompted}

        return hook

    handles = [
        block.register_forward_pre_hook(add_prompt(prompt), with_kwargs=True) for block, prompt in zip(blocks, prompts)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_span(
    checkpoint: Checkpoint,
    start: int,
    end: int,
    *,
    config: PretrainedConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SpanModel:
    """Build blocks ``start..end-1`` of ``checkpoint`` reading only their tensors; weights frozen, eval mode.

    The tensors are read once, each into memory of its own that becomes the parameter (cast on the way if the
    checkpoint's dtype is not ``dtype``), so loading takes about the span's bytes of memory and not twice that.
    """
    config = config or AutoConfig.from_pretrained(checkpoint.folder)
    family = family_for(config.model_type)
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"blocks {start}:{end} are outside the model's 0:{config.num_hidden_layers}")
    weight_map = checkpoint.weight_map()
    keys = block_keys(checkpoint, start, end, weight_map)
    names = {key: f"{family.layers_attr}.{index - start}.{rest}" for key, (index, rest) in keys.items()}
    base_class = MODEL_MAPPING[type(config)]
    base_model = _build_direct(
        base_class, span_config(config, start, end), checkpoint, names, weight_map, family, dtype
    )
    if base_model is None:  # the checkpoint's tensors need transformers' conversions (e.g. Mixtral's experts)
        tensors = load_tensors(checkpoint, names, weight_map)
        state_dict = {names[key]: tensors.pop(key) for key in list(tensors)}
        base_model = _build_converted(base_class, span_config(config, start, end), state_dict, dtype)
        del state_dict
    span = SpanModel(base_model, family, start, end).to(device).eval()
    span.requires_grad_(False)
    return span


def _build_direct(
    base_class,
    config: PretrainedConfig,
    checkpoint: Checkpoint,
    names: dict[str, str],
    weight_map: dict[str, str],
    family: FamilySpec,
    dtype: torch.dtype,
) -> nn.Module | None:
    """The span's base model with the checkpoint's tensors ``names`` (checkpoint key -> name in the model) as its
    weights, or None (nothing read) if those names or shapes do not match the model's.

    The model is built without initializing its weights: their storage is allocated but never written, so it takes
    no memory until ``load_state_dict(assign=True)`` replaces it with the tensors as read (each read into storage of
    its own, in the dtype the model gives the parameter). Buffers the model computes itself (rotary frequencies)
    are computed as usual. ``from_pretrained`` gives the same result but first compiles the weight-renaming rules of
    every architecture transformers knows (~0.3 s of a server's cold start); it remains the path for checkpoints
    that need them.
    """
    from transformers.initialization import no_init_weights

    # as from_pretrained builds it (parameters in dtype, buffers as the model says), but in this thread only: the
    # global default dtype stays, so a compute thread running meanwhile (a rebalancing server) is not affected
    with _DefaultDtypeInThisThread(dtype), no_init_weights():  # every weight is replaced below: skip init
        model = base_class(config)
    own = model.state_dict()
    unused = {f"{family.final_norm_attr}.", f"{family.embed_attr}."}
    if family.input_norm_attr is not None:
        unused.add(f"{family.input_norm_attr}.")
    needed = {name for name in own if not name.startswith(tuple(unused))}
    entries = tensor_entries(checkpoint, names, weight_map)
    if set(names.values()) != needed or any(entries[key].shape != tuple(own[names[key]].shape) for key in names):
        return None
    tensors = load_tensors(checkpoint, names, weight_map, dtypes={key: own[name].dtype for key, name in names.items()})
    del own  # the unwritten storage of the parameters is freed as each is replaced
    model.load_state_dict({names[key]: tensors.pop(key) for key in list(tensors)}, strict=False, assign=True)
    return model


def _build_converted(base_class, config: PretrainedConfig, state_dict: dict, dtype: torch.dtype) -> nn.Module:
    """The span's base model through transformers' ``from_pretrained``, which applies the checkpoint's weight
    conversions. Asked for ``dtype`` it would set torch's process-wide default dtype for the whole load (under a
    compute thread that may be running); so it loads at the current default, which it then leaves as it is, and the
    parameters are cast afterwards, as ``from_pretrained`` casts them (buffers keep the dtype the model gave them)."""
    with _quiet_transformers():
        model = base_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.get_default_dtype())
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    model.config.dtype = dtype
    return model


class _DefaultDtypeInThisThread(TorchFunctionMode):
    """``torch.set_default_dtype(dtype)`` for the calling thread only (torch function modes are thread-local).

    Factories whose floating result takes the default dtype get ``dtype`` when none is given; those whose result
    type follows their arguments (``full``, ``tensor``, ``arange``, ...) are cast when they gave the default.
    """

    _DEFAULTED = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.empty_strided, torch.eye}
    _INFERRED = {torch.full, torch.tensor, torch.arange, torch.linspace, torch.logspace}

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        explicit = kwargs.get("dtype") is not None
        if func in self._DEFAULTED and not explicit:
            kwargs["dtype"] = self.dtype
        result = func(*args, **kwargs)
        from_data = func is torch.tensor and args and isinstance(args[0], torch.Tensor)  # keeps the data's dtype
        if func in self._INFERRED and not explicit and not from_data and isinstance(result, torch.Tensor):
            if result.dtype == torch.get_default_dtype() and result.dtype != self.dtype:
                result = result.to(self.dtype)
        return result


class _quiet_transformers:
    """Silence transformers' "some weights were not initialized" notice: the span's embedding is unused by design."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._logger = _stdlib_logging.getLogger("transformers")
        self._level = self._logger.level
        self._bars = hf_logging.is_progress_bar_enabled()
        self._logger.setLevel(_stdlib_logging.ERROR)
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        self._logger.setLevel(self._level)
        if self._bars:
            hf_logging.enable_progress_bar()
