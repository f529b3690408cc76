"""HF-compatible models whose blocks run on the swarm: ``AutoDistributedModelForCausalLM.from_pretrained``.

The client holds only the embeddings, the final norm and the LM head (read from the checkpoint without touching
block weights). The blocks are a ``RemoteSequential`` at the same attribute path as in transformers (e.g.
``model.model.layers`` for Llama, ``model.transformer.h`` for BLOOM), and ``generate`` is transformers' own,
driven through a server-side attention cache.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
)

from corolla.client.config import ClientConfig
from corolla.client.inference_session import InferenceSession
from corolla.client.lookup_candidates import LookupCandidates
from corolla.client.proof_check import ProofChecker
from corolla.client.ptune import TUNING_MODES, PromptTuning
from corolla.client.remote_sequential import RemoteSequential
from corolla.client.swarm import SwarmView
from corolla.log import get_logger
from corolla.models.checkpoint import default_dht_prefix, load_non_block_tensors, resolve_checkpoint
from corolla.models.families import FamilySpec, family_for
from corolla.models.span import _quiet_transformers

logger = get_logger(__name__)


class RemoteCache(Cache):
    """Stands in for transformers' KV cache during ``generate``: the real caches live on the servers.

    ``prefix_length``: tokens of a trainable prompt at the start of the session, invisible to ``generate``.
    """

    def __init__(self, session: InferenceSession, prefix_length: int = 0):
        super().__init__(layers=[])
        self.session, self.prefix_length = session, prefix_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(0, self.session.position - self.prefix_length)

    @property
    def is_croppable(self) -> bool:
        return True  # servers drop later tokens when a step starts before their cache's end

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (transformers' assisted generation drops rejected guesses);
        a positive value is the length to keep, as older transformers versions pass it."""
        length = self.get_seq_length()
        keep = length + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, length)
        if keep < length:
            self.session.rewind(max(0, keep) + self.prefix_length)

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_compileable(self) -> bool:
        return False


class DistributedBaseMixin:
    """Replaces a base model's forward: embeddings (local) -> RemoteSequential (swarm) -> final norm (local).

    With prompt tuning (``self.prompt_tuning``), the trainable prefix is put in front of the embeddings (and its
    deep prompts sent to the servers) for training passes and for the first step of an inference session; the
    outputs for the prefix are dropped.
    """

    _family: FamilySpec

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values=None,
        **kwargs,
    ):
        family = self._family
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = getattr(self, family.embed_attr)(input_ids) if inputs_embeds is None else inputs_embeds
        session = cache.session if isinstance(cache, RemoteCache) else None
        tuning: PromptTuning | None = getattr(self, "prompt_tuning", None)  # a submodule, when tuning prompts
        deep_prompts = None
        with_prefix = tuning is not None and (session is None or session.position == 0)
        if tuning is not None:
            attention_mask = tuning.extend_mask(attention_mask)
            position_ids = tuning.shift_positions(position_ids, with_prefix=with_prefix)
        if with_prefix:
            hidden = torch.cat([tuning.prefix(hidden.shape[0], hidden.dtype), hidden], dim=1)
            deep_prompts = tuning.deep_prompts
        hidden = self.prepare_for_blocks(hidden)
        blocks: RemoteSequential = getattr(self, family.layers_attr)
        if session is not None:
            hidden = session.step(hidden, attention_mask, position_ids, prompts=deep_prompts)
        else:
            hidden = blocks(hidden, attention_mask, position_ids, prompts=deep_prompts)
        if with_prefix:
            hidden = hidden[:, tuning.pre_seq_len :]
        hidden = self.finish_blocks(hidden)
        # the MoE output type is a superset of the dense one (router_logits stay None: routing is server-side)
        return MoeModelOutputWithPast(last_hidden_state=hidden, cache=cache if use_cache else None)

    def embed_for_blocks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What the first remote block receives for ``input_ids`` (without prompt tuning)."""
        return self.prepare_for_blocks(getattr(self, self._family.embed_attr)(input_ids))

    def prepare_for_blocks(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings -> the first block's input (the family's input norm, if it has one)."""
        norm = self._family.input_norm_attr
        return embeddings if norm is None else getattr(self, norm)(embeddings)

    def finish_blocks(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last block's outputs -> the base model's output (the final norm)."""
        return getattr(self, self._family.final_norm_attr)(hidden)


class DistributedModelMixin:
    """What every distributed model class has: its remote blocks, its trainable prompts, and ``shutdown``."""

    _family: FamilySpec

    @property
    def remote_blocks(self) -> RemoteSequential:
        return getattr(self._base_model, self._family.layers_attr)

    @property
    def prompt_tuning(self) -> PromptTuning | None:
        return getattr(self._base_model, "prompt_tuning", None)

    @property
    def _base_model(self):
        return getattr(self, self._family.base_model_attr)

    def shutdown(self) -> None:
        """Leave the swarm (stops this client's DHT peer). The model cannot be used afterwards."""
        self.remote_blocks.swarm.shutdown()


class DistributedCausalLMMixin(DistributedModelMixin):
    """Adds ``inference_session`` and a session-aware ``generate`` to a transformers CausalLM class."""

    def _prefix_length(self) -> int:
        return 0 if self.prompt_tuning is None else self.prompt_tuning.pre_seq_len

    def inference_session(self, *, max_length: int) -> InferenceSession:
        """A session that keeps attention caches on the servers across ``generate`` calls (multi-turn chat).

        ``max_length`` counts your tokens; room for a trainable prompt prefix is added.
        """
        return self.remote_blocks.inference_session(max_length=max_length + self._prefix_length())

    def generate(self, inputs: torch.Tensor | None = None, *, session: InferenceSession | None = None, **kwargs):
        """transformers' ``generate``, with server-side caches. With ``session``, continue where it stopped:
        pass only the new tokens; the output is those tokens plus the generated ones."""
        if kwargs.get("num_beams", 1) != 1:
            raise ValueError("beam search is not supported over the swarm yet; use greedy or sampling")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if session is None:
            max_length = self._session_length(input_ids, kwargs)
            with self.inference_session(max_length=max_length) as session:
                return self.generate(input_ids, session=session, **kwargs)
        return self._generate_in_session(input_ids, session, kwargs)

    def _session_length(self, input_ids, kwargs) -> int:
        prompt = 0 if input_ids is None else input_ids.shape[1]
        if prompt == 0 and kwargs.get("inputs_embeds") is not None:
            prompt = kwargs["inputs_embeds"].shape[1]
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("max_new_tokens") is not None:
            return prompt + kwargs["max_new_tokens"]
        if kwargs.get("max_length") is not None:
            return kwargs["max_length"]
        return prompt + config.max_new_tokens if config.max_new_tokens is not None else config.max_length

    def _get_candidate_generator(self, generation_config, *args, **kwargs):
        """transformers' hook for speculative decoding: prompt lookup uses corolla's adaptive guesses (fewer where
        they fail); a draft model (``assistant_model``) keeps transformers' own generator."""
        if (
            generation_config.prompt_lookup_num_tokens is not None
            and kwargs.get("assistant_model") is None
            and generation_config.assistant_early_exit is None
        ):
            return LookupCandidates(
                num_tokens=generation_config.prompt_lookup_num_tokens,
                max_length=generation_config.max_length,
                eos_token_ids=generation_config._eos_token_tensor,
            )
        return super()._get_candidate_generator(generation_config, *args, **kwargs)

    def _generate_in_session(self, input_ids, session: InferenceSession, kwargs):
        attention_mask = kwargs.pop("attention_mask", None)
        prefix = session.token_history
        if prefix is not None and input_ids is not None:
            new_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            attention_mask = torch.cat([session.mask_history, new_mask], dim=1)
            input_ids = torch.cat([prefix, input_ids], dim=1)
        elif attention_mask is None and input_ids is not None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.pop("cache", None)
        cache = RemoteCache(session, prefix_length=self._prefix_length())
        output = super().generate(input_ids, attention_mask=attention_mask, cache=cache, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        session.token_history = sequences
        generated = sequences.shape[1] - (attention_mask.shape[1] if attention_mask is not None else 0)
        session.mask_history = torch.cat([attention_mask, attention_mask.new_ones(sequences.shape[0], generated)], 1)
        if prefix is not None and input_ids is not None:
            trimmed = sequences[:, prefix.shape[1] :]
            if isinstance(output, torch.Tensor):
                return trimmed
            output.sequences = trimmed
        return output


class _AutoDistributedModel:
    """Loads the client half of a model (of the class ``_mapping`` gives) and connects its blocks to a swarm."""

    _mapping = None  # transformers' config class -> model class mapping
    _mixin: type = DistributedModelMixin
    _new_head_prefixes: tuple[str, ...] = ()  # client weights that are new (trained from scratch), not read

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        *,
        initial_peers,
        dht_prefix: str | None = None,
        dtype: torch.dtype = torch.float32,
        client_config: ClientConfig | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        config_kwargs: dict | None = None,
        **config_overrides,
    ):
        """``model_name``: a bundled short name, a local checkpoint folder or a Hub repo id.

        Reads only the embeddings, final norm and LM head. ``tuning_mode`` ("ptune" or "deep_ptune") with
        ``pre_seq_len`` adds trainable prompts (see ``corolla.client.ptune``); ``config_kwargs`` override fields of
        the model's config (e.g. ``num_labels``); other keyword arguments are ``ClientConfig`` fields. Raises
        SwarmConnectionError if the initial peers do not answer, ModelNotFoundError for an unknown model.
        """
        if tuning_mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {tuning_mode!r}")
        checkpoint = resolve_checkpoint(model_name)
        hf_config = AutoConfig.from_pretrained(checkpoint.folder, **(config_kwargs or {}))
        family = family_for(hf_config.model_type)
        client_config = client_config or ClientConfig(
            initial_peers=tuple(initial_peers), dht_prefix=dht_prefix, **config_overrides
        )
        prefix = client_config.dht_prefix or default_dht_prefix(model_name)
        model = _build_local_parts(cls._mapping[type(hf_config)], hf_config, family, dtype)
        _load_local_weights(model, checkpoint, family, new_prefixes=cls._new_head_prefixes)
        checker = ProofChecker(checkpoint, dht_prefix=prefix, num_blocks=hf_config.num_hidden_layers)
        swarm = SwarmView.connect(
            config=client_config, num_blocks=hf_config.num_hidden_layers, model_name=model_name, dht_prefix=prefix,
            proof_checker=checker,
        )  # fmt: skip
        base = getattr(model, family.base_model_attr)
        setattr(base, family.layers_attr, RemoteSequential(swarm, seed=swarm.config.seed))
        if tuning_mode is not None:
            base.prompt_tuning = PromptTuning(
                mode=tuning_mode,
                pre_seq_len=pre_seq_len,
                hidden_size=hf_config.hidden_size,
                num_blocks=hf_config.num_hidden_layers,
                init_std=getattr(hf_config, "initializer_range", 0.02),
            ).to(dtype)
        base.__class__ = type(
            f"Distributed{type(base).__name__}", (DistributedBaseMixin, type(base)), {"_family": family}
        )
        model.__class__ = type(f"Distributed{type(model).__name__}", (cls._mixin, type(model)), {"_family": family})
        return model.eval()


class AutoDistributedModelForCausalLM(_AutoDistributedModel):
    """A causal LM whose blocks run on the swarm: transformers' ``generate``, sessions, training."""

    _mapping = MODEL_FOR_CAUSAL_LM_MAPPING
    _mixin = DistributedCausalLMMixin


class AutoDistributedModelForSequenceClassification(_AutoDistributedModel):
    """transformers' sequence classifier (a new, trainable ``score`` head on the last token) over the swarm.

    Pass ``config_kwargs={"num_labels": N}``; set ``pad_token_id`` in the config for batches with padding.
    """

    _mapping = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    _new_head_prefixes = ("score.",)


def _build_local_parts(model_class, hf_config: PretrainedConfig, family: FamilySpec, dtype: torch.dtype):
    """The model with zero blocks (its config still says how many the model has)."""
    empty = copy.deepcopy(hf_config)
    empty.num_hidden_layers = 0
    if isinstance(getattr(empty, "layer_types", None), list):
        empty.layer_types = []
    with _quiet_transformers():
        model = model_class(empty).to(dtype)
    model.config = hf_config
    base = getattr(model, family.base_model_attr)
    base.config = hf_config
    return model


def _load_local_weights(model, checkpoint, family: FamilySpec, *, new_prefixes: tuple[str, ...] = ()) -> None:
    """Embeddings, norms and LM head from the checkpoint; block tensors are never read. Weights under
    ``new_prefixes`` (a new task head) keep their fresh initialization."""
    expected = model.state_dict()
    tensors = load_non_block_tensors(checkpoint, lambda key: True)
    state = {}
    for key, tensor in tensors.items():
        for candidate in (key, f"{family.base_model_attr}.{key}"):
            if candidate in expected:
                state[candidate] = tensor.to(expected[candidate].dtype)
                break
    missing = [k for k in expected if k not in state and not k.startswith(new_prefixes)]
    model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise ValueError(f"{checkpoint.name}: the checkpoint lacks client-side weights {missing}")
