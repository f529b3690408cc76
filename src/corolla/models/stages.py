"""A causal LM cut into pipeline stages for training (SWARM): trainable, and equal to the whole model.

Stage 0 holds the token embedding (and BLOOM's embedding norm) and the first blocks; middle stages hold blocks;
the last stage holds its blocks, the final norm, the LM head and the loss. Each stage runs the family's own
transformers base model built with only its blocks (as ``models/span.py`` does for inference), so masks and rotary
or ALiBi positions are computed by transformers itself: the stages chained equal the whole model, forward and
backward (tested against transformers' CausalLM, step by step).

Tied input and output embeddings (SmolLM2) cannot stay tied across two stages that live on different peers: a
pipeline unties them, the last stage starting from a copy of the embedding. ``untied_reference`` builds the local
model that trains the same way, for comparisons.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from corolla.models.families import FamilySpec, family_for
from corolla.models.span import slice_layers

__all__ = ["PipelineStage", "StageLayout", "build_model", "split_into_stages", "untied_reference"]


@dataclass(frozen=True)
class StageLayout:
    """Which blocks each stage holds: stage ``s`` has blocks ``bounds[s]..bounds[s+1]-1``."""

    bounds: tuple[int, ...]

    def __post_init__(self):
        if len(self.bounds) < 2 or self.bounds[0] != 0 or any(b <= a for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"stage bounds must start at 0 and increase, got {self.bounds}")

    @classmethod
    def even(cls, num_layers: int, num_stages: int) -> StageLayout:
        """``num_stages`` stages of (nearly) equal numbers of blocks."""
        if not 1 <= num_stages <= num_layers:
            raise ValueError(f"cannot cut {num_layers} blocks into {num_stages} stages")
        return cls(tuple(round(i * num_layers / num_stages) for i in range(num_stages + 1)))

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        return self.bounds[-1]

    def blocks(self, stage: int) -> tuple[int, int]:
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} is outside 0..{self.num_stages - 1}")
        return self.bounds[stage], self.bounds[stage + 1]


def build_model(config: PretrainedConfig | str, *, seed: int = 0) -> PreTrainedModel:
    """The whole causal LM in float32, untied: a random init of ``config`` drawn from ``seed`` (every peer that
    builds it with the same seed gets the same weights), or the checkpoint folder ``config`` names."""
    if isinstance(config, str):
        model = AutoModelForCausalLM.from_pretrained(config, dtype=torch.float32)
    else:
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        finally:
            torch.random.set_rng_state(generator_state)
    return untied_reference(model)


def untied_reference(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` with its output embedding a separate copy of its input embedding (if they were tied)."""
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None
    return model.train()


class PipelineStage(nn.Module):
    """One stage: ``forward(inputs)`` maps token ids (stage 0) or hidden states to hidden states; the last stage
    maps hidden states and ``labels`` to the mean next-token loss."""

    def __init__(self, base_model: nn.Module, family: FamilySpec, stage: int, layout: StageLayout, lm_head=None):
        super().__init__()
        self.base_model, self.family, self.stage, self.layout = base_model, family, stage, layout
        self.lm_head = lm_head
        if not self.is_last:
            setattr(base_model, family.final_norm_attr, nn.Identity())
        if not self.is_first and family.input_norm_attr is not None:
            setattr(base_model, family.input_norm_attr, nn.Identity())

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.layout.num_stages - 1

    @property
    def config(self) -> PretrainedConfig:
        return self.base_model.config

    @property
    def vocab_size(self) -> int:
        """Token ids the stage takes (stage 0) or predicts (the last stage); later stages' configs say 1."""
        if self.lm_head is not None:
            return self.lm_head.weight.shape[0]
        return self.config.vocab_size

    def forward(
        self,
        inputs: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.is_first:
            if inputs.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"stage 0 takes token ids, got a {inputs.dtype} tensor")
            kwargs = {"input_ids": inputs}
        else:
            kwargs = {"inputs_embeds": inputs}
        hidden = self.base_model(**kwargs, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if not self.is_last:
            return hidden
        if labels is None:
            raise ValueError("the last stage needs the labels to compute the loss")
        logits = self.lm_head(hidden)
        return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


def split_into_stages(model: PreTrainedModel, layout: StageLayout) -> list[PipelineStage]:
    """``model``'s weights as the stages of ``layout`` (copies: training a stage leaves ``model`` unchanged)."""
    return [split_stage(model, stage, layout) for stage in range(layout.num_stages)]


def split_stage(model: PreTrainedModel, stage: int, layout: StageLayout) -> PipelineStage:
    """Stage ``stage`` of ``model`` (its weights copied), trainable."""
    config = model.config
    if layout.num_layers != config.num_hidden_layers:
        raise ValueError(f"the layout has {layout.num_layers} blocks, the model {config.num_hidden_layers}")
    family = family_for(config.model_type)
    start, end = layout.blocks(stage)
    stage_config = slice_layers(config, start, end)
    first, last = stage == 0, stage == layout.num_stages - 1
    if not first:
        stage_config.vocab_size = 1  # the unused embedding stays tiny
        stage_config.pad_token_id = None
    stage_config.tie_word_embeddings = False
    base_class = MODEL_MAPPING[type(config)]
    with no_init_weights():  # every weight is copied below (and the global random generator is left alone)
        base = base_class(stage_config)
    source = getattr(model, family.base_model_attr)
    own = base.state_dict()
    state = {}
    for name, tensor in source.state_dict().items():
        if name.startswith(f"{family.layers_attr}."):
            index, rest = name[len(family.layers_attr) + 1 :].split(".", 1)
            if start <= int(index) < end:
                state[f"{family.layers_attr}.{int(index) - start}.{rest}"] = tensor
        elif name.startswith(f"{family.embed_attr}."):
            if first:
                state[name] = tensor
        elif name in own:
            state[name] = tensor
    missing = [n for n in own if n not in state and not (n.startswith(f"{family.embed_attr}.") and not first)]
    if missing:
        raise ValueError(f"stage {stage}: no weights for {missing[:5]}")
    base.load_state_dict({n: t.detach().clone() for n, t in state.items()}, strict=False)
    lm_head = copy.deepcopy(model.get_output_embeddings()) if last else None
    result = PipelineStage(base, family, stage, layout, lm_head=lm_head).train()
    if not first:
        getattr(base, family.embed_attr).requires_grad_(False)  # unused
    return result


DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout")


def without_dropout(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with every dropout at 0: a stage's stateless backward recomputes the forward (on any peer of the
    stage), which must give the same activations as the forward did."""
    for name in DROPOUT_FIELDS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return config


def load_training_model(model: str, *, random_init: bool = False, seed: int = 0) -> PreTrainedModel:
    """The whole model to cut into stages, untied and without dropout: ``model`` (a checkpoint folder, bundled
    name or Hub id) with its weights, or a random init of its config drawn from ``seed``."""
    from transformers import AutoConfig

    from corolla.models.checkpoint import resolve_checkpoint

    folder = str(resolve_checkpoint(model).folder)
    config = without_dropout(AutoConfig.from_pretrained(folder))
    if random_init:
        return build_model(config, seed=seed)
    loaded = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)
    return untied_reference(loaded)
