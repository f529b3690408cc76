"""Check a proof that a server lied by recomputing its answer with the model's own weights.

``LieProof.check_signed`` (no model needed) shows that the accused signed this answer to these inputs. This module
does the rest: it loads the proof's blocks from the checkpoint (only their tensors, in float32), runs the inputs
through them as a server does (an inference session's steps in order, rewinds included, so the attention cache
holds what the server computed with; a backward call through autograd), and compares the recomputed answer with the
signed one, per token, within the tolerance of the format the server certified against float32
(``corolla.algorithms.output_check``). Outside it, the lie is proven; within it, the proof is false.

The error of a token is measured against the largest of the two answers and the call's input for that token (the
hidden state, or the gradient of a backward call), because a client chooses the inputs: one that makes an answer
nearly vanish by cancellation would otherwise turn an honest server's rounding into a "lie". What this checker
cannot judge fairly it leaves unchecked (neither proven nor false): an answer sent through a lossy codec (the
client asked for it: the codec's own error would look like a lie), non-finite values (an fp16 server overflows on
inputs float32 holds), adapters it lacks, spans over its memory budget, inputs it cannot recompute.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from corolla.algorithms.output_check import tolerance
from corolla.log import get_logger
from corolla.models.span import SpanInputs, SpanModel, load_span
from corolla.protocol import input_checks
from corolla.protocol.lie_proofs import InvalidProof, LieProof

logger = get_logger(__name__)

MAX_CHECK_TOKENS = 8192  # rows x tokens a proof may ask to recompute
DEFAULT_MAX_SPAN_BYTES = 2 * 2**30  # float32 weights a check may load (a 70B-class block alone is ~3 GiB)


@dataclass(frozen=True)
class Verdict:
    """What checking one proof found."""

    proven: bool  # the signed answer is wrong: the accused lied
    reason: str  # why, in words (for logs)
    error: float | None = None  # per-token relative error of the signed answer against the recomputed one
    tolerance: float | None = None
    checked: bool = True  # False: this checker could not tell (e.g. an adapter it lacks); neither true nor false
    refuted: bool = False  # forged, or clearly right (within half the tolerance): its reporter made a false claim


class ProofChecker:
    """Recomputes the answers of proofs about one model from its checkpoint (keeping the last span it loaded)."""

    def __init__(
        self, checkpoint, *, dht_prefix: str, num_blocks: int, hf_config=None,
        max_span_bytes: int = DEFAULT_MAX_SPAN_BYTES,
    ):  # fmt: skip
        self.checkpoint, self.dht_prefix, self.num_blocks = checkpoint, dht_prefix, num_blocks
        self.hf_config, self.max_span_bytes = hf_config, max_span_bytes
        self._span: SpanModel | None = None
        self._lock = threading.Lock()  # one check at a time (they share the loaded span)

    def check(self, proof: LieProof) -> Verdict:
        """Whether ``proof`` proves its accused lied; a forged or malformed proof is refuted (and says why)."""
        try:
            proof.check_signed(dht_prefix=self.dht_prefix, num_blocks=self.num_blocks)
        except InvalidProof as e:
            return Verdict(False, f"forged or malformed: {e}", refuted=True)
        if proof.adapter is not None:
            return _unchecked(f"cannot recompute answers with LoRA adapter {proof.adapter!r} here")
        outputs = proof.parsed_outputs()
        if any(t.compression != runtime_pb2.CompressionType.NONE for t in outputs):
            return _unchecked("the answer was sent through a lossy codec (the client asked for it)")
        needed = self._span_bytes(proof.end_block - proof.start_block)
        if needed > self.max_span_bytes:
            return _unchecked(f"blocks {proof.start_block}:{proof.end_block} need ~{needed / 2**30:.1f} GiB here")
        with self._lock:
            try:
                span = self._load(proof.start_block, proof.end_block)
                with torch.inference_mode(proof.kind != "backward"):
                    recomputed, reference = self._recompute(span, proof)
                claimed = deserialize_torch_tensor(outputs[0])
            except Exception as e:  # whatever a hostile proof holds, it fails alone
                return _unchecked(f"its inputs cannot be recomputed here: {type(e).__name__}: {e}")
        if claimed.shape != recomputed.shape:
            return Verdict(True, f"the signed answer has shape {list(claimed.shape)}, not {list(recomputed.shape)}")
        if not (torch.isfinite(claimed).all() and torch.isfinite(recomputed).all()):
            return _unchecked("non-finite values (an overflow in the server's dtype is not a lie)")
        certificate = proof.certificate
        blocks = proof.end_block - proof.start_block
        tol = tolerance([(certificate.dtype, certificate.quant), ("float32", "none")], blocks)
        error = _relative_error(claimed, recomputed, reference)
        if error > tol:
            return Verdict(True, f"the signed answer is off by {error:.2e} (tolerance {tol:.1e})", error, tol)
        return Verdict(
            False, f"the signed answer is right (off by {error:.2e}, tolerance {tol:.1e})", error, tol,
            refuted=error <= tol / 2,
        )  # fmt: skip

    def release(self) -> None:
        """Free the span kept from the last check."""
        with self._lock:
            self._span = None

    def _span_bytes(self, blocks: int) -> int:
        """About how many bytes ``blocks`` blocks take in float32 (attention, a gated MLP per expert)."""
        config = self.hf_config or self._config()
        hidden = config.hidden_size
        mlp = 3 * hidden * (getattr(config, "intermediate_size", None) or 4 * hidden)
        experts = getattr(config, "num_local_experts", None) or 1
        return 4 * blocks * (4 * hidden * hidden + experts * mlp)

    def _config(self):
        from transformers import AutoConfig

        self.hf_config = AutoConfig.from_pretrained(self.checkpoint.folder)
        return self.hf_config

    def _load(self, start: int, end: int) -> SpanModel:
        if self._span is None or (self._span.start, self._span.end) != (start, end):
            self._span = None  # free the previous span first
            logger.info("Loading blocks %d:%d of %s to check a proof", start, end, self.checkpoint.name)
            self._span = load_span(self.checkpoint, start, end, config=self.hf_config, dtype=torch.float32)
        return self._span

    def _recompute(self, span: SpanModel, proof: LieProof) -> tuple[torch.Tensor, torch.Tensor]:
        """(the recomputed answer's first tensor, the input its error is measured against)."""
        blocks = proof.end_block - proof.start_block
        steps = [_decoded(step) for step in proof.steps]
        if sum(t[0].shape[0] * t[0].shape[1] for t in steps if t and t[0].ndim == 3) > MAX_CHECK_TOKENS:
            raise InvalidProof(f"the proof asks to recompute over {MAX_CHECK_TOKENS} tokens")
        if proof.kind == "step":
            return self._replay(span, proof, steps, blocks)
        (step,), (tensors,) = proof.steps, steps
        backward = proof.kind == "backward"
        inputs, prompts, grad = _span_inputs(span, step.flags, tensors, past=0, blocks=blocks, backward=backward)
        if not backward:
            return span(inputs, start=proof.start_block, end=proof.end_block, prompts=prompts), inputs.hidden_states
        with torch.enable_grad():  # the gradient of the inputs (a lie only in deep-prompt gradients is not judged)
            hidden = inputs.hidden_states.requires_grad_()
            output = span(inputs, start=proof.start_block, end=proof.end_block, prompts=prompts)
            return torch.autograd.grad(output, [hidden], grad)[0], grad

    @staticmethod
    def _replay(span: SpanModel, proof: LieProof, steps: list[list[torch.Tensor]], blocks: int):
        """An inference session's steps, as the server ran them: a rewind crops the cache, a step with a mask,
        position ids or deep prompts runs alone; plain steps that continue the cache run together as one prefill
        (the same attention, rounded differently by far less than any tolerance), so a long session checks in
        one computation rather than one per token."""
        start, end = proof.start_block, proof.end_block
        cache, length, batch, output, run = span.new_cache(start, end), 0, None, None, []

        def flush():
            nonlocal output
            if run:
                output = span(SpanInputs(hidden_states=torch.cat(run, dim=1)), cache, start=start, end=end)
                run.clear()

        for step, tensors in zip(proof.steps, steps):
            if step.position > length:
                raise InvalidProof(f"a step at position {step.position} skips positions (cache: {length} tokens)")
            inputs, prompts, _ = _span_inputs(span, step.flags, tensors, past=step.position, blocks=blocks)
            batch = batch or inputs.hidden_states.shape[0]
            if inputs.hidden_states.shape[0] != batch:
                raise InvalidProof("the steps of one session have different batch sizes")
            if step.position < length or any(step.flags):
                flush()
                excess = cache.get_seq_length() - step.position
                if excess > 0:  # a rewind: drop the later tokens, as the server does
                    cache.crop(-excess)
            if any(step.flags):
                output = span(inputs, cache, start=start, end=end, prompts=prompts)
            else:
                run.append(inputs.hidden_states)
            length = step.position + inputs.hidden_states.shape[1]
        flush()
        return output[:, -inputs.hidden_states.shape[1] :], inputs.hidden_states


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


def _unchecked(reason: str) -> Verdict:
    return Verdict(False, reason, checked=False)


def _relative_error(claimed: torch.Tensor, recomputed: torch.Tensor, reference: torch.Tensor) -> float:
    """max over tokens of ‖claimed − recomputed‖ / max(‖claimed‖, ‖recomputed‖, ‖reference‖) (float64)."""
    a, b, x = (t.detach().double().reshape(-1, t.shape[-1]) for t in (claimed, recomputed, reference))
    scale = torch.maximum(torch.maximum(a.norm(dim=-1), b.norm(dim=-1)), x.norm(dim=-1)).clamp_min(1e-12)
    return float(((a - b).norm(dim=-1) / scale).max()) if a.numel() else 0.0
