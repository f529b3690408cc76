"""The BTARD experiments' task: an MLP on scikit-learn's bundled digits, as a flat parameter vector, with every
peer's batch drawn from a public seed (step, peer) so that anyone can recompute anyone's gradient."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from corolla.secure.attacks import flip_labels

__all__ = ["NUM_CLASSES", "DigitsModel", "DigitsTask", "digits_split", "peer_number"]

NUM_CLASSES = 10


def peer_number(peer_id: str) -> int:
    """A peer's number in the public batch seeds (48 bits of SHA-256 of its peer id)."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:6], "big")


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (8x8 images, 1,797 samples) scaled to [0, 1], split 80/20, stratified."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - a dev dependency
        raise ImportError("the BTARD simulation needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, stratify=digits.target, random_state=seed
    )
    return (torch.from_numpy(x_train), torch.from_numpy(y_train).long(), torch.from_numpy(x_test),
            torch.from_numpy(y_test).long())  # fmt: skip


class DigitsModel:
    """The MLP as a flat parameter vector, and a peer's gradient on its public batch of a step."""

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor, *, hidden: int, batch_size: int, seed: int):
        torch.manual_seed(seed)
        self.module = torch.nn.Sequential(
            torch.nn.Linear(x_train.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, NUM_CLASSES)
        )
        self.names = [n for n, _ in self.module.named_parameters()]
        self.shapes = [p.shape for _, p in self.module.named_parameters()]
        self.flat = torch.cat([p.detach().flatten() for p in self.module.parameters()])
        self.x, self.y, self.batch_size = x_train, y_train, batch_size
        self._grad = grad(self._loss)

    def params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            out[name] = flat[offset : offset + size].view(shape)
            offset += size
        return out

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.module, params, (x,)), y)

    def batch(self, step: int, peer: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(1_000_003 * step + peer)
        index = torch.from_numpy(rng.choice(len(self.x), size=self.batch_size, replace=False))
        return self.x[index], self.y[index]

    def gradient(self, step: int, peer: int, *, wrong_labels: bool = False) -> torch.Tensor:
        x, y = self.batch(step, peer)
        if wrong_labels:
            y = flip_labels(y, NUM_CLASSES)
        grads = self._grad(self.params(self.flat), x, y)
        return torch.cat([grads[name].flatten() for name in self.names])

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            logits = functional_call(self.module, self.params(self.flat), (x,))
        return float((logits.argmax(dim=1) == y).float().mean())


class DigitsTask:
    """``DigitsModel`` for the BTARD protocol (``secure.protocol.Task``): peers named by their peer ids."""

    def __init__(self, model: DigitsModel):
        self.model = model

    @property
    def params(self) -> torch.Tensor:
        return self.model.flat

    def gradient(self, step: int, peer: str, *, wrong_labels: bool = False) -> torch.Tensor:
        return self.model.gradient(step, peer_number(peer), wrong_labels=wrong_labels)
