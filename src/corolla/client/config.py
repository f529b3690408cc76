"""Settings of a client of the swarm."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """How a client finds and talks to the swarm. All timeouts in seconds."""

    initial_peers: tuple[str, ...]
    dht_prefix: str | None = None  # default: derived from the model name like the servers do
    connect_timeout_s: float = 20.0  # joining the DHT through the initial peers
    request_timeout_s: float = 60.0  # one forward or backward RPC
    step_timeout_s: float = 30.0  # one inference step on one server
    update_period_s: float = 30.0  # how often the swarm view is refreshed
    max_retries: int = 3  # attempts per failed span before giving up
    ban_timeout_s: float = 15.0  # first ban of a failed server (doubles on each repeated failure)
    retry_backoff_s: float = 0.5  # wait before the 3rd attempt of a span (the 2nd is at once), doubling, jittered
    retry_backoff_max_s: float = 10.0  # the longest wait between attempts
    compression: str = "NONE"  # activations on the wire: NONE, FLOAT16, UNIFORM_8BIT, QUANTILE_8BIT
    push: bool = True  # servers send step outputs straight to the next server of the chain
    sub_batch_tokens: int = 1024  # forward/backward batches are split into sub-batches of about this many tokens
    # a training forward asks each server to keep its activations for the backward, which then need not recompute
    # the forward pass (servers keep them within their --activation-cache-mb; a server that lost them recomputes)
    keep_activations: bool = True
    allowed_servers: tuple[str, ...] | None = None
    blocked_servers: tuple[str, ...] = ()
    active_adapter: str | None = None  # a LoRA adapter (by the name servers announce); routes only via its holders
    seed: int | None = None  # seeds the client's random choices (training routes by throughput, retry jitter)
    # share of inference steps, forward and backward calls also sent to a second server of the same blocks and
    # compared (0: off, 1: every one); a disagreement is decided by a third server, and the liar is never used again
    verify: float = 0.0
    verify_tolerance: float | None = None  # per-token relative error allowed; None: from the servers' dtypes
    # check the proofs of lies other clients published about the servers in view (one span computation with the
    # model's weights per new proof) and never use a proven liar; this client publishes its own proofs regardless
    check_proofs: bool = True

    def __post_init__(self):
        if not self.initial_peers:
            raise ValueError(
                "initial_peers is empty: pass the multiaddrs printed by `corolla dht` (or by any server's log)"
            )
        for name in ("connect_timeout_s", "request_timeout_s", "step_timeout_s", "update_period_s", "ban_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        from corolla.net.tensors import compression_type

        compression_type(self.compression)  # ValueError naming the choices
        if self.compression.upper() == "BLOCKWISE_8BIT":
            raise ValueError("BLOCKWISE_8BIT needs bitsandbytes on every peer; use UNIFORM_8BIT or QUANTILE_8BIT")
        if self.sub_batch_tokens <= 0:
            raise ValueError(f"sub_batch_tokens must be positive, got {self.sub_batch_tokens}")
        if self.active_adapter is not None and not self.active_adapter:
            raise ValueError("active_adapter must be a non-empty adapter name or None")
        if self.retry_backoff_s < 0 or self.retry_backoff_max_s < 0:
            raise ValueError("retry_backoff_s and retry_backoff_max_s must be >= 0")
        if not 0.0 <= self.verify <= 1.0:
            raise ValueError(f"verify is a share of calls in [0, 1] (0: off, 1: always), got {self.verify}")
        if self.verify_tolerance is not None and self.verify_tolerance <= 0:
            raise ValueError(f"verify_tolerance must be positive, got {self.verify_tolerance}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
