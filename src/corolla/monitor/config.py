"""Settings of the swarm health monitor (``corolla monitor``, or ``corolla api --monitor``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """How often the monitor reads the swarm and how long it waits for each peer."""

    refresh_period_s: float = 5.0
    """how often the swarm's state is read again (the page refreshes at the same pace)"""
    call_timeout_s: float = 3.0
    """how long a server or bootstrap peer may take to answer before it counts as unreachable"""
    dht_timeout_s: float = 10.0
    """how long one read of the DHT may take"""

    def __post_init__(self):
        for name in ("refresh_period_s", "call_timeout_s", "dht_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class MonitorCommandConfig(MonitorConfig):
    """Serve a web page showing whether a swarm can serve its models, with /api/v1/state (JSON) and /metrics
    (Prometheus)."""

    initial_peers: tuple[str, ...]
    """multiaddrs of peers in the swarm"""
    host: str = "127.0.0.1"
    """address to listen on (0.0.0.0: every interface)"""
    port: int = 8001
    """TCP port to listen on (0: any free port)"""

    def __post_init__(self):
        super().__post_init__()
        if not self.initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddrs printed by `corolla dht` or a server's log")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
