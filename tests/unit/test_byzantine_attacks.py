"""What Byzantine peers send (secure/attacks.py): each attack's vector, its start step, and bad configs."""

from __future__ import annotations

import pytest
import torch

from corolla.secure.attacks import AttackConfig, byzantine_gradients, flip_labels, shared_direction


def _grads(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    honest = torch.randn(9, 50, generator=generator)
    own = torch.randn(3, 50, generator=generator)
    return honest, own


def test_nothing_changes_before_the_start_step_or_without_an_attack():
    honest, own = _grads()
    for kind in ("sign_flip", "random_direction", "ipm", "alie", "delayed"):
        assert byzantine_gradients(AttackConfig(kind, start_step=10), 9, own=own, honest=honest) is own
    assert byzantine_gradients(AttackConfig("none", start_step=0), 50, own=own, honest=honest) is own


def test_sign_flip_reverses_and_magnifies_the_peers_own_gradient():
    honest, own = _grads()
    sent = byzantine_gradients(AttackConfig("sign_flip", start_step=0, scale=1000), 0, own=own, honest=honest)
    assert torch.allclose(sent, -1000 * own)


def test_random_direction_is_one_shared_direction_at_a_thousand_honest_norms():
    honest, own = _grads()
    sent = byzantine_gradients(AttackConfig("random_direction", start_step=0), 5, own=own, honest=honest)
    assert torch.equal(sent[0], sent[1]) and torch.equal(sent[1], sent[2])
    assert sent[0].norm() == pytest.approx(1000 * float(honest.norm(dim=1).mean()), rel=1e-5)
    later = byzantine_gradients(AttackConfig("random_direction", start_step=0), 6, own=own, honest=honest)
    cosine = torch.nn.functional.cosine_similarity(sent[0], later[0], dim=0)
    assert cosine == pytest.approx(1.0, abs=1e-6)  # the same direction every step: a consistent push
    assert torch.equal(shared_direction(50, 7), shared_direction(50, 7))
    assert float(shared_direction(50, 7).norm()) == pytest.approx(1.0)


def test_ipm_and_alie_are_computed_from_the_honest_gradients():
    honest, own = _grads()
    ipm = byzantine_gradients(AttackConfig("ipm", start_step=0, ipm_epsilon=2.0), 0, own=own, honest=honest)
    assert torch.allclose(ipm, (-2.0 * honest.mean(0)).expand(3, -1))
    assert float(ipm[0] @ honest.mean(0)) < 0  # the inner product with the true mean turns negative
    alie = byzantine_gradients(AttackConfig("alie", start_step=0, alie_z=1.0), 0, own=own, honest=honest)
    assert torch.allclose(alie, (honest.mean(0) - honest.std(0)).expand(3, -1))


def test_delayed_sends_the_stale_gradient_once_there_is_one():
    honest, own = _grads()
    stale = own * 7
    config = AttackConfig("delayed", start_step=0, delay_steps=3)
    assert byzantine_gradients(config, 1, own=own, honest=honest, stale=None) is own
    assert byzantine_gradients(config, 4, own=own, honest=honest, stale=stale) is stale


def test_label_flip_changes_the_labels_not_the_vector():
    honest, own = _grads()
    config = AttackConfig("label_flip", start_step=2)
    assert byzantine_gradients(config, 5, own=own, honest=honest) is own
    assert config.flips_labels(2) and not config.flips_labels(1)
    assert flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]


def test_bad_configs_and_shapes_are_refused():
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        AttackConfig("nope")
    with pytest.raises(ValueError, match="delay_steps"):
        AttackConfig("delayed", delay_steps=0)
    honest, own = _grads()
    with pytest.raises(ValueError, match="own"):
        byzantine_gradients(AttackConfig("sign_flip", start_step=0), 0, own=own[0], honest=honest)
