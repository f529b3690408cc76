"""Settings of SWARM training: what every peer of an experiment agrees on, a stage peer's own, a trainer's own.

``corolla stage`` and ``corolla train`` generate their flags from these dataclasses (a field's docstring is its
help; sections keep flat flag names), and a YAML file may set them nested by section or flat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from corolla.net.peer_config import PeerConfig


def _check_codec(name: str, flag: str) -> None:
    """hivemind's BLOCKWISE_8BIT codec needs bitsandbytes, which corolla does not install."""
    import importlib.util

    if name == "BLOCKWISE_8BIT" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{flag} BLOCKWISE_8BIT needs bitsandbytes (pip install bitsandbytes); or use UNIFORM_8BIT")


def _check_positive(section, names: tuple[str, ...]) -> None:
    for name in names:
        if not getattr(section, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(section, name)}")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """The model being trained and how it is cut: every stage peer and trainer of an experiment must agree."""

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    """checkpoint folder, bundled short name (smollm2-135m) or Hub repo id; its config defines the architecture"""
    experiment: str = "swarm"
    """name of the training run (peers of other experiments are ignored)"""
    num_stages: int = 2
    """pipeline stages the model's blocks are cut into (stage 0 also holds the embeddings, the last the head)"""
    random_init: bool = False
    """start from a random init of the model's config (drawn from --init-seed) instead of its weights"""
    init_seed: int = 0
    """seed of the random init (every peer draws the same weights)"""

    def __post_init__(self):
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if not self.experiment or any(c.isspace() or c == "." for c in self.experiment):
            raise ValueError(f"experiment must be a name without spaces or dots, got {self.experiment!r}")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """How the peers of a stage accumulate, average and step (AdamW)."""

    lr: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    target_batch_size: int = 64
    """samples the peers of a stage accumulate together before they average gradients and step"""
    matchmaking_time_s: float = 3.0
    """seconds the peers of a stage wait for each other to form an averaging group"""
    averaging_timeout_s: float = 30.0
    """seconds an averaging round may take before it counts as failed (and is retried)"""
    averaging_compression: Literal["size_adaptive", "NONE", "FLOAT16", "UNIFORM_8BIT", "BLOCKWISE_8BIT"] = (
        "size_adaptive"
    )
    """compression of averaged gradients (size_adaptive: FLOAT16 for small tensors, UNIFORM_8BIT for large ones)"""
    retry_averaging_s: float = 1.0
    """seconds before a failed averaging round is tried again"""

    def __post_init__(self):
        _check_positive(self, ("lr", "target_batch_size", "matchmaking_time_s", "averaging_timeout_s"))
        if self.weight_decay < 0 or self.retry_averaging_s < 0:
            raise ValueError("weight_decay and retry_averaging_s must be >= 0")
        _check_codec(self.averaging_compression, "--averaging-compression")
        if self.averaging_timeout_s <= self.matchmaking_time_s:
            raise ValueError(
                f"averaging_timeout_s ({self.averaging_timeout_s}) must exceed matchmaking_time_s "
                f"({self.matchmaking_time_s})"
            )


@dataclass(frozen=True, kw_only=True)
class StageSwarmConfig:
    """Which stage this peer serves, how it announces itself and when it moves to another stage."""

    stage: int | None = None
    """stage to serve (None: the stage that needs a peer most)"""
    rebalance: Literal["auto", "on", "off"] = "auto"
    """move to another stage when it needs this peer more (auto: only when --stage is not given)"""
    update_period_s: float = 10.0
    """seconds between announcements of this peer's record (it expires after 2.5 periods)"""
    rebalance_period_s: float = 60.0
    """mean seconds between rebalancing checks of a peer that chose its stage (random jitter: 0.5x to 1.5x)"""
    rebalance_min_gain: float = 0.1
    """move a peer to the bottleneck stage only when the pipeline's throughput rises by more than this share"""
    num_threads: int = 1
    """torch threads for compute"""
    max_request_samples: int = 256
    """largest micro-batch (samples) a request may carry"""
    max_request_mb: float = 256.0
    """largest request (MB) this peer reassembles from a stream"""
    save_dir: str | None = None
    """when it stops, write the stage's parameters there (safetensors, one file per stage and peer)"""
    backup_period_s: float = 300.0
    """seconds between in-memory copies of the next stage's state, to refill it if its peers all die (0: none)"""

    def __post_init__(self):
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"stage must be >= 0, got {self.stage}")
        if self.backup_period_s < 0:
            raise ValueError(f"backup_period_s must be >= 0 (0: no backups), got {self.backup_period_s}")
        _check_positive(
            self, ("update_period_s", "rebalance_period_s", "num_threads", "max_request_samples", "max_request_mb")
        )
        if self.rebalance_min_gain < 0:
            raise ValueError(f"rebalance_min_gain must be >= 0, got {self.rebalance_min_gain}")

    @property
    def movable(self) -> bool:
        return self.stage is None if self.rebalance == "auto" else self.rebalance == "on"


@dataclass(frozen=True, kw_only=True)
class StagePeerConfig:
    """Serve a stage of a model being trained by a SWARM: forward and backward for trainers, averaging with the
    other peers of the stage."""

    run: ExperimentConfig
    new_swarm: bool = False
    """start a new swarm (no initial peers)"""
    network: PeerConfig = field(default_factory=PeerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    swarm: StageSwarmConfig = field(default_factory=StageSwarmConfig)

    def __post_init__(self):
        if self.new_swarm == bool(self.network.initial_peers):
            raise ValueError(
                f"pass either --initial-peers (got {list(self.network.initial_peers)}) or --new-swarm "
                f"(got {self.new_swarm})"
            )
        if self.swarm.stage is not None and self.swarm.stage >= self.run.num_stages:
            raise ValueError(f"stage {self.swarm.stage} is outside 0..{self.run.num_stages - 1}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What the trainer trains on."""

    data: Literal["markov", "python-help"] = "markov"
    """markov: a random Markov chain (its entropy rate is the loss floor); python-help: Python's help text"""
    markov_vocab_size: int = 16
    """states of the Markov chain (token ids 0..N-1)"""
    markov_seed: int = 0
    """seed of the Markov chain's transition matrix"""
    seq_len: int = 32
    """tokens per sequence"""
    micro_batch_size: int = 4
    """sequences per micro-batch"""
    data_seed: int = 0
    """seed of this trainer's sampling (trainers with the same seed draw the same batches)"""

    def __post_init__(self):
        _check_positive(self, ("markov_vocab_size", "seq_len", "micro_batch_size"))
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (a next token to predict), got {self.seq_len}")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Push micro-batches through the stage peers of a SWARM experiment and report the loss."""

    run: ExperimentConfig
    network: PeerConfig = field(default_factory=PeerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 10
    """optimizer steps to train for (each step is --samples-per-step samples)"""
    samples_per_step: int = 64
    """samples per step (the stage peers' --target-batch-size)"""
    max_in_flight: int = 8
    """micro-batches in the pipeline at once"""
    synchronous: bool = False
    """wait for every micro-batch of a step before starting the next (exact training; no overlap across steps)"""
    wire_compression: Literal["NONE", "FLOAT16", "BLOCKWISE_8BIT", "UNIFORM_8BIT"] = "NONE"
    """compression of activations and their gradients between stages"""
    forward_timeout_s: float = 30.0
    """seconds a forward call may take before it is retried on another peer"""
    backward_timeout_s: float = 75.0
    """seconds a backward call may take before it is retried on another peer"""
    max_retries: int = 8
    """failed calls of one micro-batch at one stage before the micro-batch is reported as failed"""
    refresh_period_s: float = 2.0
    """seconds between reads of the stage peers' records"""
    missing_peer_grace_s: float = 30.0
    """seconds an ONLINE peer stays callable after a read of the records missed it (a DHT read can come back
    without a record while a node near the key is frozen; a peer that left says so, a dead one fails its calls)"""
    wait_for_peers_s: float = 120.0
    """seconds to wait for every stage to have a peer before giving up (at the start, and whenever a call finds
    no callable peer at its stage)"""
    loss_log: str | None = None
    """write one JSON line per step (step, loss, samples/s, failures, retries, peers per stage, calls per peer) here"""
    seed: int = 0
    """seed of the wiring's tie-breaks"""

    def __post_init__(self):
        _check_positive(
            self,
            (
                "steps",
                "samples_per_step",
                "max_in_flight",
                "forward_timeout_s",
                "backward_timeout_s",
                "refresh_period_s",
                "missing_peer_grace_s",
                "wait_for_peers_s",
            ),
        )
        _check_codec(self.wire_compression, "--wire-compression")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.samples_per_step % self.data.micro_batch_size:
            raise ValueError(
                f"samples_per_step ({self.samples_per_step}) must be a multiple of micro_batch_size "
                f"({self.data.micro_batch_size})"
            )
