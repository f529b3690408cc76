"""A causal LM cut into training stages equals the whole model: forward, backward and step by step training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from corolla.models.stages import StageLayout, build_model, split_into_stages
from corolla.training.data import MarkovSource, python_help_text
from corolla.training.stage_compute import stage_backward, stage_forward, stage_loss_backward
from tests.fixtures.zoo import zoo_checkpoint

TRAINED_FAMILIES = ("llama", "qwen3", "bloom")


def _config(family: str):
    config = AutoConfig.from_pretrained(zoo_checkpoint(family))
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return config


def _pipeline_step(stages, ids, *, micro_batches: int) -> float:
    """One optimizer step's gradients through the stages the way a trainer drives stage peers: per micro-batch,
    forward stage by stage, the last stage's loss and backward, then backward stage by stage in reverse."""
    losses = []
    for chunk in ids.chunk(micro_batches):
        inputs = [chunk]
        for stage in stages[:-1]:
            inputs.append(stage_forward(stage, inputs[-1]))
        result = stage_loss_backward(stages[-1], inputs[-1], chunk, loss_scale=1 / micro_batches)
        losses.append(result.loss)
        grad = result.grad_inputs
        for stage, stage_inputs in zip(reversed(stages[:-1]), reversed(inputs[:-1])):
            grad = stage_backward(stage, stage_inputs, grad).grad_inputs
        assert grad is None  # stage 0 takes token ids
    return sum(losses) / len(losses)


@pytest.mark.parametrize("family", TRAINED_FAMILIES)
def test_stages_chained_equal_the_whole_model(family):
    model = build_model(_config(family), seed=0)
    layout = StageLayout.even(model.config.num_hidden_layers, 3)
    stages = split_into_stages(model, layout)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    hidden = ids
    for stage in stages[:-1]:
        hidden = stage_forward(stage, hidden)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
        got = stages[-1](hidden, labels=ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", TRAINED_FAMILIES)
def test_training_through_stages_equals_training_the_whole_model(family):
    """Same init, same batches, AdamW per stage vs AdamW on the whole model: the same losses at every step and
    the same parameters after 6 steps (float32 tolerance: only the summation order of gradients differs)."""
    config = _config(family)
    model = build_model(config, seed=1)
    layout = StageLayout.even(config.num_hidden_layers, 3)
    stages = split_into_stages(model, layout)
    local_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stage_opts = [torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=1e-3) for s in stages]
    source = MarkovSource(vocab_size=min(32, config.vocab_size), seed=2)
    rng = np.random.default_rng(3)
    for step in range(6):
        ids = source.sample(4, 10, generator=rng)
        local_opt.zero_grad()
        local_loss = 0.0
        for chunk in ids.chunk(2):  # the same micro-batches, accumulated
            loss = model(input_ids=chunk, labels=chunk).loss / 2
            loss.backward()
            local_loss += float(loss)
        local_opt.step()
        for opt in stage_opts:
            opt.zero_grad()
        swarm_loss = _pipeline_step(stages, ids, micro_batches=2)
        for opt in stage_opts:
            opt.step()
        assert swarm_loss == pytest.approx(local_loss, rel=1e-5), step
    local = dict(model.named_parameters())
    base = {"llama": "model", "qwen3": "model", "bloom": "transformer"}[family]
    layers = {"llama": "layers", "qwen3": "layers", "bloom": "h"}[family]
    compared = 0
    for stage in stages:
        start, _ = layout.blocks(stage.stage)
        for name, param in stage.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("lm_head."):
                reference = local[name]
            else:
                inner = name.removeprefix("base_model.")
                if inner.startswith(f"{layers}."):
                    index, rest = inner[len(layers) + 1 :].split(".", 1)
                    inner = f"{layers}.{int(index) + start}.{rest}"
                reference = local[f"{base}.{inner}"]
            torch.testing.assert_close(param, reference, rtol=1e-4, atol=1e-6)
            compared += 1
    assert compared == len([p for p in model.parameters()])


def test_layouts():
    assert StageLayout.even(6, 3).bounds == (0, 2, 4, 6)
    assert StageLayout.even(5, 2).blocks(1) == (2, 5)
    with pytest.raises(ValueError):
        StageLayout.even(2, 3)
    with pytest.raises(ValueError):
        StageLayout((0, 3, 3))


def test_the_markov_source_has_an_exact_floor_that_empirical_counts_reach():
    source = MarkovSource(vocab_size=8, concentration=0.5, seed=0)
    floor = source.entropy_rate()
    assert 0 < floor < np.log(8)
    ids = source.sample(64, 400, generator=np.random.default_rng(0)).numpy()
    counts = np.zeros((8, 8))
    np.add.at(counts, (ids[:, :-1].ravel(), ids[:, 1:].ravel()), 1)
    p = source.transitions
    empirical = -(counts * np.log(p)).sum() / counts.sum()  # the true chain's loss on its own samples
    assert empirical == pytest.approx(floor, rel=0.02)
    assert np.allclose(source.stationary @ p, source.stationary)


def test_python_ships_help_text_to_train_on():
    text = python_help_text()
    assert len(text) > 100_000 and "for" in text and text == python_help_text()
