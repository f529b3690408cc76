"""The compute backend of a block server: validated forward, backward and inference-step work over its span.

No transport here: a request arrives as parsed metadata plus tensors and leaves as tensors, so the backend runs
(and is tested) in-process. Every input is checked before it touches the model; a bad one raises
``InvalidRequestError`` saying what was wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from corolla.errors import InvalidRequestError
from corolla.log import get_logger
from corolla.models.batched_step import SessionStep, run_merged
from corolla.models.lora import use_adapter
from corolla.models.span import SpanInputs, SpanModel
from corolla.protocol import input_checks as validation
from corolla.protocol.messages import BackwardRequest, InferenceOpen, InferenceStep, SpanRequest
from corolla.server.activation_cache import ActivationCache, GraphChunk, KeptForward, SavedBytes
from corolla.server.compute import PRIORITY_FORWARD, PRIORITY_INFERENCE, ComputeQueue
from corolla.server.config import ServerConfig
from corolla.server.sessions import Session
from corolla.server.step_batcher import StepBatcher

logger = get_logger(__name__)

ACTIVE_WINDOW_S = 1.0  # a session idle for longer is not waited for, whatever its usual gap between steps


class SpanBackend:
    """Runs requests on the hosted span through one ``ComputeQueue`` (inference steps first)."""

    def __init__(
        self, *, span: SpanModel, config: ServerConfig, compute: ComputeQueue, sessions: Iterable[Session] = (),
        clock: Callable[[], float] = time.monotonic,
    ):  # fmt: skip
        """``clock`` (seconds) times kept forwards out (``config.activations``)."""
        self.span, self.config, self.compute = span, config, compute
        self.activations = ActivationCache(
            budget_bytes=config.activations.budget_bytes, ttl_s=config.activations.activation_ttl_s, clock=clock
        )
        self.sessions = sessions  # the open sessions (steps may wait for the active ones to batch with them)
        self.adapters: tuple[str, ...] = config.span.adapter_names()  # loaded into every span this server serves
        batching = config.batching
        self.batcher: StepBatcher | None = None  # None: every inference step runs alone
        if batching.max_batch_sessions > 1:
            self.batcher = StepBatcher(
                compute,
                _run_steps,
                max_sessions=batching.max_batch_sessions,
                max_tokens=config.limits.max_batch_tokens,
                wait_s=batching.batch_wait_ms / 1000,
            )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.span.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.span.parameters()).device

    def swap_span(self, span: SpanModel) -> None:
        """Serve other blocks from now on; sessions opened before keep running on the span they started with. Kept
        forwards are dropped (their backward recomputes, if the new span still holds their blocks)."""
        self.span = span
        self.activations.clear()

    # ---- forward and backward ---------------------------------------------------------------------------------
    async def forward(self, meta: SpanRequest, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states through blocks ``meta.start_block..meta.end_block-1`` (no cache). With an
        ``activation_id`` (and room for activations) the autograd graph is kept for the matching backward."""
        span = self.span
        validation.check_span(meta.start_block, meta.end_block, served=(span.start, span.end))
        self.check_adapter(meta)
        inputs, prompts = self._span_inputs(span, meta, tensors, past_length=0, batch_size=None, blocks=_blocks(meta))
        if meta.activation_id is not None and self.activations.enabled:
            return await self._forward_kept(span, meta, inputs, prompts)

        def task() -> torch.Tensor:
            outputs = []
            for rows in self._row_chunks(inputs.hidden_states):
                chunk_prompts = None if prompts is None else _prompt_rows(prompts, rows)
                with use_adapter(meta.active_adapter):
                    outputs.append(
                        span(_rows(inputs, rows), start=meta.start_block, end=meta.end_block, prompts=chunk_prompts)
                    )
            return torch.cat(outputs)

        return (await self._compute(PRIORITY_FORWARD, task)).cpu()

    async def _forward_kept(self, span: SpanModel, meta: SpanRequest, inputs: SpanInputs, prompts) -> torch.Tensor:
        """A forward with autograd on whose graph is kept under ``meta.activation_id`` (within the budget). The
        graph's leaves are copies of the request's tensors, so that it holds nothing of the request."""
        inputs = SpanInputs(
            hidden_states=inputs.hidden_states.detach().clone(),
            attention_mask=None if inputs.attention_mask is None else inputs.attention_mask.clone(),
            position_ids=None if inputs.position_ids is None else inputs.position_ids.clone(),
        )
        prompts = None if prompts is None else prompts.detach().clone()

        budget_bytes = self.activations.budget_bytes

        def task() -> tuple[KeptForward | None, torch.Tensor]:
            counter = SavedBytes(exclude=[*span.parameters(), *span.buffers()])
            chunks: list[GraphChunk] | None = []
            outputs = []
            with counter.hooks():
                for chunk in self._graph_chunks(span, meta, inputs, prompts):
                    counter.count(chunk.output)
                    outputs.append(chunk.output.detach())
                    if chunks is not None and counter.size_bytes <= budget_bytes:
                        chunks.append(chunk)
                    else:  # more than the whole budget: keep nothing, and hold one chunk's graph at a time
                        chunks = None
            output = torch.cat(outputs).cpu()
            if chunks is None:
                return None, output
            kept = KeptForward(
                span=span, start_block=meta.start_block, end_block=meta.end_block, active_adapter=meta.active_adapter,
                inputs=inputs, prompts=prompts, chunks=chunks, size_bytes=counter.size_bytes,
            )  # fmt: skip
            return kept, output

        kept, output = await self._compute(PRIORITY_FORWARD, task, grad=True)
        if kept is None:
            logger.debug("Not keeping forward %s: its activations exceed the whole budget", meta.activation_id)
        elif self.activations.put(meta.activation_id, kept):
            asyncio.get_running_loop().call_later(self.activations.ttl_s, self.activations.expire)
            logger.debug("Keeping forward %s: %d bytes of activations", meta.activation_id, kept.size_bytes)
        return output

    async def backward(self, meta: BackwardRequest, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """grad_inputs (then grad_prompts with deep prompts) given grad_outputs; the forward pass is recomputed
        unless this server kept it (same ``activation_id``, span, blocks, adapter and identical inputs)."""
        span = self.span
        validation.check_span(meta.start_block, meta.end_block, served=(span.start, span.end))
        self.check_adapter(meta)
        if len(tensors) < 2:
            raise InvalidRequestError(f"backward needs hidden states and grad_outputs, got {len(tensors)} tensors")
        grad_outputs = tensors[1]
        inputs, prompts = self._span_inputs(
            span, meta, tensors[:1] + tensors[2:], past_length=0, batch_size=None, blocks=_blocks(meta)
        )
        validation.check_grad_outputs(grad_outputs, like=inputs.hidden_states)
        grad_outputs = grad_outputs.to(self.device, self.dtype)
        kept = None if meta.activation_id is None else self.activations.take(meta.activation_id)

        def task() -> tuple[list[torch.Tensor], bool]:
            if kept is not None and kept.matches(span=span, meta=meta, inputs=inputs, prompts=prompts):
                return _backward_chunks(kept.chunks, grad_outputs, prompts), True
            # chunk by chunk: each chunk's graph is freed before the next one is built
            return _backward_chunks(self._graph_chunks(span, meta, inputs, prompts), grad_outputs, prompts), False

        grads, hit = await self._compute(PRIORITY_FORWARD, task, grad=True)
        if meta.activation_id is not None:
            self._count_activation_use(meta.activation_id, kept=kept is not None, hit=hit)
        return [g.detach().cpu() for g in grads]

    def _graph_chunks(
        self, span: SpanModel, meta: SpanRequest, inputs: SpanInputs, prompts: torch.Tensor | None
    ) -> Iterator[GraphChunk]:
        """On the compute thread, with autograd on: the forward pass chunk by chunk of rows, each chunk's output
        attached to a graph whose leaves are its hidden states (and deep prompts)."""
        for rows in self._row_chunks(inputs.hidden_states):
            chunk = _rows(inputs, rows)
            hidden = chunk.hidden_states.detach().requires_grad_(True)
            chunk_prompts = None if prompts is None else _prompt_rows(prompts, rows).detach().requires_grad_(True)
            chunk = SpanInputs(
                hidden_states=hidden, attention_mask=chunk.attention_mask, position_ids=chunk.position_ids
            )
            with use_adapter(meta.active_adapter):
                output = span(chunk, start=meta.start_block, end=meta.end_block, prompts=chunk_prompts)
            leaves = (hidden,) if chunk_prompts is None else (hidden, chunk_prompts)
            yield GraphChunk(rows=rows, output=output, leaves=leaves)

    def _count_activation_use(self, activation_id: str, *, kept: bool, hit: bool) -> None:
        stats = self.activations.stats
        if hit:
            stats.hits += 1
            logger.debug("Backward %s reused its kept forward", activation_id)
            return
        stats.misses += 1
        reason = "its inputs differ from the kept forward's" if kept else "no kept forward (gone or never kept)"
        logger.debug("Backward %s recomputes the forward pass: %s", activation_id, reason)

    def _row_chunks(self, hidden: torch.Tensor) -> list[slice]:
        """Rows of a batch in chunks of at most ``compute_chunk_tokens`` tokens (at least one row each)."""
        batch, tokens = hidden.shape[:2]
        rows = max(1, self.config.limits.compute_chunk_tokens // tokens)
        return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]

    # ---- inference --------------------------------------------------------------------------------------------
    def check_open(self, opened: InferenceOpen) -> None:
        """Refuse a session this server cannot hold (blocks, adapter, length, batch) before reserving anything."""
        validation.check_span(opened.start_block, opened.end_block, served=(self.span.start, self.span.end))
        self.check_adapter(opened)
        if opened.max_length > self.config.limits.max_session_length:
            raise InvalidRequestError(
                f"max_length={opened.max_length} exceeds this server's --max-session-length "
                f"{self.config.limits.max_session_length}"
            )
        if opened.batch_size > self.config.limits.max_batch_tokens:
            raise InvalidRequestError(f"batch_size={opened.batch_size} exceeds {self.config.limits.max_batch_tokens}")

    def new_cache(self, opened: InferenceOpen):
        """An empty attention cache of the current span for the session's blocks (with the span it belongs to)."""
        span = self.span
        return span, span.new_cache(opened.start_block, opened.end_block)

    async def step(self, session: Session, step: InferenceStep, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Run a step's new tokens through the session's blocks at ``step.position``, updating its cache.

        A position before the cache's end rewinds the session (the client replays a step); one after it is refused.
        """
        if step.position > session.length:
            raise InvalidRequestError(
                f"step at position {step.position} would skip positions: the session holds {session.length} tokens"
            )
        opened = session.opened
        if step.has_prompts and step.push_chain:
            raise InvalidRequestError("a step with deep prompts cannot be pushed: send it to every server directly")
        inputs, prompts = self._span_inputs(
            session.span, step, tensors, past_length=step.position, batch_size=opened.batch_size,
            blocks=_blocks(opened),
        )  # fmt: skip
        new_tokens = inputs.hidden_states.shape[1]
        if step.position + new_tokens > opened.max_length:
            raise InvalidRequestError(
                f"step would reach {step.position + new_tokens} tokens, over the session's max_length "
                f"{opened.max_length}"
            )

        if session.last_step_at is not None:  # how long the client took to send this step after the last answer
            gap = time.monotonic() - session.last_step_at
            session.step_gap_s = gap if session.step_gap_s is None else 0.7 * session.step_gap_s + 0.3 * gap
        pending = _PendingStep(session=session, position=step.position, inputs=inputs, prompts=prompts)
        if self.batcher is None or prompts is not None:
            output = await self._compute(PRIORITY_INFERENCE, lambda: _run_steps([pending])[0])
        else:  # steps of other sessions waiting meanwhile may share its forward
            key = (_batch_group(session), new_tokens)
            tokens = inputs.hidden_states.shape[0] * new_tokens
            output = await self._timed(self.batcher.run(key, pending, tokens=tokens, expected=self._active(session)))
        session.length = step.position + new_tokens
        session.last_step_at = time.monotonic()
        return output.cpu()

    def _active(self, session: Session) -> int:
        """How many sessions (this one included) a forward of this session's step should wait for: those on the
        same blocks whose next step is due within the batcher's wait, judged by the gap each one leaves between a
        step's answer and its next step. A session that sits idle (or is away at other servers of a pipeline for
        longer than the wait) is not waited for."""
        group, now = _batch_group(session), time.monotonic()
        horizon = self.batcher.wait_limit_s() if self.batcher is not None else 0.0
        return 1 + sum(
            1
            for other in self.sessions
            if other is not session
            and other.last_step_at is not None
            and other.step_gap_s is not None
            and other.last_step_at + other.step_gap_s <= now + horizon
            and now - other.last_step_at < ACTIVE_WINDOW_S
            and _batch_group(other) == group
        )

    # ---- shared -----------------------------------------------------------------------------------------------
    def check_adapter(self, meta: SpanRequest) -> None:
        if meta.active_adapter is not None and meta.active_adapter not in self.adapters:
            held = ", ".join(repr(name) for name in self.adapters) or "none"
            raise InvalidRequestError(
                f"this server does not hold adapter {meta.active_adapter!r} (it holds: {held}); route to a server "
                f"that announces it"
            )

    def _span_inputs(
        self, span: SpanModel, meta, tensors: list[torch.Tensor], *, past_length: int, batch_size: int | None,
        blocks: int,
    ) -> tuple[SpanInputs, torch.Tensor | None]:  # fmt: skip
        """Validated inputs of a span call, plus its deep prompts (None without them)."""
        has_prompts = getattr(meta, "has_prompts", False)
        expected = 1 + int(meta.has_attention_mask) + int(meta.has_position_ids) + int(has_prompts)
        if len(tensors) != expected:
            raise InvalidRequestError(
                f"expected {expected} tensors (hidden states, mask, positions, prompts), got {len(tensors)}"
            )
        hidden = tensors[0]
        hidden_size = span.config.hidden_size
        validation.check_hidden_states(
            hidden, hidden_size=hidden_size, max_tokens=self.config.limits.max_batch_tokens, batch_size=batch_size
        )
        batch, new_tokens, _ = hidden.shape
        rest = iter(tensors[1:])
        mask = positions = prompts = None
        if meta.has_attention_mask:
            mask = validation.check_attention_mask(next(rest), batch=batch, length=past_length + new_tokens)
        if meta.has_position_ids:
            limit = max(self.config.limits.max_session_length, past_length + new_tokens)
            positions = validation.check_position_ids(next(rest), batch=batch, tokens=new_tokens, limit=limit)
        parameter = next(span.parameters())
        if has_prompts:
            prompts = next(rest)
            validation.check_prompts(prompts, blocks=blocks, batch=batch, tokens=new_tokens, hidden_size=hidden_size)
            prompts = prompts.to(parameter.device, parameter.dtype)
        inputs = SpanInputs(
            hidden_states=hidden.to(parameter.device, parameter.dtype),
            attention_mask=None if mask is None else mask.to(parameter.device),
            position_ids=None if positions is None else positions.to(parameter.device),
        )
        return inputs, prompts

    async def _compute(self, priority: int, task, *, grad: bool = False):
        return await self._timed(self.compute.submit(priority, task, grad=grad))

    async def _timed(self, awaitable):
        try:
            async with asyncio.timeout(self.config.limits.request_timeout_s):  # no extra task, unlike wait_for
                return await awaitable
        except TimeoutError:
            raise InvalidRequestError(
                f"the request took over {self.config.limits.request_timeout_s} s and was cancelled"
            ) from None


def _batch_group(session: Session) -> tuple:
    """Sessions whose steps of equal length can share a forward: the same span object, blocks and adapter."""
    opened = session.opened
    return id(session.span), opened.start_block, opened.end_block, opened.active_adapter


@dataclass(kw_only=True)
class _PendingStep:
    """An inference step of one session, validated and waiting for the compute thread."""

    session: Session
    position: int
    inputs: SpanInputs
    prompts: torch.Tensor | None

    def rewind(self) -> SessionStep:
        """Drop cached tokens at and after the step's position (a client replaying steps); idempotent."""
        cache = self.session.cache
        excess = cache.get_seq_length() - self.position
        if excess > 0:
            cache.crop(-excess)
        return SessionStep(inputs=self.inputs, cache=cache)


def _run_steps(pending: list[_PendingStep]) -> list[torch.Tensor]:
    """On the compute thread: steps of sessions on the same span, blocks and adapter; one forward for them all."""
    first = pending[0]
    opened, span = first.session.opened, first.session.span
    steps = [p.rewind() for p in pending]
    with use_adapter(opened.active_adapter):
        if len(steps) == 1:
            return [
                span(
                    first.inputs, steps[0].cache, start=opened.start_block, end=opened.end_block, prompts=first.prompts
                )
            ]
        return run_merged(span, steps, start=opened.start_block, end=opened.end_block)


def _backward_chunks(
    chunks: Iterable[GraphChunk], grad_outputs: torch.Tensor, prompts: torch.Tensor | None
) -> list[torch.Tensor]:
    """On the compute thread: [grad_inputs] (+ [grad_prompts]) through the chunks' graphs, which it frees."""
    grad_inputs = []
    grad_prompts = None if prompts is None else torch.zeros_like(prompts)
    for chunk in chunks:
        grads = torch.autograd.grad(chunk.output, chunk.leaves, grad_outputs[chunk.rows])
        grad_inputs.append(grads[0])
        if grad_prompts is not None:
            if grad_prompts.shape[1] == 1:  # prompts shared by all rows: every chunk adds to their gradient
                grad_prompts += grads[1]
            else:
                grad_prompts[:, chunk.rows] = grads[1]
    return [torch.cat(grad_inputs)] + ([] if grad_prompts is None else [grad_prompts])


def _rows(inputs: SpanInputs, rows: slice) -> SpanInputs:
    return SpanInputs(
        hidden_states=inputs.hidden_states[rows],
        attention_mask=None if inputs.attention_mask is None else inputs.attention_mask[rows],
        position_ids=None if inputs.position_ids is None else inputs.position_ids[rows],
    )


def _prompt_rows(prompts: torch.Tensor, rows: slice) -> torch.Tensor:
    """Deep prompts for some rows of the batch (prompts shared by all rows have a batch dimension of 1)."""
    return prompts if prompts.shape[1] == 1 else prompts[:, rows]


def _blocks(meta: SpanRequest) -> int:
    return meta.end_block - meta.start_block
