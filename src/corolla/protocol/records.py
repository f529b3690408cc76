"""DHT record schemas per role: what each kind of peer publishes about itself, and under which keys.

Every record is stored under one or more DHT keys, in a subkey that is its writer's ``[owner:...]`` marker, so
only that peer can write it (``corolla.net.records`` stores and reads them). A record is a frozen pydantic model
that ignores unknown fields, so old peers can read the records of new ones:

- ``kind`` names the schema; a record of another kind found under a key is rejected, never reinterpreted.
- ``schema_version`` is bumped when fields are added; a change old peers cannot read gets a new ``kind`` (and key)
  instead, so that an old peer skips the new records rather than misreading them.

Key naming lives here, with the schemas: block servers ``"{dht_prefix}.{block}"`` (``protocol.server_info``),
stage peers ``"{experiment}.stage.{stage}"``, the model registry one well-known key, ``MODEL_REGISTRY_KEY``.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Self

from corolla import __version__
from corolla.protocol.versions import PROTOCOL_VERSION

MODEL_REGISTRY_KEY = "corolla.models"
"""The one DHT key under which every server announces the model it serves (one subkey per server)."""


class PeerState(IntEnum):
    """Lifecycle of a peer of any role: JOINING while loading, ONLINE while serving, OFFLINE after a graceful
    shutdown (its last record says so until it expires)."""

    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


class SignedRecord(BaseModel):
    """Base of every DHT record schema: frozen, unknown fields ignored, a ``kind`` and a ``schema_version``.

    A subclass declares ``kind: Literal["its_kind"] = "its_kind"``; when it adds fields it raises the default of
    ``schema_version`` (a record keeps the version its writer used).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: str
    schema_version: int = Field(default=1, ge=1, description="version of the schema the writer used")

    @classmethod
    def record_kind(cls) -> str:
        return cls.model_fields["kind"].default

    def to_record(self) -> dict:
        """A msgpack-friendly dict for the DHT."""
        return self.model_dump(mode="json")

    @classmethod
    def from_record(cls, record: object) -> Self:
        """Parse a DHT value; raises ValueError (pydantic's ValidationError is one) on a malformed record."""
        if not isinstance(record, dict):
            raise ValueError(f"a {cls.record_kind()} record must be a dict, got {type(record).__name__}")
        return cls.model_validate(record)


def _check_name(what: str, name: str) -> str:
    """A DHT key component: non-empty printable text without whitespace (keys are compared byte for byte)."""
    if not name or not name.isprintable() or any(c.isspace() for c in name):
        raise ValueError(f"{what} must be non-empty printable text without whitespace, got {name!r}")
    return name


def stage_key(experiment: str, stage: int) -> str:
    """The DHT key of the peers serving stage ``stage`` of SWARM experiment ``experiment``."""
    if stage < 0:
        raise ValueError(f"a stage index must be >= 0, got {stage}")
    return f"{_check_name('an experiment name', experiment)}.stage.{stage}"


class StagePeerInfo(SignedRecord):
    """A SWARM stage peer: which stage of which experiment it serves, and how fast (for trainers' wiring)."""

    kind: Literal["stage_peer"] = "stage_peer"
    experiment: str = Field(min_length=1)
    stage: int = Field(ge=0)
    state: PeerState
    throughput_sps: float = Field(ge=0, description="samples/s the peer processes through its stage")
    queue_length: int = Field(default=0, ge=0, description="micro-batches waiting in the peer's queue")
    movable: bool = Field(default=True, description="the peer may move to another stage when rebalancing")
    moved_from: int | None = Field(default=None, ge=0, description="the stage this peer left to come here")
    moved_at: float | None = Field(default=None, description="when it moved (DHT time)")
    backup_of: int | None = Field(default=None, ge=0, description="a stage whose state this peer keeps a copy of")
    backup_epoch: int | None = Field(default=None, ge=0, description="the epoch of that copy")
    schema_version: int = Field(default=3, ge=1, description="2: movable, moved_from, moved_at; 3: backup_of/epoch")
    version: str = __version__
    protocol_version: int = PROTOCOL_VERSION

    def key(self) -> str:
        return stage_key(self.experiment, self.stage)


def btard_key(run: str) -> str:
    """The DHT key where the peers of BTARD run ``run`` announce themselves and their message-signing keys."""
    return f"{_check_name('a run name', run)}.btard"


class BtardPeerInfo(SignedRecord):
    """A BTARD peer: the run it trains in and the Ed25519 key that signs its protocol messages. The record is signed
    by the peer's libp2p identity (its owner subkey), so the signing key is bound to the peer id that sends."""

    kind: Literal["btard_peer"] = "btard_peer"
    run: str = Field(min_length=1)
    signing_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="raw Ed25519 public key, hex")
    state: PeerState
    version: str = __version__
    protocol_version: int = PROTOCOL_VERSION

    def key(self) -> str:
        return btard_key(self.run)


def stage_progress_key(experiment: str, stage: int) -> str:
    """The DHT key where the peers of a stage publish their progress towards the stage's next averaging round."""
    return f"{stage_key(experiment, stage)}.progress"


class StageProgress(SignedRecord):
    """How far a stage peer is in its current epoch: the stage averages and steps when the samples accumulated by
    its peers in the same epoch reach the target batch size. Written often (on every change, rate-limited)."""

    kind: Literal["stage_progress"] = "stage_progress"
    experiment: str = Field(min_length=1)
    stage: int = Field(ge=0)
    epoch: int = Field(ge=0, description="optimizer steps this peer's stage has made")
    samples: int = Field(ge=0, description="samples accumulated in this epoch")
    averaging: bool = Field(default=False, description="the peer is looking for its averaging group now")
    online: bool = Field(default=True, description="False: the peer left the stage (its last word)")

    def key(self) -> str:
        return stage_progress_key(self.experiment, self.stage)


class ModelRegistryEntry(SignedRecord):
    """A model a server serves: what clients, the monitor and the API need to find and use its swarm."""

    kind: Literal["model"] = "model"
    model_name: str = Field(min_length=1, description="the name users ask for, e.g. a Hub repo id")
    dht_prefix: str = Field(min_length=1, description="the prefix of the model's block keys")
    num_blocks: int = Field(gt=0)
    model_type: str = Field(min_length=1, description="the transformers model_type (family), e.g. 'llama'")
    repo_id: str | None = Field(default=None, description="public Hugging Face Hub repo the weights come from")
    revision: str | None = None
    version: str = __version__
    protocol_version: int = PROTOCOL_VERSION
