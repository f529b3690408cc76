"""Metadata of SWARM stage RPCs (msgpack next to the tensors of hivemind's ExpertRequest/ExpertResponse).

A trainer calls one peer of each stage per micro-batch: ``forward`` (stages 0..S-2) returns the stage's outputs;
``backward`` recomputes the forward from the inputs it carries (stateless: any peer of the stage can answer it),
accumulates the parameter gradients into the peer's stage and returns the inputs' gradient. The last stage has only
``backward``: it takes the labels, computes the loss and its backward in one call.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from corolla.protocol.messages import VersionedRequest

MAX_MICROBATCH_ID_CHARS = 128


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StageForward(VersionedRequest):
    """Tensors: the stage's inputs (token ids [batch, seq] for stage 0, hidden states [batch, seq, hidden] after)."""

    experiment: str = Field(min_length=1)
    stage: int = Field(ge=0)
    microbatch_id: str = Field(min_length=1, max_length=MAX_MICROBATCH_ID_CHARS)


class StageBackward(StageForward):
    """Tensors: the stage's inputs, then the gradient of its outputs (the last stage: the labels [batch, seq])."""


class StageReply(_Message):
    """What every stage call answers besides its tensors: the time the peer spent computing (the trainer's wiring
    measures peers by it, not by the round trip), the peer's epoch (optimizer steps of its stage) after the call,
    and the loss of the micro-batch (last stage's backward only)."""

    compute_s: float = Field(ge=0)
    epoch: int = Field(ge=0)
    loss: float | None = None
    accumulated: bool = True  # False: this peer had already accumulated the micro-batch in this epoch


class StagePeerStatus(_Message):
    """The ``info`` RPC: a peer's view of itself (for tests, the monitor and curious users)."""

    experiment: str
    stage: int
    epoch: int
    samples_accumulated: int
    queue_length: int
    throughput_sps: float
    parameters_digest: str  # a hash of the stage's parameters (peers of a stage compare equal after a round)
    version: str


class StageStateRequest(VersionedRequest):
    """The ``state`` RPC: the training state of a stage (parameters, AdamW moments, epoch), from a peer that serves
    it or keeps a backup of it. No tensors."""

    experiment: str = Field(min_length=1)
    stage: int = Field(ge=0)


class StageStateReply(_Message):
    """What the ``state`` RPC answers besides its tensors (the state's tensors, in the stage's parameter order)."""

    stage: int = Field(ge=0)
    epoch: int = Field(ge=0)
    optimizer_steps: int = Field(ge=0)
    from_backup: bool = False  # the answering peer keeps a copy of the stage; it does not serve it
    num_tensors: int | None = Field(default=None, ge=0)  # how many tensors follow (a cut stream is recognised)
