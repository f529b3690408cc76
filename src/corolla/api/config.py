"""Settings of the OpenAI-compatible gateway (``corolla api``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from corolla.monitor.config import MonitorConfig


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """Serve the swarm's models over an OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions,
    /v1/completions)."""

    initial_peers: tuple[str, ...]
    """multiaddrs of peers in the swarm"""
    host: str = "127.0.0.1"
    """address to listen on (0.0.0.0: every interface)"""
    port: int = 8000
    """TCP port to listen on (0: any free port)"""
    models: tuple[str, ...] = ()
    """models to serve (bundled short names, local checkpoint folders or Hub repo ids); empty: every model the
    swarm's registry announces whose client weights can be found here"""
    api_key: str | None = None
    """require `Authorization: Bearer KEY` on every /v1 request"""
    cors_origins: tuple[str, ...] = ()
    """origins browsers may call the API from (empty: CORS off)"""
    default_max_tokens: int = 256
    """tokens to generate when a request sets no limit (capped by the model's context)"""
    max_choices: int = 8
    """the largest `n` (choices per request) accepted"""
    verify: float = 0.0
    """share of inference steps also computed by a second server and compared (0: off, 1: every step); a server
    caught returning wrong values is never used again"""
    prompt_lookup_tokens: int = 0
    """speculative decoding: each step also sends up to this many tokens guessed from the text so far (prompt
    lookup), checked by the servers in the same step; copy-heavy answers need fewer round trips. Greedy output is
    unchanged, sampling keeps the model's distribution; for requests with n = 1 (0: off)"""
    monitor: bool = False
    """also serve the swarm health page at / (with /api/v1/state and /metrics), as `corolla monitor` does"""
    monitor_settings: MonitorConfig = field(default_factory=MonitorConfig)
    registry_timeout_s: float = 20.0
    """how long to wait for the swarm's model registry at startup"""

    def __post_init__(self):
        if not self.initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddrs printed by `corolla dht` or a server's log")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it out to serve without a key)")
        if self.default_max_tokens <= 0:
            raise ValueError(f"default_max_tokens must be positive, got {self.default_max_tokens}")
        if self.prompt_lookup_tokens < 0:
            raise ValueError(f"prompt_lookup_tokens must be >= 0, got {self.prompt_lookup_tokens}")
        if self.max_choices <= 0:
            raise ValueError(f"max_choices must be positive, got {self.max_choices}")
        if not 0 <= self.verify <= 1:
            raise ValueError(f"verify is a share of steps in [0, 1] (0: off, 1: every step), got {self.verify}")
