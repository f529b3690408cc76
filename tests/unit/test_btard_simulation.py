"""BTARD in one process (secure/simulation.py): 16 peers on digits, 7 attack from step 50.

Shorter than the experiment (``benchmarks/exp_btard_sim.py``: 600 steps, attacks from step 100), same mechanics:
BTARD bans exactly the attackers and keeps the accuracy; the aggregators without validation fail where the paper
says they fail (the mean under a magnified sign flip, CenteredClip against a shared direction)."""

from __future__ import annotations

import pytest

from corolla.secure.attacks import AttackConfig
from corolla.secure.simulation import SimulationConfig, simulate

BYZANTINE = list(range(9, 16))


def _run(aggregator: str, kind: str, *, steps: int = 250, **extra):
    extra.setdefault("eval_every", steps)
    return simulate(
        SimulationConfig(aggregator=aggregator, steps=steps, attack=AttackConfig(kind, start_step=50), **extra)
    )


@pytest.mark.parametrize("kind", ["random_direction", "label_flip", "ipm", "alie"])
def test_btard_bans_exactly_the_attackers_and_keeps_its_accuracy(kind):
    result = _run("btard", kind)
    assert result.honest_banned == []
    assert sorted(result.banned_at) == BYZANTINE, result.banned_at
    assert all(step >= 50 for step in result.banned_at.values())  # nobody is caught before it lies
    assert result.final_accuracy >= 0.95, result.accuracy


def test_without_validation_a_shared_direction_wears_centered_clip_down_and_a_sign_flip_breaks_the_mean():
    """CenteredClip's fixed point moves by ~7/9 tau along the attackers' shared direction every step: 100 attacked
    steps take it well under BTARD's 0.95 (the experiment's 500 take it to chance); the mean is gone at once."""
    assert _run("butterfly_clip", "random_direction", steps=150).final_accuracy <= 0.8
    assert _run("mean", "sign_flip", steps=100).final_accuracy <= 0.2


def test_byzantine_validators_that_accuse_honest_peers_are_banned_themselves():
    result = _run("btard", "none", steps=60, false_accusations=True)
    assert result.honest_banned == []
    assert set(result.banned_at) <= set(BYZANTINE) and result.banned_at  # only false accusers, and some were


def test_the_same_config_gives_the_same_run():
    a, b = (_run("btard", "sign_flip", steps=70, eval_every=10) for _ in range(2))
    assert a.accuracy == b.accuracy and a.banned_at == b.banned_at


def test_bad_configs_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="unknown aggregator 'avg'"):
        SimulationConfig(aggregator="avg")
    with pytest.raises(ValueError, match="byzantine < peers"):
        SimulationConfig(peers=4, byzantine=4)
