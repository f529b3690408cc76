"""Settings of one server, grouped by concern. ``corolla serve``'s flags are generated from these dataclasses
(each field's docstring is its help; the sections' flags are not prefixed, so they stay ``--cache-tokens`` rather
than ``--limits.cache-tokens``), and a YAML file may set them nested by section or flat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from corolla.net.peer_config import PeerConfig

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_QUANTS = ("none", "int8", "nf4")


def _older_spelling(flag: str):
    """A flag's former name, still accepted (also as a YAML key)."""
    return tyro.conf.arg(aliases=(flag,))


def _check_positive(section, names: tuple[str, ...], unit: str = "") -> None:
    for name in names:
        if not getattr(section, name) > 0:
            raise ValueError(f"{name} must be positive{unit}, got {getattr(section, name)}")


@dataclass(frozen=True, kw_only=True)
class SpanConfig:
    """Which blocks this server holds, and how."""

    num_blocks: int | None = None
    """how many consecutive blocks to serve, placed where the swarm is weakest (None: all of them)"""
    blocks: str | None = None
    """exact span to serve, as START:END (END exclusive); such a server never moves"""
    device: str = "cpu"
    """torch device, e.g. cpu or cuda:0"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weights dtype (auto: float32 on cpu, else the checkpoint's half-precision dtype or bfloat16)"""
    quant: Literal["none", "int8", "nf4"] = "none"
    """weight quantization"""
    num_threads: int = 1
    """torch threads for compute (1 suits many processes on one machine)"""
    adapters: tuple[str, ...] = ()
    """LoRA adapters to preload: PEFT folders (named by the folder), cached Hub ids or NAME=PATH; clients pick one"""

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {_DTYPES}")
        if self.quant not in _QUANTS:
            raise ValueError(f"quant={self.quant!r} is not one of {_QUANTS}")
        if self.num_blocks is not None and self.blocks is not None:
            raise ValueError(f"pass --num-blocks ({self.num_blocks}) or --blocks ({self.blocks}), not both")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.blocks is not None:
            self.parse_blocks()
        _check_positive(self, ("num_threads",))
        names = self.adapter_names()
        if len(set(names)) != len(names):
            raise ValueError(f"two --adapters have the same name: {list(names)}; name them with NAME=PATH")

    def parse_blocks(self) -> tuple[int, int]:
        """``"3:7"`` -> ``(3, 7)``; ValueError for anything else."""
        try:
            start, end = (int(x) for x in str(self.blocks).split(":"))
        except ValueError:
            raise ValueError(f"--blocks must look like START:END, got {self.blocks!r}") from None
        if not 0 <= start < end:
            raise ValueError(f"--blocks {self.blocks!r}: need 0 <= START < END")
        return start, end

    def adapter_names(self) -> tuple[str, ...]:
        """The names clients select the ``--adapters`` by (ValueError for a malformed one)."""
        from corolla.models.lora import parse_adapter_spec

        return tuple(parse_adapter_spec(spec)[0] for spec in self.adapters)


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """What one request or session may take, and how long anyone waits."""

    cache_tokens: int = 8192
    """attention-cache budget, in tokens, for all sessions together"""
    max_batch_tokens: int = 8192
    """largest number of tokens in one request"""
    compute_chunk_tokens: int = 2048
    """forward/backward requests over this many tokens run in chunks of rows"""
    max_session_length: int = 4096
    """longest inference session (tokens) accepted"""
    request_timeout_s: Annotated[float, _older_spelling("--request-timeout")] = 180.0
    """seconds a request may take before it is failed"""
    session_timeout_s: Annotated[float, _older_spelling("--session-timeout")] = 300.0
    """seconds a session may wait for its next step"""
    alloc_timeout_s: Annotated[float, _older_spelling("--alloc-timeout")] = 5.0
    """seconds a session waits for cache room"""

    def __post_init__(self):
        _check_positive(self, ("cache_tokens", "max_batch_tokens", "compute_chunk_tokens", "max_session_length"))
        _check_positive(self, ("request_timeout_s", "session_timeout_s", "alloc_timeout_s"), " seconds")


@dataclass(frozen=True, kw_only=True)
class AnnounceConfig:
    """What this server tells the swarm about itself, and how often."""

    public_name: str | None = None
    """a name shown in the swarm monitor"""
    dht_prefix: str | None = None
    """DHT namespace of this model (None: derived from its name)"""
    throughput: str = "auto"
    """auto (cached measurement), eval (re-measure) or a number (requests per second)"""
    update_period_s: Annotated[float, _older_spelling("--update-period")] = 30.0
    """seconds between DHT announcements"""

    def __post_init__(self):
        _check_positive(self, ("update_period_s",), " seconds")
        if self.throughput not in ("auto", "eval"):
            try:
                if float(self.throughput) <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"throughput must be auto, eval or a positive number, got {self.throughput!r}"
                ) from None

    def fixed_throughput(self) -> float | None:
        """The throughput given as a number (``--throughput 100``), or None for ``auto`` / ``eval``."""
        return None if self.throughput in ("auto", "eval") else float(self.throughput)

    def nominal_throughput(self) -> float:
        """What a record says before the speed is known: the configured value, or 1 (enough for servers choosing
        their blocks meanwhile to count this one; clients never route to JOINING)."""
        fixed = self.fixed_throughput()
        return 1.0 if fixed is None else fixed


@dataclass(frozen=True, kw_only=True)
class BalanceConfig:
    """When a server that chose its own blocks moves to where the swarm is weaker."""

    balance_quality: float = 0.75
    """move when the swarm's bottleneck is under this share of the achievable (0: never)"""
    balance_period_s: Annotated[float, _older_spelling("--balance-period")] = 120.0
    """mean seconds between balance checks"""
    join_jitter_s: Annotated[float, _older_spelling("--join-jitter")] = 2.0
    """random delay (s) before choosing blocks, so that servers started together spread out"""

    def __post_init__(self):
        if not 0 <= self.balance_quality <= 1:
            raise ValueError(f"balance_quality must be in [0, 1], got {self.balance_quality}")
        _check_positive(self, ("balance_period_s",), " seconds")
        if self.join_jitter_s < 0:
            raise ValueError(f"join_jitter_s must be >= 0 seconds, got {self.join_jitter_s}")


@dataclass(frozen=True, kw_only=True)
class BatchingConfig:
    """How inference steps of concurrent sessions share a forward pass (continuous batching)."""

    max_batch_sessions: int = 8
    """most sessions whose waiting inference steps run as one forward (1: every step runs alone)"""
    batch_wait_ms: float = 50.0
    """most milliseconds a forward waits for the steps of sessions that are generating now (also at most half a
    forward's time; a lone session never waits; 0: batch only the steps already waiting)"""

    def __post_init__(self):
        _check_positive(self, ("max_batch_sessions",))
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be within 0..1000 milliseconds, got {self.batch_wait_ms}")


@dataclass(frozen=True, kw_only=True)
class ActivationCacheConfig:
    """What a server keeps from a training forward pass so that its backward need not recompute it."""

    activation_cache_mb: float = 1024.0
    """most MiB of activations (autograd graphs of forward calls awaiting their backward) kept at once, the oldest
    dropped first; a backward whose graph is gone recomputes the forward pass (0: keep nothing, always recompute)"""
    activation_ttl_s: float = 60.0
    """seconds a kept forward waits for its backward before it is dropped"""

    def __post_init__(self):
        if not self.activation_cache_mb >= 0:
            raise ValueError(f"activation_cache_mb must be >= 0 MiB (0: off), got {self.activation_cache_mb}")
        _check_positive(self, ("activation_ttl_s",), " seconds")

    @property
    def budget_bytes(self) -> int:
        return int(self.activation_cache_mb * 2**20)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Host a span of a model's transformer blocks and announce it to the swarm."""

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    """Hub repo id, local checkpoint folder, or bundled short name (smollm2-135m)"""
    new_swarm: bool = False
    """start a new swarm (no initial peers)"""
    network: PeerConfig = field(default_factory=PeerConfig)
    span: SpanConfig = field(default_factory=SpanConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    announce: AnnounceConfig = field(default_factory=AnnounceConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    activations: ActivationCacheConfig = field(default_factory=ActivationCacheConfig)

    def __post_init__(self):
        if self.new_swarm == bool(self.network.initial_peers):
            raise ValueError(
                f"pass either --initial-peers (got {list(self.network.initial_peers)}) or --new-swarm "
                f"(got {self.new_swarm})"
            )
