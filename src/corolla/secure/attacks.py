"""What Byzantine peers send instead of their gradient: the attacks of BTARD's experiments, as peer behaviours.

Attackers are omniscient and collude (the worst case the paper defends against): the attacks that need it see the
honest peers' gradients of the step, and attackers that share a direction share it exactly.

* ``sign_flip``: ``-scale * g`` (the peer's own gradient, reversed and magnified);
* ``random_direction``: every attacker sends the same unit direction (drawn once from ``direction_seed``) times
  ``scale`` times the honest gradients' mean norm: a *consistent* push, which CenteredClip alone cannot stop (its
  fixed point moves by about ``b / (n - b) * tau`` along it, every step);
* ``label_flip``: an honest computation on wrong labels (``classes - 1 - y``): the gradient looks plausible;
* ``delayed``: the peer's gradient from ``delay_steps`` steps ago (stale), its current one until it has one;
* ``ipm`` (inner-product manipulation, Xie et al. 2020): ``-epsilon`` times the honest mean, from every attacker;
* ``alie`` ("a little is enough", Baruch et al. 2019): the honest mean minus ``z`` honest standard deviations per
  coordinate, from every attacker: inside the spread of honest values, so clipping keeps it.

Attacks start at ``start_step``; before it attackers behave honestly (so they are not caught early).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ATTACKS", "AttackConfig", "byzantine_gradients", "flip_labels", "shared_direction"]

ATTACKS = ("none", "sign_flip", "random_direction", "label_flip", "delayed", "ipm", "alie")


@dataclass(frozen=True)
class AttackConfig:
    kind: str = "none"
    start_step: int = 100
    scale: float = 1000.0  # sign_flip's factor; random_direction's norm in honest mean norms
    ipm_epsilon: float = 2.0
    alie_z: float = 1.0
    delay_steps: int = 10
    direction_seed: int = 1234  # random_direction: the attackers' shared direction

    def __post_init__(self):
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}: choose one of {', '.join(ATTACKS)}")
        if self.start_step < 0 or self.delay_steps < 1:
            raise ValueError(f"need start_step >= 0 and delay_steps >= 1, got {self.start_step}, {self.delay_steps}")
        if not self.scale > 0 or not self.ipm_epsilon > 0 or not self.alie_z >= 0:
            raise ValueError("scale and ipm_epsilon must be positive, alie_z non-negative")

    def active(self, step: int) -> bool:
        return self.kind != "none" and step >= self.start_step

    def flips_labels(self, step: int) -> bool:
        return self.kind == "label_flip" and self.active(step)


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The label-flip attack's labels: class ``c`` becomes ``num_classes - 1 - c``."""
    return num_classes - 1 - labels


def shared_direction(dim: int, seed: int) -> torch.Tensor:
    """The unit direction that ``random_direction`` attackers share (the same for every step)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    return direction / direction.norm()


def byzantine_gradients(
    config: AttackConfig,
    step: int,
    *,
    own: torch.Tensor,
    honest: torch.Tensor,
    stale: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the attackers send at ``step``: ``own`` ``[b, d]`` are their gradients as computed (on flipped labels
    for ``label_flip``), ``honest`` ``[h, d]`` the honest peers' gradients of the step, ``stale`` ``[b, d]`` their
    gradients ``delay_steps`` ago (None: none yet). Before ``start_step``, and for ``none``, ``own``."""
    if own.ndim != 2 or honest.ndim != 2 or own.shape[1] != honest.shape[1]:
        raise ValueError(f"need own [b, d] and honest [h, d], got {tuple(own.shape)} and {tuple(honest.shape)}")
    if not config.active(step) or config.kind == "label_flip" or own.shape[0] == 0:
        return own
    if config.kind == "sign_flip":
        return -config.scale * own
    if config.kind == "delayed":
        return own if stale is None else stale
    if honest.shape[0] == 0:
        return own
    mean = honest.mean(dim=0)
    if config.kind == "random_direction":
        norm = honest.norm(dim=1).mean()
        direction = shared_direction(own.shape[1], config.direction_seed).to(own.dtype)
        return (config.scale * norm * direction).expand_as(own).clone()
    if config.kind == "ipm":
        return (-config.ipm_epsilon * mean).expand_as(own).clone()
    if config.kind == "alie":
        std = honest.std(dim=0, unbiased=honest.shape[0] > 1)
        return (mean - config.alie_z * std).expand_as(own).clone()
    raise AssertionError(config.kind)
