"""Check a proof that a server lied by recomputing its answer with the model's own weights.

``LieProof.check_signed`` (no model needed) shows that the accused signed this answer to these inputs. This module
does the rest: it loads the proof's blocks from the checkpoint (only their tensors, in float32), runs the inputs
through them as a server does (an inference session's steps one by one, rewinds included, so the attention cache
is the one the server computed with; a backward call through autograd), and compares the recomputed answer with the
signed one, per token, within the tolerance of the format the server certified against float32
(``corolla.algorithms.output_check``). Outside it, the lie is proven; within it, the proof is false.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from hivemind.compression import deserialize_torch_tensor

from corolla.algorithms.output_check import token_error, tolerance
from corolla.errors import InvalidRequestError
from corolla.log import get_logger
from corolla.models.span import SpanInputs, SpanModel, load_span
from corolla.protocol import input_checks
from corolla.protocol.lie_proofs import InvalidProof, LieProof

logger = get_logger(__name__)

MAX_CHECK_TOKENS = 8192  # rows x tokens a proof may ask to recompute


@dataclass(frozen=True)
class Verdict:
    """What checking one proof found."""

    proven: bool  # the signed answer is wrong: the accused lied
    reason: str  # why, in words (for logs)
    error: float | None = None  # per-token relative error of the signed answer against the recomputed one
    tolerance: float | None = None
    checked: bool = True  # False: this checker could not tell (e.g. an adapter it lacks); neither true nor false


class ProofChecker:
    """Recomputes the answers of proofs about one model from its checkpoint (keeping the last span it loaded)."""

    def __init__(self, checkpoint, *, dht_prefix: str, num_blocks: int, hf_config=None):
        self.checkpoint, self.dht_prefix, self.num_blocks = checkpoint, dht_prefix, num_blocks
        self.hf_config = hf_config
        self._span: SpanModel | None = None
        self._lock = threading.Lock()  # one check at a time (they share the loaded span)

    def check(self, proof: LieProof) -> Verdict:
        """Whether ``proof`` proves its accused lied; a forged or malformed proof is not proven (and says why)."""
        try:
            proof.check_signed(dht_prefix=self.dht_prefix, num_blocks=self.num_blocks)
        except InvalidProof as e:
            return Verdict(False, f"forged or malformed: {e}")
        if proof.adapter is not None:
            return Verdict(False, f"cannot recompute answers with LoRA adapter {proof.adapter!r} here", checked=False)
        with self._lock:
            try:
                span = self._load(proof.start_block, proof.end_block)
                with torch.inference_mode(proof.kind != "backward"):
                    recomputed = self._recompute(span, proof)
                claimed = [deserialize_torch_tensor(t) for t in proof.parsed_outputs()]
            except (InvalidRequestError, InvalidProof, ValueError, RuntimeError) as e:
                return Verdict(False, f"its inputs cannot be recomputed here: {e}", checked=False)
        if len(claimed) != len(recomputed) or any(a.shape != b.shape for a, b in zip(claimed, recomputed)):
            return Verdict(True, "the signed answer has the wrong number or shape of tensors", float("inf"))
        certificate = proof.certificate
        blocks = proof.end_block - proof.start_block
        tol = tolerance([(certificate.dtype, certificate.quant), ("float32", "none")], blocks)
        error = max(token_error(_rows(a), _rows(b)) for a, b in zip(claimed, recomputed))
        if error > tol:
            return Verdict(True, f"the signed answer is off by {error:.2e} (tolerance {tol:.1e})", error, tol)
        return Verdict(False, f"the signed answer is right (off by {error:.2e}, tolerance {tol:.1e})", error, tol)

    def _load(self, start: int, end: int) -> SpanModel:
        if self._span is None or (self._span.start, self._span.end) != (start, end):
            self._span = None  # free the previous span first
            logger.info("Loading blocks %d:%d of %s to check a proof", start, end, self.checkpoint.name)
            self._span = load_span(self.checkpoint, start, end, config=self.hf_config, dtype=torch.float32)
        return self._span

    def _recompute(self, span: SpanModel, proof: LieProof) -> list[torch.Tensor]:
        blocks = proof.end_block - proof.start_block
        steps = [_decoded(step) for step in proof.steps]
        if sum(t[0].shape[0] * t[0].shape[1] for t in steps if t and t[0].ndim == 3) > MAX_CHECK_TOKENS:
            raise InvalidProof(f"the proof asks to recompute over {MAX_CHECK_TOKENS} tokens")
        if proof.kind == "step":
            cache, length, output = span.new_cache(proof.start_block, proof.end_block), 0, None
            batch = None
            for step, tensors in zip(proof.steps, steps):
                if step.position > length:
                    raise InvalidProof(f"a step at position {step.position} skips positions (cache: {length} tokens)")
                inputs, prompts, _ = _span_inputs(span, step.flags, tensors, past=step.position, blocks=blocks)
                batch = batch or inputs.hidden_states.shape[0]
                if inputs.hidden_states.shape[0] != batch:
                    raise InvalidProof("the steps of one session have different batch sizes")
                excess = cache.get_seq_length() - step.position
                if excess > 0:  # a rewind: drop the later tokens, as the server does
                    cache.crop(-excess)
                output = span(inputs, cache, start=proof.start_block, end=proof.end_block, prompts=prompts)
                length = step.position + inputs.hidden_states.shape[1]
            return [output]
        (step,), (tensors,) = proof.steps, steps
        backward = proof.kind == "backward"
        inputs, prompts, grad = _span_inputs(span, step.flags, tensors, past=0, blocks=blocks, backward=backward)
        if not backward:
            return [span(inputs, start=proof.start_block, end=proof.end_block, prompts=prompts)]
        leaves = [inputs.hidden_states.requires_grad_()] + ([] if prompts is None else [prompts.requires_grad_()])
        with torch.enable_grad():
            output = span(inputs, start=proof.start_block, end=proof.end_block, prompts=prompts)
            return list(torch.autograd.grad(output, leaves, grad))


def _decoded(step) -> list[torch.Tensor]:
    try:
        return [deserialize_torch_tensor(t) for t in step.parsed()]
    except InvalidProof:
        raise
    except Exception as e:
        raise InvalidProof(f"a tensor of the proof cannot be decoded: {e}") from None


def _span_inputs(span: SpanModel, flags, tensors: list[torch.Tensor], *, past: int, blocks: int, backward=False):
    """(inputs, prompts, grad_outputs) of one call, checked like a server checks a request."""
    has_mask, has_positions, has_prompts = flags
    expected = 1 + int(backward) + int(has_mask) + int(has_positions) + int(has_prompts)
    if len(tensors) != expected:
        raise InvalidProof(f"a call of the proof has {len(tensors)} tensors, its flags say {expected}")
    rest = iter(tensors)
    hidden = next(rest)
    input_checks.check_hidden_states(hidden, hidden_size=span.config.hidden_size, max_tokens=MAX_CHECK_TOKENS)
    batch, tokens, _ = hidden.shape
    grad = next(rest) if backward else None
    if grad is not None:
        input_checks.check_grad_outputs(grad, like=hidden)
    mask = positions = prompts = None
    if has_mask:
        mask = input_checks.check_attention_mask(next(rest), batch=batch, length=past + tokens)
    if has_positions:
        limit = max(MAX_CHECK_TOKENS, past + tokens)
        positions = input_checks.check_position_ids(next(rest), batch=batch, tokens=tokens, limit=limit)
    if has_prompts:
        prompts = next(rest)
        input_checks.check_prompts(prompts, blocks=blocks, batch=batch, tokens=tokens, hidden_size=hidden.shape[-1])
        prompts = prompts.float()
    inputs = SpanInputs(hidden_states=hidden.float(), attention_mask=mask, position_ids=positions)
    return inputs, prompts, None if grad is None else grad.float()


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """Any answer tensor as rows of its last dimension (hidden states, gradients, deep-prompt gradients)."""
    return tensor.reshape(-1, tensor.shape[-1]).float()
