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
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from corolla.client.config import ClientConfig
from corolla.client.inference_session import InferenceSession
from corolla.client.remote_sequential import RemoteSequential
from corolla.client.swarm import SwarmView
from corolla.log import get_logger
from corolla.models.checkpoint import default_dht_prefix, load_non_block_tensors, resolve_checkpoint
from corolla.models.families import FamilySpec, family_for
from corolla.models.span import _quiet_transformers

logger = get_logger(__name__)


class RemoteCache(Cache):
    """Stands in for transformers' KV cache during ``generate``: the real caches live on the servers."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

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
    """Replaces a base model's forward: embeddings (local) -> RemoteSequential (swarm) -> final norm (local)."""

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
        if family.input_norm_attr is not None:
            hidden = getattr(self, family.input_norm_attr)(hidden)
        blocks: RemoteSequential = getattr(self, family.layers_attr)
        if isinstance(cache, RemoteCache):
            hidden = cache.session.step(hidden, attention_mask, position_ids)
        else:
            hidden = blocks(hidden, attention_mask, position_ids)
        hidden = getattr(self, family.final_norm_attr)(hidden)
        # the MoE output type is a superset of the dense one (router_logits stay None: routing is server-side)
        return MoeModelOutputWithPast(last_hidden_state=hidden, cache=cache if use_cache else None)


class DistributedCausalLMMixin:
    """Adds ``inference_session`` and a session-aware ``generate`` to a transformers CausalLM class."""

    _family: FamilySpec

    @property
    def remote_blocks(self) -> RemoteSequential:
        return getattr(getattr(self, self._family.base_model_attr), self._family.layers_attr)

    def shutdown(self) -> None:
        """Leave the swarm (stops this client's DHT peer). The model cannot be used afterwards."""
        self.remote_blocks.swarm.shutdown()

    def inference_session(self, *, max_length: int) -> InferenceSession:
        """A session that keeps attention caches on the servers across ``generate`` calls (multi-turn chat)."""
        return self.remote_blocks.inference_session(max_length=max_length)

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
        if kwargs.get("max_new_tokens") is not None:
            return prompt + kwargs["max_new_tokens"]
        if kwargs.get("max_length") is not None:
            return kwargs["max_length"]
        config = self.generation_config
        return prompt + config.max_new_tokens if config.max_new_tokens is not None else config.max_length

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
        output = super().generate(input_ids, attention_mask=attention_mask, cache=RemoteCache(session), **kwargs)
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


class AutoDistributedModelForCausalLM:
    """Loads the client half of a model and connects its blocks to a swarm."""

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        *,
        initial_peers,
        dht_prefix: str | None = None,
        dtype: torch.dtype = torch.float32,
        client_config: ClientConfig | None = None,
        **config_overrides,
    ):
        """``model_name``: a bundled short name, a local checkpoint folder or a Hub repo id.

        Reads only the embeddings, final norm and LM head. Raises SwarmConnectionError if the initial peers do
        not answer, ModelNotFoundError for an unknown model.
        """
        checkpoint = resolve_checkpoint(model_name)
        hf_config = AutoConfig.from_pretrained(checkpoint.folder)
        family = family_for(hf_config.model_type)
        client_config = client_config or ClientConfig(
            initial_peers=tuple(initial_peers), dht_prefix=dht_prefix, **config_overrides
        )
        prefix = client_config.dht_prefix or default_dht_prefix(model_name)
        model = _build_local_parts(hf_config, family, dtype)
        _load_local_weights(model, checkpoint, family)
        swarm = SwarmView.connect(
            config=client_config, num_blocks=hf_config.num_hidden_layers, model_name=model_name, dht_prefix=prefix
        )
        base = getattr(model, family.base_model_attr)
        setattr(base, family.layers_attr, RemoteSequential(swarm))
        base.__class__ = type(
            f"Distributed{type(base).__name__}", (DistributedBaseMixin, type(base)), {"_family": family}
        )
        model.__class__ = type(
            f"Distributed{type(model).__name__}", (DistributedCausalLMMixin, type(model)), {"_family": family}
        )
        return model.eval()


def _build_local_parts(hf_config: PretrainedConfig, family: FamilySpec, dtype: torch.dtype):
    """The CausalLM with zero blocks (its config still says how many the model has)."""
    causal_lm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    empty = copy.deepcopy(hf_config)
    empty.num_hidden_layers = 0
    if isinstance(getattr(empty, "layer_types", None), list):
        empty.layer_types = []
    with _quiet_transformers():
        model = causal_lm_class(empty).to(dtype)
    model.config = hf_config
    base = getattr(model, family.base_model_attr)
    base.config = hf_config
    return model


def _load_local_weights(model, checkpoint, family: FamilySpec) -> None:
    """Embeddings, norms and LM head from the checkpoint; block tensors are never read."""
    expected = model.state_dict()
    tensors = load_non_block_tensors(checkpoint, lambda key: True)
    state = {}
    for key, tensor in tensors.items():
        for candidate in (key, f"{family.base_model_attr}.{key}"):
            if candidate in expected:
                state[candidate] = tensor.to(expected[candidate].dtype)
                break
    missing = [k for k in expected if k not in state]
    model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise ValueError(f"{checkpoint.name}: the checkpoint lacks client-side weights {missing}")
