"""SWARM training between real processes: stage peers (``corolla stage``) on loopback and a trainer."""

from __future__ import annotations

import signal

import pytest
import torch

from corolla.local_swarm import LocalSwarm
from corolla.models.stages import StageLayout
from corolla.training.trainer import Trainer
from tests.fixtures.swarm_training import reference_name, saved_stages, stage_args, train_locally, trainer_config
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_swarm_training_equals_training_in_one_process(family, tmp_path):
    """One trainer, one peer per stage, no compression, synchronous steps: the same losses at every step and the
    same parameters after 4 AdamW steps as transformers' model trained whole on the same batches."""
    model, stages = str(zoo_checkpoint(family)), 3
    save_dir = tmp_path / "saved"
    with LocalSwarm(model=model, log_dir=tmp_path / "logs") as swarm:
        for stage in range(stages):
            args = stage_args("exact", stages, "--stage", str(stage), "--save-dir", str(save_dir))
            swarm.start_stage_peer(f"stage{stage}", [*args, "--averaging-compression", "NONE"])
        swarm.wait_until_stages("exact", stages, peers=[f"stage{s}" for s in range(stages)])
        config = trainer_config(model, swarm, "exact", stages, synchronous=True)
        reports = Trainer(config).train()
        swarm.stop()  # SIGTERM: each peer saves its stage
    expected_losses, reference = train_locally(config)
    assert [r.failed_microbatches for r in reports] == [0] * config.steps
    assert [r.loss for r in reports] == pytest.approx(expected_losses, rel=1e-5)
    saved = saved_stages(save_dir)
    assert len(saved) == stages
    layout = StageLayout.even(reference.config.num_hidden_layers, stages)
    local = dict(reference.named_parameters())
    compared = set()
    for (name, tensors), stage in zip(sorted(saved.items()), range(stages)):
        assert f"stage{stage}" in name
        for param_name, value in tensors.items():
            full = reference_name(family, stage, layout, param_name)
            torch.testing.assert_close(value, local[full].detach(), rtol=1e-4, atol=1e-6)
            compared.add(full)
    assert compared == set(local)  # every parameter of the model was trained by some stage
    assert expected_losses[-1] < expected_losses[0]
