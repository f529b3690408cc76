"""``PeerConfig``: how a peer joins the swarm. Apart from ``net.peer`` so that reading flags imports no hivemind."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """How a peer joins the swarm: its addresses and identity (the network part of every role's config)."""

    initial_peers: tuple[str, ...] = ()
    """multiaddrs of peers already in the swarm"""
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    """multiaddrs to listen on, e.g. /ip4/0.0.0.0/tcp/31337"""
    announce_maddrs: tuple[str, ...] = ()
    """public multiaddrs announced to others"""
    identity: str | None = None
    """file with a persistent peer identity (created if missing)"""
    join_timeout_s: float = 60.0
    """seconds to wait for the DHT peer to join"""
    shutdown_step_timeout_s: float = 5.0
    """seconds each shutdown step (e.g. announcing OFFLINE) may take"""

    def __post_init__(self):
        for name in ("join_timeout_s", "shutdown_step_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive seconds, got {getattr(self, name)}")
