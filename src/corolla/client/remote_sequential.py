"""``RemoteSequential``: the model's blocks as one ``nn.Module`` whose computation happens on the swarm."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from corolla.client.inference_session import InferenceSession
from corolla.client.span_calls import SpanCallInputs, call_backward, call_forward
from corolla.client.swarm import SwarmView
from corolla.log import get_logger
from corolla.net.loop import run_sync

logger = get_logger(__name__)


class RemoteSequential(nn.Module):
    """Blocks ``start..end-1`` of a model served by the swarm. Sliceable; ``forward`` maps hidden states."""

    def __init__(self, swarm: SwarmView, start: int = 0, end: int | None = None, *, seed: int | None = None, rng=None):
        """``seed`` (or a numpy ``rng``, shared by slices) draws the training routes."""
        super().__init__()
        self.swarm = swarm
        self.start, self.end = start, swarm.num_blocks if end is None else end
        self._rng = rng if rng is not None else np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index) -> RemoteSequential:
        if isinstance(index, int):
            index = range(len(self))[index]
            return RemoteSequential(self.swarm, self.start + index, self.start + index + 1, rng=self._rng)
        if isinstance(index, slice):
            blocks = range(self.start, self.end)[index]
            if blocks.step != 1 or len(blocks) == 0:
                raise IndexError("RemoteSequential supports only non-empty contiguous slices")
            return RemoteSequential(self.swarm, blocks.start, blocks.stop, rng=self._rng)
        raise TypeError(f"RemoteSequential indices must be int or slice, not {type(index).__name__}")

    def extra_repr(self) -> str:
        return f"blocks={self.start}:{self.end}, model={self.swarm.model_name!r}"

    def inference_session(self, *, max_length: int) -> InferenceSession:
        """Open a session that keeps attention caches on the servers (use in a ``with`` block)."""
        return InferenceSession(self.swarm, start=self.start, end=self.end, max_length=max_length)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [batch, tokens, hidden] through all blocks (no cache), retrying failed servers.

        Differentiable: gradients flow back to ``hidden_states`` and to the deep ``prompts`` [blocks, batch or 1,
        prefix, hidden] (added to the first ``prefix`` hidden states before each block) through the servers'
        backward passes. The batch is split into sub-batches that run concurrently on servers drawn in proportion
        to their throughput.
        """
        if prompts is not None and prompts.shape[0] != len(self):
            raise ValueError(f"prompts are for {prompts.shape[0]} blocks, this RemoteSequential has {len(self)}")
        needs_grad = any(t is not None and t.requires_grad for t in (hidden_states, prompts))
        if torch.is_grad_enabled() and needs_grad:
            return _RemoteBlocks.apply(hidden_states, prompts, attention_mask, position_ids, self)
        outputs, _ = run_sync(self._forward_all(hidden_states, attention_mask, position_ids, prompts))
        return outputs

    # ---- the batch, split into sub-batches --------------------------------------------------------------------
    def _sub_batches(self, hidden: torch.Tensor) -> list[slice]:
        batch, tokens = hidden.shape[:2]
        rows = max(1, self.swarm.config.sub_batch_tokens // tokens)
        return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]

    async def _forward_all(self, hidden, mask, positions, prompts, *, keep: bool = False) -> tuple[torch.Tensor, list]:
        """Outputs, and per sub-batch the (hop, ``SentForward``) records that backward needs. ``keep``: a backward
        follows, so servers are asked to keep each call's activations for it."""
        parts = self._sub_batches(hidden)
        results = await asyncio.gather(
            *(
                self._forward_range(
                    self.start, self.end, hidden[rows], _extra(mask, positions, prompts, rows), keep=keep
                )
                for rows in parts
            )
        )
        outputs = torch.cat([output for output, _ in results])
        return outputs, [(rows, records) for rows, (_, records) in zip(parts, results)]

    async def _backward_all(self, records, grad_outputs, mask, positions, prompts):
        grads = await asyncio.gather(
            *(
                self._backward_records(hops, grad_outputs[rows], _extra(mask, positions, prompts, rows))
                for rows, hops in records
            )
        )
        grad_hidden = torch.cat([g for g, _ in grads])
        if prompts is None:
            return grad_hidden, None
        grad_prompts = torch.zeros_like(prompts)
        for (rows, _), (_, grad) in zip(records, grads):
            if prompts.shape[1] == 1:
                grad_prompts += grad
            else:
                grad_prompts[:, rows] = grad
        return grad_hidden, grad_prompts

    # ---- one sub-batch ----------------------------------------------------------------------------------------
    async def _forward_range(self, start: int, end: int, hidden, extra: SpanCallInputs, *, keep: bool = False):
        """Through blocks start..end-1 hop by hop, re-routing around failed servers; (output, [(hop,
        SentForward)])."""
        block, records, route, failover = start, [], None, self.swarm.failover(start, end)
        while block < end:
            if not route:
                route = await asyncio.to_thread(self.swarm.forward_route, block, end, self._rng)
            hop = route.pop(0)
            activation_id = self._activation_id() if keep else None
            try:
                call_inputs = self._slice(extra, hop)
                signed = []  # the answer's signed evidence (verification on), should it prove a lie
                output = await call_forward(
                    self.swarm, hop, hidden, call_inputs, activation_id=activation_id, evidence=signed
                )
                output = await self.swarm.verifier.forward(hop, hidden, call_inputs, output, signed)
            except Exception as e:
                # raises for a client bug, or when the budget is spent
                await failover.failed(hop.peer_id, e, blocks=(hop.start, hop.end))
                route = None
                continue
            self.swarm.forgive(hop.peer_id)
            records.append((hop, SentForward(hidden=hidden, activation_id=activation_id)))
            hidden, block = output, hop.end
        return hidden, records

    async def _backward_records(self, records, grad, extra: SpanCallInputs):
        """Backward through the hops of a forward pass, last first; a failed hop is redone elsewhere."""
        prompt_grads = []
        for hop, sent in reversed(records):
            grad, prompt_grad = await self._backward_range(hop, sent.hidden, grad, extra, sent.activation_id)
            prompt_grads.insert(0, prompt_grad)
        return grad, None if extra.prompts is None else torch.cat(prompt_grads)

    async def _backward_range(self, hop, hidden, grad, extra: SpanCallInputs, activation_id: str | None):
        """Backward over ``hop``'s blocks: on its server (which may still hold the forward's activations under
        ``activation_id``), or after a failure on a new chain for the same blocks (recomputing the chain's
        intermediate inputs with forward calls first, whose servers keep their activations for the backward)."""
        route, ids, failover = [hop], [activation_id], self.swarm.failover(hop.start, hop.end)
        while True:
            current = route[0]
            try:
                inputs = [hidden]
                for current, kept_id in zip(route[:-1], ids):
                    call_inputs = self._slice(extra, current)
                    signed = []
                    output = await call_forward(
                        self.swarm, current, inputs[-1], call_inputs, activation_id=kept_id, evidence=signed
                    )
                    inputs.append(await self.swarm.verifier.forward(current, inputs[-1], call_inputs, output, signed))
                result, prompt_grads = grad, []
                for current, x, kept_id in reversed(list(zip(route, inputs, ids))):
                    call_inputs = self._slice(extra, current)
                    signed = []
                    answer = await call_backward(
                        self.swarm, current, x, result, call_inputs, activation_id=kept_id, evidence=signed
                    )
                    answer = await self.swarm.verifier.backward(current, x, result, call_inputs, answer, signed)
                    result, prompt_grad = answer
                    prompt_grads.insert(0, prompt_grad)
                for used in route:
                    self.swarm.forgive(used.peer_id)
                return result, None if extra.prompts is None else torch.cat(prompt_grads)
            except Exception as e:
                await failover.failed(current.peer_id, e, blocks=(current.start, current.end))
                route = await asyncio.to_thread(self.swarm.forward_route, hop.start, hop.end, self._rng)
                ids = [self._activation_id() for _ in route[:-1]] + [None]  # the last hop runs no forward call

    def _activation_id(self) -> str | None:
        """A fresh id under which a server keeps a forward call's activations for its backward (None: the client
        does not ask for it). Drawn from the OS, not the seeded ``rng``: clients with the same seed must differ."""
        return secrets.token_urlsafe(12) if self.swarm.config.keep_activations else None

    def _slice(self, extra: SpanCallInputs, hop) -> SpanCallInputs:
        """The call inputs of one hop: deep prompts only for its blocks."""
        if extra.prompts is None:
            return extra
        prompts = extra.prompts[hop.start - self.start : hop.end - self.start]
        return SpanCallInputs(attention_mask=extra.attention_mask, position_ids=extra.position_ids, prompts=prompts)


@dataclass(frozen=True)
class SentForward:
    """What the backward of one hop needs from its forward call: the hidden states sent, and the id under which the
    server may have kept the call's activations (None: not asked to)."""

    hidden: torch.Tensor
    activation_id: str | None


def _extra(mask, positions, prompts, rows: slice) -> SpanCallInputs:
    """Call inputs for some rows of the batch (deep prompts shared by all rows are passed whole)."""
    if prompts is not None and prompts.shape[1] != 1:
        prompts = prompts[:, rows]
    return SpanCallInputs(
        attention_mask=None if mask is None else mask[rows],
        position_ids=None if positions is None else positions[rows],
        prompts=None if prompts is None else prompts.detach(),
    )


class _RemoteBlocks(torch.autograd.Function):
    """Autograd through a RemoteSequential: forward calls now; backward calls when gradients are needed."""

    @staticmethod
    def forward(ctx, hidden, prompts, mask, positions, blocks: RemoteSequential):
        hidden = hidden.detach()
        outputs, records = run_sync(blocks._forward_all(hidden, mask, positions, prompts, keep=True))
        ctx.blocks, ctx.records, ctx.mask, ctx.positions = blocks, records, mask, positions
        ctx.prompts = None if prompts is None else prompts.detach()
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        blocks: RemoteSequential = ctx.blocks
        grad_hidden, grad_prompts = run_sync(
            blocks._backward_all(ctx.records, grad_outputs.contiguous(), ctx.mask, ctx.positions, ctx.prompts)
        )
        return grad_hidden, grad_prompts, None, None, None
