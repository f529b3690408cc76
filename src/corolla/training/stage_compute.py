"""What a stage peer computes for one micro-batch: forward, and a stateless backward that recomputes the forward.

A backward request carries the stage's inputs and the gradient of its outputs, so any peer of the stage can answer
it (the one that ran the forward may be gone); the peer accumulates the parameter gradients of the micro-batch into
its stage and returns the gradient of the inputs. The last stage is called once per micro-batch: it computes the
loss and its backward together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corolla.models.stages import PipelineStage

__all__ = ["BackwardResult", "stage_backward", "stage_forward", "stage_loss_backward"]


@dataclass(frozen=True)
class BackwardResult:
    grad_inputs: torch.Tensor | None  # None for stage 0 (token ids have no gradient)
    loss: float | None = None  # the last stage's loss of the micro-batch


def stage_forward(stage: PipelineStage, inputs: torch.Tensor, *, attention_mask=None) -> torch.Tensor:
    """The stage's outputs (no autograd graph is kept: backward recomputes it)."""
    if stage.is_last:
        raise ValueError("the last stage computes the loss and its backward in one call (stage_loss_backward)")
    with torch.no_grad():
        return stage(inputs, attention_mask=attention_mask)


def stage_backward(
    stage: PipelineStage,
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    *,
    attention_mask=None,
    loss_scale: float = 1.0,
) -> BackwardResult:
    """Recompute the forward with autograd, back-propagate ``grad_outputs * loss_scale``, accumulate the parameter
    gradients into ``stage`` and return the inputs' gradient."""
    if stage.is_last:
        raise ValueError("the last stage computes the loss and its backward in one call (stage_loss_backward)")
    leaf = _leaf(stage, inputs)
    with torch.enable_grad():
        outputs = stage(leaf, attention_mask=attention_mask)
        if outputs.shape != grad_outputs.shape:
            raise ValueError(f"grad_outputs has shape {tuple(grad_outputs.shape)}, outputs {tuple(outputs.shape)}")
        torch.autograd.backward(outputs, grad_outputs.to(outputs.dtype) * loss_scale)
    return BackwardResult(grad_inputs=None if stage.is_first else leaf.grad)


def stage_loss_backward(
    stage: PipelineStage, inputs: torch.Tensor, labels: torch.Tensor, *, attention_mask=None, loss_scale: float = 1.0
) -> BackwardResult:
    """The last stage: the micro-batch's loss, its backward (scaled by ``loss_scale``, e.g. 1 / micro-batches per
    step) into the stage's parameters, and the inputs' gradient."""
    if not stage.is_last:
        raise ValueError(f"stage {stage.stage} is not the last stage")
    leaf = _leaf(stage, inputs)
    with torch.enable_grad():
        loss = stage(leaf, attention_mask=attention_mask, labels=labels)
        (loss * loss_scale).backward()
    return BackwardResult(grad_inputs=None if stage.is_first else leaf.grad, loss=float(loss.detach()))


def _leaf(stage: PipelineStage, inputs: torch.Tensor) -> torch.Tensor:
    if stage.is_first:
        return inputs
    return inputs.detach().requires_grad_(True)
