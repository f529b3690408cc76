"""``BtardPeerConfig``: one peer of a BTARD-SGD run (``corolla btard``). Apart from the peer so that reading flags
imports no hivemind."""

from __future__ import annotations

from dataclasses import dataclass, field

from corolla.net.peer_config import PeerConfig


@dataclass(frozen=True, kw_only=True)
class BtardPeerConfig:
    """Train an MLP on scikit-learn's digits with BTARD-SGD among peers that may be malicious: verified butterfly
    CenteredClip, validators that recompute gradients, bans of proven liars."""

    run: str = "btard"
    """name of the run: every peer of a run uses the same one"""
    peers: int
    """peers in the run: training starts once this many have announced themselves"""
    steps: int = 300
    """optimizer steps"""
    hidden: int = 64
    """hidden units of the MLP"""
    batch_size: int = 16
    """samples per peer and step (drawn from the public seed of step and peer)"""
    lr: float = 0.1
    """SGD learning rate"""
    momentum: float = 0.9
    """SGD momentum"""
    tau: float = 1.0
    """CenteredClip's clipping radius"""
    validators: int = 1
    """gradients recomputed by a validator chosen by the shared seed, per step"""
    phase_timeout_s: float = 10.0
    """seconds to wait for the other peers' messages of a phase; a peer still silent is eliminated"""
    attack: str = "none"
    """behave maliciously (tests, experiments), e.g. sign_flip@20 or wrong_aggregate@10,forge@5"""
    init_seed: int = 0
    """seed of the model's initial weights (the same for every peer)"""
    wait_for_peers_s: float = 120.0
    """seconds to wait for the run's other peers to announce themselves"""
    result: str | None = None
    """write a JSON summary here at the end (accuracy, bans, void steps, time per phase)"""
    new_swarm: bool = False
    """start a new swarm (no initial peers)"""
    network: PeerConfig = field(default_factory=PeerConfig)

    def __post_init__(self):
        if self.peers < 2:
            raise ValueError(f"a BTARD run needs at least 2 peers, got --peers {self.peers}")
        for name in ("steps", "hidden", "batch_size", "lr", "tau", "phase_timeout_s", "wait_for_peers_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1 or self.validators < 0:
            raise ValueError("need 0 <= momentum < 1 and validators >= 0")
        if self.new_swarm == bool(self.network.initial_peers):
            raise ValueError("pass either --initial-peers or --new-swarm")
        from corolla.secure.behaviour import Behaviour

        Behaviour.parse(self.attack)  # a typo fails before anything starts
