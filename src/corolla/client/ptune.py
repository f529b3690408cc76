"""Trainable prompts held by the client: prompt tuning and deep prompt tuning.

* ``ptune``: ``pre_seq_len`` trainable embeddings are prepended to every input sequence.
* ``deep_ptune``: additionally, before each block ``i``, trainable vectors ``deep[i]`` are added to the hidden states
  of those ``pre_seq_len`` prefix positions (done by the servers, which return their gradients).

The prefix occupies positions ``0..pre_seq_len-1`` of the sequence; the model's outputs for it are dropped, so
callers see outputs for their own tokens only.
"""

from __future__ import annotations

import torch
from torch import nn

TUNING_MODES = (None, "ptune", "deep_ptune")


class PromptTuning(nn.Module):
    """The trainable prompts of one model (a submodule of the base model, so optimizers and state_dict see it)."""

    def __init__(self, *, mode: str, pre_seq_len: int, hidden_size: int, num_blocks: int, init_std: float):
        super().__init__()
        if mode not in ("ptune", "deep_ptune"):
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {mode!r}")
        if pre_seq_len <= 0:
            raise ValueError(f"tuning_mode={mode!r} needs pre_seq_len > 0, got {pre_seq_len}")
        self.mode, self.pre_seq_len, self.num_blocks = mode, pre_seq_len, num_blocks
        self.prompt_embeddings = nn.Parameter(torch.randn(pre_seq_len, hidden_size) * init_std)
        self.deep_prompts = None
        if mode == "deep_ptune":  # zeros: training starts from the plain prompt-tuned model
            self.deep_prompts = nn.Parameter(torch.zeros(num_blocks, 1, pre_seq_len, hidden_size))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, pre_seq_len={self.pre_seq_len}"

    def prefix(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The prompt embeddings for a batch: [batch, pre_seq_len, hidden]."""
        return self.prompt_embeddings.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def extend_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """An attention mask with the (always visible) prefix in front."""
        if mask is None:
            return None
        return torch.cat([mask.new_ones(mask.shape[0], self.pre_seq_len), mask], dim=1)

    def shift_positions(self, positions: torch.Tensor | None, *, with_prefix: bool) -> torch.Tensor | None:
        """Position ids moved past the prefix (and, for the step that carries it, the prefix's own in front)."""
        if positions is None:
            return None
        shifted = positions + self.pre_seq_len
        if not with_prefix:
            return shifted
        prefix = torch.arange(self.pre_seq_len, dtype=positions.dtype, device=positions.device)
        return torch.cat([prefix.expand(positions.shape[0], -1), shifted], dim=1)
