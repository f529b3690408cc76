"""Where each supported model family keeps its parts, so that one generic code path can split any of them.

corolla serves a span of blocks by running the family's own transformers base model with only those blocks
(embeddings and the final norm removed), so masks, rotary/ALiBi positions and caches are computed exactly as
transformers computes them. A family only has to say where its modules live.
"""

from __future__ import annotations

from dataclasses import dataclass

from corolla.errors import UnsupportedModelError


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """Module paths of one model family inside its transformers ``*ForCausalLM`` class."""

    name: str
    model_types: tuple[str, ...]
    base_model_attr: str  # CausalLM -> base model, e.g. "model"
    layers_attr: str  # base model -> ModuleList of blocks, e.g. "layers"
    embed_attr: str  # base model -> token embedding
    final_norm_attr: str  # base model -> norm applied after the last block
    input_norm_attr: str | None = None  # base model -> norm applied to embeddings before block 0 (BLOOM)

    @property
    def blocks_path(self) -> str:
        """Attribute path of the blocks in the CausalLM model, e.g. ``model.layers``."""
        return f"{self.base_model_attr}.{self.layers_attr}"


_LLAMA_LIKE = dict(base_model_attr="model", layers_attr="layers", embed_attr="embed_tokens", final_norm_attr="norm")

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(name="llama", model_types=("llama",), **_LLAMA_LIKE),
    FamilySpec(name="mistral", model_types=("mistral",), **_LLAMA_LIKE),
    FamilySpec(name="mixtral", model_types=("mixtral",), **_LLAMA_LIKE),
    FamilySpec(name="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
    FamilySpec(name="qwen3", model_types=("qwen3",), **_LLAMA_LIKE),
    FamilySpec(
        name="bloom",
        model_types=("bloom",),
        base_model_attr="transformer",
        layers_attr="h",
        embed_attr="word_embeddings",
        final_norm_attr="ln_f",
        input_norm_attr="word_embeddings_layernorm",
    ),
    FamilySpec(
        name="falcon",
        model_types=("falcon",),
        base_model_attr="transformer",
        layers_attr="h",
        embed_attr="word_embeddings",
        final_norm_attr="ln_f",
    ),
)


def family_for(model_type: str) -> FamilySpec:
    """The family that serves configs of ``model_type``; raises UnsupportedModelError naming the supported ones."""
    for spec in FAMILIES:
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(t for spec in FAMILIES for t in spec.model_types)
    raise UnsupportedModelError(f"Model type {model_type!r} is not supported by corolla; supported types: {supported}")
