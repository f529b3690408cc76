"""A stage peer's trainable state and the work it does on it: forward, accumulating backward, optimizer steps.

Everything here runs on the peer's single compute thread (``StagePeer`` submits it there), except the state
snapshot that hivemind's state download takes from another thread, hence the lock.

Gradients: each micro-batch's parameter gradients are accumulated into ``param.grad`` weighted by its number
of samples (the last stage scales the micro-batch's mean loss by its samples; that factor flows back through
the gradients every earlier stage receives), so that at the end of an epoch ``grad / samples`` is the
sample-weighted mean gradient of this peer, and averaging those means across the stage's peers weighted by
their samples gives the mean over every sample the stage processed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import torch

from corolla.algorithms.stage_wiring import ThroughputEMA
from corolla.models.stages import PipelineStage
from corolla.training.ledger import DuplicateMicrobatch, MicrobatchLedger
from corolla.training.stage_compute import stage_backward, stage_forward, stage_loss_backward

__all__ = ["BackwardOutcome", "StageWorker", "TrainingState"]


@dataclass(frozen=True)
class BackwardOutcome:
    grad_inputs: torch.Tensor | None
    loss: float | None
    compute_s: float
    accumulated: bool  # False: a duplicate of a micro-batch already accumulated in this epoch (inputs' grad only)


@dataclass(frozen=True)
class TrainingState:
    """What a joining peer downloads: the epoch, the parameters and the optimizer's statistics."""

    epoch: int
    optimizer_steps: int
    tensors: list[torch.Tensor]  # parameters, then exp_avg and exp_avg_sq of each parameter


class StageWorker:
    """One stage's parameters, AdamW, at-most-once ledger and epoch counter."""

    def __init__(self, stage: PipelineStage, *, lr: float, weight_decay: float):
        self.stage = stage
        self.params = [p for p in stage.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.ledger = MicrobatchLedger()
        self.epoch = 0
        self.lock = threading.RLock()
        self.speed = ThroughputEMA(alpha=0.1)  # seconds per forward-equivalent sample

    # ---- compute -------------------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        with self.lock:
            outputs = stage_forward(self.stage, inputs)
        elapsed = time.perf_counter() - started
        self.speed.update(elapsed, inputs.shape[0])
        return outputs, elapsed

    def backward(self, microbatch_id: str, inputs: torch.Tensor, target: torch.Tensor) -> BackwardOutcome:
        """``target``: the gradient of the stage's outputs, or the labels at the last stage."""
        started = time.perf_counter()
        samples = inputs.shape[0]
        with self.lock:
            try:
                self.ledger.begin(microbatch_id)
            except DuplicateMicrobatch:
                grad, loss = self._inputs_gradient_only(inputs, target)
                return BackwardOutcome(grad, loss, time.perf_counter() - started, accumulated=False)
            try:
                if self.stage.is_last:
                    result = stage_loss_backward(self.stage, inputs, target, loss_scale=float(samples))
                else:  # grad_outputs already carry the last stage's factor of ``samples``
                    result = stage_backward(self.stage, inputs, target)
            except BaseException:
                self.ledger.abort(microbatch_id)
                raise
            self.ledger.commit(microbatch_id, samples)
        elapsed = time.perf_counter() - started
        self.speed.update(elapsed, samples * 2.5)  # a backward recomputes the forward: ~2.5 forward-equivalents
        grad = None if result.grad_inputs is None else result.grad_inputs.detach()
        return BackwardOutcome(grad, result.loss, elapsed, accumulated=True)

    def _inputs_gradient_only(self, inputs: torch.Tensor, target: torch.Tensor):
        """A retried micro-batch that is already accumulated: the trainer still needs the inputs' gradient."""
        if self.stage.is_first and not self.stage.is_last:
            return None, None
        leaf = inputs if self.stage.is_first else inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            if self.stage.is_last:
                out = self.stage(leaf, labels=target)
                loss = float(out.detach())
                if self.stage.is_first:
                    return None, loss
                (grad,) = torch.autograd.grad(out * inputs.shape[0], leaf)
                return grad, loss
            out = self.stage(leaf)
            (grad,) = torch.autograd.grad(out, leaf, target.to(out.dtype))
            return grad, None

    # ---- epochs --------------------------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        return self.ledger.samples

    def mean_gradients(self) -> list[torch.Tensor]:
        """This peer's sample-weighted mean gradient of the epoch (zeros if it accumulated nothing)."""
        with self.lock:
            n = self.ledger.samples
            return [p.grad.detach() / n if p.grad is not None and n else torch.zeros_like(p) for p in self.params]

    def apply_step(self, gradients: list[torch.Tensor]) -> None:
        """The optimizer step of the epoch with ``gradients`` (averaged over the stage, or this peer's own when it
        is alone); a new epoch starts with no accumulated micro-batches."""
        with self.lock:
            for p, g in zip(self.params, gradients):
                p.grad = g.to(p.dtype).clone()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ledger.new_round()
            self.epoch += 1

    def discard_gradients(self) -> int:
        """Forget the gradients accumulated in this epoch (they went into a round this peer then failed); returns
        how many samples they held. Their micro-batch ids may come again."""
        with self.lock:
            samples = self.ledger.samples
            self.optimizer.zero_grad(set_to_none=True)
            self.ledger.new_round()
            return samples

    # ---- state download ------------------------------------------------------------------------------------
    def state(self) -> TrainingState:
        with self.lock:
            tensors = [p.detach().clone() for p in self.params]
            steps = 0
            for p in self.params:
                st = self.optimizer.state.get(p, {})
                steps = int(st["step"]) if "step" in st else steps
                tensors.append(st["exp_avg"].clone() if "exp_avg" in st else torch.zeros_like(p))
            for p in self.params:
                st = self.optimizer.state.get(p, {})
                tensors.append(st["exp_avg_sq"].clone() if "exp_avg_sq" in st else torch.zeros_like(p))
            return TrainingState(epoch=self.epoch, optimizer_steps=steps, tensors=tensors)

    def load_state(self, state: TrainingState) -> None:
        """Take a downloaded state (ValueError if it does not fit this stage); accumulated gradients are kept."""
        n = len(self.params)
        if len(state.tensors) != 3 * n:
            raise ValueError(f"a state of {len(state.tensors)} tensors does not fit a stage of {n} parameters")
        for p, t in zip(self.params, state.tensors):
            if t.shape != p.shape:
                raise ValueError(f"a downloaded tensor has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
        with self.lock, torch.no_grad():
            for p, t in zip(self.params, state.tensors[:n]):
                p.copy_(t)
            self.optimizer.state.clear()
            if state.optimizer_steps > 0:
                for i, p in enumerate(self.params):
                    self.optimizer.state[p] = {
                        "step": torch.tensor(float(state.optimizer_steps)),
                        "exp_avg": state.tensors[n + i].to(p.dtype).clone(),
                        "exp_avg_sq": state.tensors[2 * n + i].to(p.dtype).clone(),
                    }
            self.epoch = state.epoch

    def parameters_digest(self) -> str:
        """A short hash of the parameters' bytes (equal digests: bitwise equal parameters)."""
        digest = hashlib.sha256()
        with self.lock:
            for p in self.params:
                digest.update(p.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]
