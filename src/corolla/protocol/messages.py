"""Metadata of block RPCs (sent as msgpack next to the tensors of hivemind's ExpertRequest/ExpertResponse)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corolla.protocol.versions import PROTOCOL_VERSION

_ACTIVATION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class VersionedRequest(_Message):
    """What every request of a corolla RPC carries besides its own fields: the codec of the reply's tensors and the
    protocol version, both checked before any compute is spent."""

    output_compression: str = "NONE"  # a hivemind CompressionType name
    protocol_version: int = PROTOCOL_VERSION

    @field_validator("output_compression")
    @classmethod
    def _known_compression(cls, name: str) -> str:
        from corolla.net.tensors import compression_type

        compression_type(name)  # ValueError naming the choices, before any compute is spent
        return name

    @field_validator("protocol_version")
    @classmethod
    def _same_protocol(cls, version: int) -> int:
        if version != PROTOCOL_VERSION:
            raise ValueError(
                f"the request speaks corolla protocol {version}, this server speaks {PROTOCOL_VERSION}: "
                f"use the same corolla version as the swarm"
            )
        return version


class SpanRequest(VersionedRequest):
    """Which of the server's blocks to run, and how the tensors that follow are laid out.

    Tensors, in order: hidden_states [batch, tokens, hidden]; then attention_mask [batch, past+tokens] if
    ``has_attention_mask``; then position_ids [batch, tokens] if ``has_position_ids``; then deep prompts
    [end_block - start_block, batch or 1, prefix, hidden] if ``has_prompts`` (added to the first ``prefix``
    hidden states before each block). ``active_adapter``: compute with this LoRA adapter (None: the base model).

    ``activation_id`` (forward and backward calls only): on a forward, a random id asking the server to keep what
    the backward of this call needs (its autograd graph) for a while; the backward of the call carries the same id,
    and a server that still holds it skips recomputing the forward pass. Servers that keep nothing ignore it.
    """

    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    has_attention_mask: bool = False
    has_position_ids: bool = False
    has_prompts: bool = False
    active_adapter: str | None = Field(default=None, min_length=1, max_length=128)  # a LoRA adapter the server holds
    activation_id: str | None = None  # 8-64 characters of [A-Za-z0-9_-]; None: keep nothing

    @field_validator("activation_id")
    @classmethod
    def _well_formed_activation_id(cls, value: str | None) -> str | None:
        if value is not None and not _ACTIVATION_ID.fullmatch(value):
            shown = value if len(value) <= 80 else value[:80] + "..."
            raise ValueError(f"activation_id must be 8 to 64 characters of A-Z, a-z, 0-9, _ or -, got {shown!r}")
        return value


class BackwardRequest(SpanRequest):
    """A backward pass: the gradient of the span's inputs (and of its deep prompts) given that of its outputs.

    Tensors, in order: the span's input hidden_states, grad_outputs (same shape), then the optional tensors of
    ``SpanRequest``. The answer holds grad_inputs, then grad_prompts if ``has_prompts``. The server reuses the
    autograd graph it kept from the forward call with the same ``activation_id`` if it still holds it for the same
    blocks, adapter and identical inputs, and recomputes the forward pass otherwise; block weights are frozen and
    never change.
    """


class InferenceOpen(SpanRequest):
    """First message of an inference stream: reserves cache for ``max_length`` tokens of ``batch_size`` rows."""

    session_id: str = Field(min_length=1, max_length=128)
    max_length: int = Field(gt=0)
    batch_size: int = Field(gt=0, default=1)


class PushTarget(_Message):
    """Where a server sends its step output directly: the next server of the chain and its session/step ids."""

    peer_id: str = Field(min_length=1, max_length=128)
    session_id: str = Field(min_length=1, max_length=128)
    step_id: str = Field(min_length=1, max_length=128)


class InferenceStep(_Message):
    """One step of a session: new tokens placed at ``position`` (their index in the sequence).

    ``push_chain`` lists the servers after this one; the server pushes its output to the first of them (passing
    the rest along), so the next server can start before the client's own copy of the input arrives. ``pusher``
    names the server before this one in the client's chain: the only peer whose pushes this session accepts (the
    client's latest step decides, so a replaced server loses the right at once). Tensors are
    laid out as in ``SpanRequest``; deep prompts (``has_prompts``) cannot be combined with a push chain.
    """

    step_id: str = Field(min_length=1, max_length=128)
    position: int = Field(ge=0)
    has_attention_mask: bool = False
    has_position_ids: bool = False
    has_prompts: bool = False
    push_chain: list[PushTarget] = Field(default_factory=list, max_length=256)
    pusher: str | None = Field(default=None, min_length=1, max_length=128)  # the previous server, allowed to push


class PushedStep(InferenceStep):
    """A step pushed by the previous server of the chain into session ``session_id`` on this server."""

    session_id: str = Field(min_length=1, max_length=128)


class StepResult(_Message):
    """The server's answer to a step: position after it and the free cache tokens left, with the server's signed
    receipt for the answer (``corolla.protocol.answer_signing.Receipt.to_list``) and, with the session's first
    answer, the certificate of the key that signs them."""

    step_id: str
    position: int
    cache_tokens_left: int
    receipt: list | None = None
    certificate: list | None = None


class ServerStatus(_Message):
    """Answer of the info RPC."""

    version: str
    protocol_version: int
    model_type: str
    start_block: int
    end_block: int
    hidden_size: int
    dtype: str
    quant: str
    cache_tokens_total: int
    cache_tokens_left: int
    max_batch_tokens: int
    max_session_length: int
    active_sessions: int
    adapters: tuple[str, ...] = ()  # LoRA adapters a request may select
    steps_from_pushes: int = 0  # inference steps computed from a previous server's push (before the client's copy)
    steps_batched: int = 0  # inference steps that shared one forward with other sessions' steps
    batched_forwards: int = 0  # forwards that ran more than one session's step
    activation_hits: int = 0  # backward calls that reused the graph kept from their forward call
    activation_misses: int = 0  # backward calls with an activation_id that had to recompute the forward pass
    activation_evictions: int = 0  # kept graphs dropped for room (the oldest first) or expired unused
    activation_bytes: int = 0  # bytes of activations kept now
    activation_peak_bytes: int = 0  # the most bytes of activations kept at once since the server started
