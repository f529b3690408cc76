"""Training data that exists offline.

``MarkovSource``: token sequences from a random first-order Markov chain over a small vocabulary. A model that
predicts the next token can do no better than the chain's entropy rate, which is known exactly, so a test can say
"converged" (within some nats of the floor) without any data set.

``python_help_text``: real English text that ships with every Python (the ``pydoc_data`` help topics, ~0.5 MB),
for the example that trains on text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MarkovSource", "python_help_text"]


@dataclass(frozen=True)
class MarkovSource:
    """A random Markov chain: ``vocab_size`` states; each row's transition probabilities drawn from a Dirichlet of
    ``concentration`` (small: peaked, low entropy), from ``seed``. Token 0..vocab_size-1 are the states."""

    vocab_size: int = 16
    concentration: float = 0.3
    seed: int = 0

    def __post_init__(self):
        if self.vocab_size < 2 or not self.concentration > 0:
            raise ValueError(
                f"need vocab_size >= 2 and concentration > 0, got {self.vocab_size}, {self.concentration}"
            )

    @property
    def transitions(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        matrix = rng.dirichlet(np.full(self.vocab_size, self.concentration), size=self.vocab_size)
        return np.maximum(matrix, 1e-12) / np.maximum(matrix, 1e-12).sum(axis=1, keepdims=True)

    @property
    def stationary(self) -> np.ndarray:
        values, vectors = np.linalg.eig(self.transitions.T)
        vector = np.real(vectors[:, np.argmin(np.abs(values - 1))])
        return vector / vector.sum()

    def entropy_rate(self) -> float:
        """Nats per token: the lowest mean next-token loss any model can reach (every predicted token follows a
        known predecessor; a first-order chain gains nothing from a longer context)."""
        p = self.transitions
        return float(-(self.stationary[:, None] * p * np.log(p)).sum())

    def sample(self, batch_size: int, seq_len: int, *, generator: np.random.Generator) -> torch.Tensor:
        """``[batch_size, seq_len]`` token ids; the first token of each row from the stationary distribution."""
        p = self.transitions
        cumulative = np.cumsum(p, axis=1)
        tokens = np.empty((batch_size, seq_len), dtype=np.int64)
        tokens[:, 0] = generator.choice(self.vocab_size, size=batch_size, p=self.stationary)
        for t in range(1, seq_len):
            u = generator.random(batch_size)
            rows = cumulative[tokens[:, t - 1]]
            tokens[:, t] = np.minimum((rows < u[:, None]).sum(axis=1), self.vocab_size - 1)
        return torch.from_numpy(tokens)


def python_help_text() -> str:
    """The help topics that ship with Python (``pydoc_data.topics``), joined in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))
