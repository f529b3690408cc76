"""Settings of one server: a single frozen dataclass, from which the CLI flags are generated."""

from __future__ import annotations

from dataclasses import dataclass, field

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_QUANTS = ("none", "int8", "nf4")


def _help(text: str, **kwargs) -> dict:
    return {"help": text, **kwargs}


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything ``corolla serve`` can be told. Validated on construction (ValueError names the bad values)."""

    model: str = field(metadata=_help("Hub repo id, local checkpoint folder, or bundled short name (smollm2-135m)"))
    initial_peers: tuple[str, ...] = field(default=(), metadata=_help("multiaddrs of peers already in the swarm"))
    new_swarm: bool = field(default=False, metadata=_help("start a new swarm (no initial peers)"))
    num_blocks: int | None = field(default=None, metadata=_help("how many consecutive blocks to serve"))
    blocks: str | None = field(default=None, metadata=_help("exact span to serve, as START:END (END exclusive)"))
    device: str = field(default="cpu", metadata=_help("torch device, e.g. cpu or cuda:0"))
    dtype: str = field(default="auto", metadata=_help("weights dtype: " + ", ".join(_DTYPES)))
    quant: str = field(default="none", metadata=_help("weight quantization: " + ", ".join(_QUANTS)))
    cache_tokens: int = field(default=8192, metadata=_help("attention-cache budget, in tokens, for all sessions"))
    max_batch_tokens: int = field(default=8192, metadata=_help("largest number of tokens in one request"))
    compute_chunk_tokens: int = field(
        default=2048, metadata=_help("forward/backward requests over this many tokens run in chunks of rows")
    )
    max_session_length: int = field(default=4096, metadata=_help("longest inference session (tokens) accepted"))
    public_name: str | None = field(default=None, metadata=_help("a name shown in the swarm monitor"))
    host_maddrs: tuple[str, ...] = field(
        default=("/ip4/127.0.0.1/tcp/0",), metadata=_help("multiaddrs to listen on, e.g. /ip4/0.0.0.0/tcp/31337")
    )
    announce_maddrs: tuple[str, ...] = field(default=(), metadata=_help("public multiaddrs announced to others"))
    identity: str | None = field(default=None, metadata=_help("file with a persistent peer identity (created)"))
    dht_prefix: str | None = field(default=None, metadata=_help("DHT namespace of this model (default: from name)"))
    throughput: str = field(default="auto", metadata=_help("auto (cached measurement), eval (re-measure) or FLOAT"))
    update_period_s: float = field(
        default=30.0, metadata=_help("seconds between DHT announcements", aliases=("--update-period",))
    )
    request_timeout_s: float = field(
        default=180.0, metadata=_help("seconds a request may take before it is failed", aliases=("--request-timeout",))
    )
    session_timeout_s: float = field(
        default=300.0, metadata=_help("seconds a session may wait for its next step", aliases=("--session-timeout",))
    )
    alloc_timeout_s: float = field(
        default=5.0, metadata=_help("seconds a session waits for cache room", aliases=("--alloc-timeout",))
    )
    balance_quality: float = field(
        default=0.75,
        metadata=_help("move when the swarm's bottleneck is under this share of the achievable (0: never)"),
    )
    balance_period_s: float = field(
        default=120.0, metadata=_help("mean seconds between balance checks", aliases=("--balance-period",))
    )
    join_jitter_s: float = field(
        default=2.0,
        metadata=_help("random delay (s) before choosing blocks, avoids herds", aliases=("--join-jitter",)),
    )
    num_threads: int = field(default=1, metadata=_help("torch threads for compute (1 suits many processes)"))
    adapters: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "PEFT LoRA adapters to preload, each a folder (adapter_config.json + adapter_model.safetensors; named by "
            "its folder name), a cached Hub repo id (named by the id) or NAME=PATH; clients pick one by name with "
            "active_adapter"
        ),
    )

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {_DTYPES}")
        if self.quant not in _QUANTS:
            raise ValueError(f"quant={self.quant!r} is not one of {_QUANTS}")
        if self.new_swarm == bool(self.initial_peers):
            raise ValueError(
                f"pass either --initial-peers (got {list(self.initial_peers)}) or --new-swarm (got {self.new_swarm})"
            )
        if self.num_blocks is not None and self.blocks is not None:
            raise ValueError(f"pass --num-blocks ({self.num_blocks}) or --blocks ({self.blocks}), not both")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.blocks is not None:
            self.parse_blocks()
        for name in ("cache_tokens", "max_batch_tokens", "compute_chunk_tokens", "max_session_length", "num_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.balance_quality <= 1:
            raise ValueError(f"balance_quality must be in [0, 1], got {self.balance_quality}")
        if self.join_jitter_s < 0:
            raise ValueError(f"join_jitter_s must be >= 0 seconds, got {self.join_jitter_s}")
        for name in (
            "update_period_s",
            "request_timeout_s",
            "session_timeout_s",
            "alloc_timeout_s",
            "balance_period_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive seconds, got {getattr(self, name)}")
        names = self.adapter_names()
        if len(set(names)) != len(names):
            raise ValueError(f"two --adapters have the same name: {list(names)}; name them with NAME=PATH")
        if self.throughput not in ("auto", "eval"):
            try:
                if float(self.throughput) <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"throughput must be auto, eval or a positive number, got {self.throughput!r}"
                ) from None

    def peer_config(self):
        """The ``corolla.net.peer.PeerConfig`` of this server's peer (identity, addresses, initial peers)."""
        from corolla.net.peer import PeerConfig

        return PeerConfig(
            initial_peers=self.initial_peers,
            host_maddrs=self.host_maddrs,
            announce_maddrs=self.announce_maddrs,
            identity=self.identity,
        )

    def nominal_throughput(self) -> float:
        """What a record says before the speed is known: the configured value, or 1 (enough for servers choosing
        their blocks meanwhile to count this one; clients never route to JOINING)."""
        fixed = self.fixed_throughput()
        return 1.0 if fixed is None else fixed

    def fixed_throughput(self) -> float | None:
        """The throughput given as a number (``--throughput 100``), or None for ``auto`` / ``eval``."""
        return None if self.throughput in ("auto", "eval") else float(self.throughput)

    def adapter_names(self) -> tuple[str, ...]:
        """The names clients select the ``--adapters`` by (ValueError for a malformed one)."""
        from corolla.models.lora import parse_adapter_spec

        return tuple(parse_adapter_spec(spec)[0] for spec in self.adapters)

    def parse_blocks(self) -> tuple[int, int]:
        """``"3:7"`` -> ``(3, 7)``; ValueError for anything else."""
        try:
            start, end = (int(x) for x in str(self.blocks).split(":"))
        except ValueError:
            raise ValueError(f"--blocks must look like START:END, got {self.blocks!r}") from None
        if not 0 <= start < end:
            raise ValueError(f"--blocks {self.blocks!r}: need 0 <= START < END")
        return start, end
