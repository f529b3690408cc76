"""BTARD-SGD with every peer in one process: what each aggregator does to training when some peers attack.

``n`` peers train one MLP on scikit-learn's bundled digits with synchronous data-parallel SGD (momentum). Every step
each peer computes a gradient on a batch drawn from a *public* seed (``1_000_003 * step + peer``), so anyone can
recompute anyone's gradient; Byzantine peers send what their attack says instead (``secure.attacks``). The step's
update is one of:

* ``mean``: plain all-reduce;
* ``median``: the coordinate-wise median;
* ``centered_clip``: CenteredClip over the whole vector (a trusted server would do this);
* ``butterfly_clip``: the vector cut into one part per peer, each part aggregated with CenteredClip by "its" peer
  (what a butterfly all-reduce with CenteredClip computes), no checks;
* ``btard``: ``butterfly_clip`` plus BTARD's validation: a seed drawn by commit-reveal among the peers picks
  ``validators`` pairs (validator, target) per step; an honest validator recomputes the target's gradient from the
  public data and accuses it if it differs from what the target sent (its commitment); every peer checks the
  evidence (by recomputing it), so a proven liar is banned and a false accuser is banned instead
  (``algorithms.accusations``); bans apply from the next step, and banned peers neither send nor aggregate.

In one process the aggregators are honest (the real protocol catches a wrong aggregate with the projected
fixed-point check, ``algorithms.clip_verification``), validators also train, and the commitment of a gradient is
the gradient itself (the real protocol hashes its parts). Deterministic: the same config gives the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from corolla.algorithms.accusations import BanState, ProvenLie, apply
from corolla.algorithms.centered_clip import CenteredClipConfig, centered_clip
from corolla.algorithms.commit_reveal import combine, make_commitment, seed_to_generator
from corolla.secure.attacks import AttackConfig, byzantine_gradients
from corolla.secure.digits import DigitsModel, digits_split

__all__ = ["AGGREGATORS", "SimulationConfig", "SimulationResult", "digits_split", "simulate"]

AGGREGATORS = ("mean", "median", "centered_clip", "butterfly_clip", "btard")


@dataclass(frozen=True)
class SimulationConfig:
    aggregator: str = "btard"
    attack: AttackConfig = field(default_factory=AttackConfig)
    peers: int = 16
    byzantine: int = 7  # the last ``byzantine`` peers attack
    steps: int = 600
    batch_size: int = 16
    hidden: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    tau: float = 1.0
    clip_iters: int = 50
    clip_tol: float = 1e-6
    validators: int = 1  # validations per step (btard)
    false_accusations: bool = False  # Byzantine validators accuse honest peers (else they never accuse)
    eval_every: int = 50
    seed: int = 0  # the model's init and the data split

    def __post_init__(self):
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}: choose one of {', '.join(AGGREGATORS)}")
        if not 0 <= self.byzantine < self.peers or self.peers < 2:
            raise ValueError(f"need peers >= 2 and 0 <= byzantine < peers, got {self.peers}, {self.byzantine}")
        for name in ("steps", "batch_size", "hidden", "clip_iters", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or not self.tau > 0 or self.validators < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1, tau > 0 and validators >= 0")


@dataclass(frozen=True)
class SimulationResult:
    config: SimulationConfig
    accuracy: list[tuple[int, float]]  # (step, test accuracy) every eval_every steps and at the end
    final_accuracy: float
    banned_at: dict[int, int]  # peer -> the step whose validation banned it
    honest_banned: list[int]
    byzantine_left: list[int]  # attackers never banned
    seconds: float
    diverged_at: int | None = None  # the step whose honest gradients were no longer finite (training stopped there)

    @property
    def all_attackers_banned_by(self) -> int | None:
        """The step by which every attacker was banned (None: some never were)."""
        if self.byzantine_left:
            return None
        byzantine = range(self.config.peers - self.config.byzantine, self.config.peers)
        return max((self.banned_at[p] for p in byzantine), default=0)


def _butterfly_clip(gradients: torch.Tensor, clip: CenteredClipConfig) -> torch.Tensor:
    parts = torch.tensor_split(gradients, gradients.shape[0], dim=1)
    return torch.cat([centered_clip(part, config=clip).value for part in parts])


def _aggregate(kind: str, gradients: torch.Tensor, clip: CenteredClipConfig) -> torch.Tensor:
    if kind == "mean":
        return gradients.mean(dim=0)
    if kind == "median":
        return torch.quantile(gradients, 0.5, dim=0)
    if kind == "centered_clip":
        return centered_clip(gradients, config=clip).value
    return _butterfly_clip(gradients, clip)


def _step_seed(step: int, peers: list[int], rng: np.random.Generator) -> bytes:
    """Commit-reveal among the peers (each commits to 32 random bytes, then reveals): the step's shared seed."""
    round_id = f"btard-sim:{step}"
    values = {str(p): rng.bytes(32) for p in peers}
    commitments = {p: make_commitment(round_id, p, v) for p, v in values.items()}
    result = combine(round_id, values, commitments)
    if result.seed is None:  # every reveal matches in this simulation
        raise AssertionError("commit-reveal failed with honest reveals")
    return result.seed


def simulate(cfg: SimulationConfig, *, progress=None) -> SimulationResult:
    """Train with ``cfg.aggregator`` while ``cfg.byzantine`` peers run ``cfg.attack``; ``progress(step)`` is called
    after every step (e.g. a progress bar's update)."""
    started = time.perf_counter()
    x_train, y_train, x_test, y_test = digits_split(cfg.seed)
    model = DigitsModel(x_train, y_train, hidden=cfg.hidden, batch_size=cfg.batch_size, seed=cfg.seed)
    clip = CenteredClipConfig(tau=cfg.tau, max_iters=cfg.clip_iters, tol=cfg.clip_tol)
    byzantine = set(range(cfg.peers - cfg.byzantine, cfg.peers))
    state = BanState.start([str(p) for p in range(cfg.peers)])
    banned_at: dict[int, int] = {}
    history: dict[int, list[torch.Tensor]] = {p: [] for p in byzantine}  # for the delayed attack
    velocity = torch.zeros_like(model.flat)
    rng = np.random.default_rng([cfg.seed, 0xB7A2D])  # the peers' secret values for commit-reveal
    accuracy: list[tuple[int, float]] = []
    diverged_at = None
    for step in range(cfg.steps):
        alive = sorted(int(p) for p in state.active)
        honest = [p for p in alive if p not in byzantine]
        attackers = [p for p in alive if p in byzantine]
        sent = {p: model.gradient(step, p) for p in honest}
        if not all(bool(torch.isfinite(g).all()) for g in sent.values()):
            diverged_at = step  # the parameters blew up: nothing left to train
            accuracy.append((step, model.accuracy(x_test, y_test)))
            break
        if attackers:
            own = torch.stack([model.gradient(step, p, wrong_labels=cfg.attack.flips_labels(step)) for p in attackers])
            stale = None
            if all(len(history[p]) >= cfg.attack.delay_steps for p in attackers):
                stale = torch.stack([history[p][-cfg.attack.delay_steps] for p in attackers])
            honest_grads = torch.stack([sent[p] for p in honest]) if honest else own[:0]
            bad = byzantine_gradients(cfg.attack, step, own=own, honest=honest_grads, stale=stale)
            # a message carries finite float32 values: an attack that overflows (its scale times a diverged
            # model's gradient norm) is sent at float32's largest magnitude
            big = torch.finfo(bad.dtype).max
            bad = torch.nan_to_num(bad, nan=0.0, posinf=big, neginf=-big)
            for i, p in enumerate(attackers):
                history[p] = [*history[p][-cfg.attack.delay_steps :], own[i]]
                sent[p] = bad[i]
        gradients = torch.stack([sent[p] for p in alive])
        update = _aggregate(cfg.aggregator, gradients, clip)
        if cfg.aggregator == "btard" and cfg.validators:
            generator = seed_to_generator(_step_seed(step, [str(p) for p in alive], rng))
            for _ in range(cfg.validators):
                validator = int(generator.choice(alive))
                target = int(generator.choice([p for p in alive if p != validator]))
                lied = not torch.equal(sent[target], model.gradient(step, target))  # anyone can recompute it
                accuses = lied if validator not in byzantine else (cfg.false_accusations and target not in byzantine)
                if accuses:
                    before = set(state.banned)
                    state = apply(state, ProvenLie(accuser=str(validator), accused=str(target), evidence_valid=lied))
                    for peer in set(state.banned) - before:
                        banned_at[int(peer)] = step
        velocity = cfg.momentum * velocity + update
        model.flat = model.flat - cfg.lr * velocity
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            accuracy.append((step + 1, model.accuracy(x_test, y_test)))
        if progress is not None:
            progress(step)
    return SimulationResult(
        config=cfg,
        accuracy=accuracy,
        final_accuracy=accuracy[-1][1],
        banned_at=banned_at,
        honest_banned=sorted(p for p in banned_at if p not in byzantine),
        byzantine_left=sorted(p for p in byzantine if p not in banned_at),
        seconds=time.perf_counter() - started,
        diverged_at=diverged_at,
    )
