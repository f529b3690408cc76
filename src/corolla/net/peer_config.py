"""``PeerConfig``: how a peer joins the swarm. Apart from ``net.peer`` so that reading flags imports no hivemind."""

from __future__ import annotations

from dataclasses import dataclass

REACHABILITY = ("auto", "direct", "relay")


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
    reachability: str = "auto"
    """auto: ask a bootstrap peer to dial this peer back and, if it cannot (NAT, firewall), be reached through
    relays; direct: others can connect to this peer; relay: only through relays"""
    relays: tuple[str, ...] = ()
    """relay peers (multiaddrs) to reserve slots at when reached through relays; empty: the initial peers.
    libp2p reserves at once given 4 or more, else after about 3 minutes"""
    relay_wait_s: float = 240.0
    """how long a peer behind NAT waits for a relay slot before it goes on without one"""
    join_timeout_s: float = 60.0
    """seconds to wait for the DHT peer to join"""
    shutdown_step_timeout_s: float = 5.0
    """seconds each shutdown step (e.g. announcing OFFLINE) may take"""

    def __post_init__(self):
        if self.reachability not in REACHABILITY:
            raise ValueError(f"reachability must be one of {', '.join(REACHABILITY)}, got {self.reachability!r}")
        for name in ("join_timeout_s", "shutdown_step_timeout_s", "relay_wait_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive seconds, got {getattr(self, name)}")
