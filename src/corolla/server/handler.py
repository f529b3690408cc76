"""The server's RPCs: info, forward (unary and streaming) and streaming inference sessions.

Every request is validated before it touches the model; a bad request fails alone with a message saying what was
wrong, and the server keeps serving everyone else. Inference sessions hold a reservation of attention-cache tokens
that is released whatever way the session ends (done, error, timeout, client gone).
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator  # noqa: UP035 - hivemind spots streaming RPCs only by typing.AsyncIterator

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming
from pydantic import ValidationError

from corolla import __version__
from corolla.errors import InvalidRequestError
from corolla.log import get_logger
from corolla.models.lora import use_adapter
from corolla.models.span import SpanInputs, SpanModel
from corolla.net.tensors import (
    STREAM_CHUNK_BYTES,
    combine_chunks,
    pack,
    pack_response,
    unpack_metadata,
    unpack_tensors,
)
from corolla.protocol.messages import (
    BackwardRequest,
    InferenceOpen,
    InferenceStep,
    PushedStep,
    ServerStatus,
    SpanRequest,
    StepResult,
)
from corolla.protocol.versions import PROTOCOL_VERSION
from corolla.server import validation
from corolla.server.compute import PRIORITY_FORWARD, PRIORITY_INFERENCE, ComputeQueue
from corolla.server.config import ServerConfig
from corolla.server.memory_cache import CacheBudget

logger = get_logger(__name__)


@dataclass(kw_only=True)
class _Session:
    """Server-side state of one inference session over blocks start..end-1."""

    opened: InferenceOpen
    span: SpanModel
    cache: object
    length: int = 0  # tokens already in the cache
    last_step_id: str | None = None
    last_output: runtime_pb2.ExpertResponse | None = None
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # (source, message) from the client and pushes
    answered: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # step id -> source


class BlockServicer(ServicerBase):
    """RPC handlers of one server, hosting blocks ``span.start..span.end-1``."""

    def __init__(self, *, span: SpanModel, config: ServerConfig, budget: CacheBudget, compute: ComputeQueue):
        self.span, self.config, self.budget, self.compute = span, config, budget, compute
        self.dtype = next(span.parameters()).dtype
        self.device = next(span.parameters()).device
        self.active_sessions = 0
        self.sessions: dict[str, _Session] = {}  # open sessions by id, so the previous server can push to them
        self._p2p: P2P | None = None
        self._pushes: set[asyncio.Task] = set()
        self.steps_from_pushes = 0
        self.adapters: tuple[str, ...] = config.adapter_names()  # loaded into every span this server serves

    async def start(self, p2p: P2P) -> None:
        """Register the RPC handlers on ``p2p`` (also used to push outputs to the next servers)."""
        self._p2p = p2p
        await self.add_p2p_handlers(p2p)

    def swap_span(self, span: SpanModel) -> None:
        """Serve other blocks from now on; sessions opened before keep running on the span they started with."""
        self.span = span

    # ---- info -------------------------------------------------------------------------------------------------
    def status(self) -> ServerStatus:
        cfg = self.span.config
        return ServerStatus(
            version=__version__,
            protocol_version=PROTOCOL_VERSION,
            model_type=cfg.model_type,
            start_block=self.span.start,
            end_block=self.span.end,
            hidden_size=cfg.hidden_size,
            dtype=str(self.dtype).removeprefix("torch."),
            quant=self.config.quant,
            cache_tokens_total=self.budget.total_tokens,
            cache_tokens_left=self.budget.tokens_left,
            max_batch_tokens=self.config.max_batch_tokens,
            max_session_length=self.config.max_session_length,
            active_sessions=self.active_sessions,
            adapters=self.adapters,
            steps_from_pushes=self.steps_from_pushes,
        )

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(self.status().model_dump()))

    # ---- forward and backward ---------------------------------------------------------------------------------
    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Run hidden states through a sub-range of the hosted blocks (no cache)."""
        meta, tensors = _parse(SpanRequest, request)
        return await self._forward(meta, tensors)

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Like rpc_forward for payloads over the transport's unary limit: tensors arrive and leave in chunks."""
        meta, tensors = _parse(SpanRequest, await self._receive_stream(requests))
        for message in _response_chunks(await self._forward(meta, tensors)):
            yield message

    async def rpc_backward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Gradients of a sub-range's inputs (and deep prompts) given the gradient of its outputs."""
        meta, tensors = _parse(BackwardRequest, request)
        return await self._backward(meta, tensors)

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Like rpc_backward for payloads over the transport's unary limit."""
        meta, tensors = _parse(BackwardRequest, await self._receive_stream(requests))
        for message in _response_chunks(await self._backward(meta, tensors)):
            yield message

    async def _receive_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> runtime_pb2.ExpertRequest:
        """Reassemble a streamed request, refusing (after draining) anything over the server's token limits."""
        parts, metadata, received = [], None, 0
        limit = 64 * self.config.max_batch_tokens * self.span.config.hidden_size  # bytes; 16x float32 hidden
        async for message in _timed(requests, self.config.request_timeout):
            received += message.ByteSize()
            if received > limit:
                # keep reading (and dropping) the rest: closing while the client still sends resets the stream,
                # and the client would then see a broken or empty stream instead of this error
                parts = []
                if received > 4 * limit:
                    break
                continue
            if metadata is None and message.metadata:
                metadata = message.metadata
            parts.extend(message.tensors)
        if received > limit:
            raise InvalidRequestError("streamed request is larger than this server's max_batch_tokens allow")
        return runtime_pb2.ExpertRequest(metadata=metadata or b"", tensors=combine_chunks(parts))

    async def _forward(self, meta: SpanRequest, tensors: list[torch.Tensor]) -> runtime_pb2.ExpertResponse:
        span = self.span
        validation.check_span(meta.start_block, meta.end_block, served=(span.start, span.end))
        self._check_adapter(meta)
        inputs, prompts = self._span_inputs(meta, tensors, past_length=0, batch_size=None, blocks=_blocks(meta))

        def task() -> torch.Tensor:
            outputs = []
            for rows in self._row_chunks(inputs.hidden_states):
                chunk_prompts = None if prompts is None else _prompt_rows(prompts, rows)
                with use_adapter(meta.active_adapter):
                    outputs.append(
                        span(_rows(inputs, rows), start=meta.start_block, end=meta.end_block, prompts=chunk_prompts)
                    )
            return torch.cat(outputs)

        output = await self._compute(PRIORITY_FORWARD, task)
        return pack_response([output.cpu()], {}, compression=meta.output_compression)

    async def _backward(self, meta: BackwardRequest, tensors: list[torch.Tensor]) -> runtime_pb2.ExpertResponse:
        span = self.span
        validation.check_span(meta.start_block, meta.end_block, served=(span.start, span.end))
        self._check_adapter(meta)
        if len(tensors) < 2:
            raise InvalidRequestError(f"backward needs hidden states and grad_outputs, got {len(tensors)} tensors")
        grad_outputs = tensors[1]
        inputs, prompts = self._span_inputs(
            meta, tensors[:1] + tensors[2:], past_length=0, batch_size=None, blocks=_blocks(meta)
        )
        validation.check_grad_outputs(grad_outputs, like=inputs.hidden_states)
        grad_outputs = grad_outputs.to(self.device, self.dtype)

        def task() -> list[torch.Tensor]:
            grad_inputs = []
            grad_prompts = None if prompts is None else torch.zeros_like(prompts)
            for rows in self._row_chunks(inputs.hidden_states):
                chunk = _rows(inputs, rows)
                hidden = chunk.hidden_states.detach().requires_grad_(True)
                chunk_prompts = None
                if prompts is not None:
                    chunk_prompts = _prompt_rows(prompts, rows).detach().requires_grad_(True)
                chunk = SpanInputs(
                    hidden_states=hidden, attention_mask=chunk.attention_mask, position_ids=chunk.position_ids
                )
                with use_adapter(meta.active_adapter):
                    output = span(chunk, start=meta.start_block, end=meta.end_block, prompts=chunk_prompts)
                leaves = [hidden] if chunk_prompts is None else [hidden, chunk_prompts]
                grads = torch.autograd.grad(output, leaves, grad_outputs[rows])
                grad_inputs.append(grads[0])
                if prompts is not None:
                    if prompts.shape[1] == 1:
                        grad_prompts += grads[1]
                    else:
                        grad_prompts[:, rows] = grads[1]
            return [torch.cat(grad_inputs)] + ([] if grad_prompts is None else [grad_prompts])

        grads = await self._compute(PRIORITY_FORWARD, task, grad=True)
        return pack_response([g.detach().cpu() for g in grads], {}, compression=meta.output_compression)

    def _row_chunks(self, hidden: torch.Tensor) -> list[slice]:
        """Rows of a batch in chunks of at most ``compute_chunk_tokens`` tokens (at least one row each)."""
        batch, tokens = hidden.shape[:2]
        rows = max(1, self.config.compute_chunk_tokens // tokens)
        return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]

    # ---- inference --------------------------------------------------------------------------------------------
    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A session: the first message opens it (and may carry a step); each later message is one step."""
        requests = _timed(requests, self.config.session_timeout)
        first = await anext(requests, None)
        if first is None:
            return
        opened, tensors = _parse(InferenceOpen, first)
        self._check_open(opened)
        tokens = opened.batch_size * opened.max_length
        async with self.budget.reserve(tokens, timeout_s=self.config.alloc_timeout):
            self.active_sessions += 1
            span = self.span
            session = _Session(opened=opened, span=span, cache=span.new_cache(opened.start_block, opened.end_block))
            if opened.session_id in self.sessions:
                raise InvalidRequestError(f"session id {opened.session_id!r} is already in use")
            self.sessions[opened.session_id] = session
            reader = asyncio.create_task(_read_client(requests, session.inbox))
            logger.debug("Session %s opened for %d tokens", opened.session_id, tokens)
            try:
                source, message = "client", first
                while source != "end":
                    if source == "error":
                        raise message
                    if message.tensors:
                        response = await self._step(session, message, source)
                        if response is not None:
                            yield response
                    source, message = await session.inbox.get()
            finally:
                reader.cancel()
                self.sessions.pop(opened.session_id, None)
                self.active_sessions -= 1
                session.cache = None
                logger.debug("Session %s closed", opened.session_id)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """The previous server of a chain hands over its output for a step of one of our sessions."""
        pushed, _ = _parse(PushedStep, request)
        session = self.sessions.get(pushed.session_id)
        if session is None:
            raise InvalidRequestError(f"no open session {pushed.session_id!r} on this server")
        session.inbox.put_nowait(("push", request))
        return runtime_pb2.ExpertResponse()

    def _check_open(self, opened: InferenceOpen) -> None:
        validation.check_span(opened.start_block, opened.end_block, served=(self.span.start, self.span.end))
        self._check_adapter(opened)
        if opened.max_length > self.config.max_session_length:
            raise InvalidRequestError(
                f"max_length={opened.max_length} exceeds this server's --max-session-length "
                f"{self.config.max_session_length}"
            )
        if opened.batch_size > self.config.max_batch_tokens:
            raise InvalidRequestError(f"batch_size={opened.batch_size} exceeds {self.config.max_batch_tokens}")

    async def _step(
        self, session: _Session, message: runtime_pb2.ExpertRequest, source: str
    ) -> runtime_pb2.ExpertResponse | None:
        """Run one step; None when it needs no answer (a second copy of a step already answered)."""
        step, tensors = _parse(InferenceStep, message)
        if step.step_id in session.answered:
            first_source = session.answered[step.step_id]
            if source == "push" or first_source == "push":
                session.answered[step.step_id] = "client" if source == "client" else first_source
                return None  # the other copy of a pushed step: it was computed and answered once
            if step.step_id == session.last_step_id and session.last_output is not None:
                return session.last_output  # a repeated step is answered, not recomputed
            raise InvalidRequestError(f"step {step.step_id!r} was already processed")
        if source == "push" and step.position != session.length:
            # a stale push (its step was already computed from the client's copy, or the client has since replaced
            # the pushing server and rewound): the client's own copy decides, a push must never break the session
            logger.debug("Ignoring a push at position %d (session at %d)", step.position, session.length)
            return None
        if step.position > session.length:
            raise InvalidRequestError(
                f"step at position {step.position} would skip positions: the session holds {session.length} tokens"
            )
        opened = session.opened
        if step.has_prompts and step.push_chain:
            raise InvalidRequestError("a step with deep prompts cannot be pushed: send it to every server directly")
        inputs, prompts = self._span_inputs(
            step, tensors, past_length=step.position, batch_size=opened.batch_size, blocks=_blocks(opened)
        )
        new_tokens = inputs.hidden_states.shape[1]
        if step.position + new_tokens > opened.max_length:
            raise InvalidRequestError(
                f"step would reach {step.position + new_tokens} tokens, over the session's max_length "
                f"{opened.max_length}"
            )

        def task():
            if step.position < session.length:  # the client rewinds (e.g. replays a step): drop the later tokens
                session.cache.crop(step.position - session.length)  # a negative crop removes tokens
            with use_adapter(opened.active_adapter):
                return session.span(
                    inputs, session.cache, start=opened.start_block, end=opened.end_block, prompts=prompts
                )

        output = await self._compute(PRIORITY_INFERENCE, task)
        session.length = step.position + new_tokens
        result = StepResult(step_id=step.step_id, position=session.length, cache_tokens_left=self.budget.tokens_left)
        response = pack_response([output.cpu()], result.model_dump(), compression=opened.output_compression)
        session.last_step_id, session.last_output = step.step_id, response
        session.answered[step.step_id] = source
        self.steps_from_pushes += source == "push"
        while len(session.answered) > 64:
            session.answered.popitem(last=False)
        if step.push_chain:
            self._push(step, output, tensors[1:])
        return response

    def _push(self, step: InferenceStep, output: torch.Tensor, extras: list[torch.Tensor]) -> None:
        """Send the step's output to the next server of the chain; failures only cost that speed-up."""
        target, rest = step.push_chain[0], step.push_chain[1:]
        pushed = PushedStep(
            session_id=target.session_id,
            step_id=target.step_id,
            position=step.position,
            has_attention_mask=step.has_attention_mask,
            has_position_ids=step.has_position_ids,
            push_chain=rest,
        )
        request = pack([output.cpu(), *extras], pushed.model_dump())

        async def send() -> None:
            try:
                p2p = self._p2p
                stub = BlockServicer.get_stub(p2p, PeerID.from_base58(target.peer_id))
                await stub.rpc_push(request, timeout=self.config.request_timeout)
            except Exception as e:
                logger.debug("Push to %s failed: %s", target.peer_id, e)

        task = asyncio.create_task(send())
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    # ---- shared -----------------------------------------------------------------------------------------------
    def _check_adapter(self, meta: SpanRequest) -> None:
        if meta.active_adapter is not None and meta.active_adapter not in self.adapters:
            held = ", ".join(repr(name) for name in self.adapters) or "none"
            raise InvalidRequestError(
                f"this server does not hold adapter {meta.active_adapter!r} (it holds: {held}); route to a server "
                f"that announces it"
            )

    def _span_inputs(
        self, meta, tensors: list[torch.Tensor], *, past_length: int, batch_size: int | None, blocks: int
    ) -> tuple[SpanInputs, torch.Tensor | None]:
        """Validated inputs of a span call, plus its deep prompts (None without them)."""
        has_prompts = getattr(meta, "has_prompts", False)
        expected = 1 + int(meta.has_attention_mask) + int(meta.has_position_ids) + int(has_prompts)
        if len(tensors) != expected:
            raise InvalidRequestError(
                f"expected {expected} tensors (hidden states, mask, positions, prompts), got {len(tensors)}"
            )
        hidden = tensors[0]
        validation.check_hidden_states(
            hidden,
            hidden_size=self.span.config.hidden_size,
            max_tokens=self.config.max_batch_tokens,
            batch_size=batch_size,
        )
        batch, new_tokens, _ = hidden.shape
        rest = iter(tensors[1:])
        mask = positions = prompts = None
        if meta.has_attention_mask:
            mask = validation.check_attention_mask(next(rest), batch=batch, length=past_length + new_tokens)
        if meta.has_position_ids:
            limit = max(self.config.max_session_length, past_length + new_tokens)
            positions = validation.check_position_ids(next(rest), batch=batch, tokens=new_tokens, limit=limit)
        if has_prompts:
            prompts = next(rest)
            validation.check_prompts(
                prompts, blocks=blocks, batch=batch, tokens=new_tokens, hidden_size=self.span.config.hidden_size
            )
            prompts = prompts.to(self.device, self.dtype)
        inputs = SpanInputs(
            hidden_states=hidden.to(self.device, self.dtype),
            attention_mask=None if mask is None else mask.to(self.device),
            position_ids=None if positions is None else positions.to(self.device),
        )
        return inputs, prompts

    async def _compute(self, priority: int, task, *, grad: bool = False):
        try:
            future = self.compute.submit(priority, task, grad=grad)
            return await asyncio.wait_for(future, self.config.request_timeout)
        except asyncio.TimeoutError:
            raise InvalidRequestError(
                f"the request took over {self.config.request_timeout} s and was cancelled"
            ) from None


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


def _response_chunks(response: runtime_pb2.ExpertResponse):
    """A response split into messages under the transport's size limit."""
    for tensor in response.tensors:
        for chunk in split_for_streaming(tensor, STREAM_CHUNK_BYTES):
            yield runtime_pb2.ExpertResponse(tensors=[chunk])


async def _read_client(requests: AsyncIterator, inbox: asyncio.Queue) -> None:
    """Move the client's messages into the session inbox; then ("end", None), or ("error", exc) on failure."""
    try:
        async for message in requests:
            await inbox.put(("client", message))
        await inbox.put(("end", None))
    except asyncio.CancelledError:
        raise
    except Exception as e:
        await inbox.put(("error", e))


def _parse(schema, message) -> tuple:
    """Metadata validated against ``schema`` plus decoded tensors; InvalidRequestError on anything malformed."""
    try:
        metadata = schema.model_validate(unpack_metadata(message))
        tensors = unpack_tensors(message)
    except (ValueError, ValidationError) as e:
        raise InvalidRequestError(f"malformed {schema.__name__}: {_short(e)}") from None
    return metadata, tensors


def _short(error: Exception) -> str:
    text = str(error).replace("\n", "; ")
    return text if len(text) < 300 else text[:300] + "..."


async def _timed(iterator: AsyncIterator, timeout_s: float) -> AsyncIterator:
    """Yield from ``iterator``, failing if the next item takes longer than ``timeout_s`` to arrive."""
    iterator = aiter(iterator)
    while True:
        try:
            item = await asyncio.wait_for(anext(iterator), timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise InvalidRequestError(f"no message within {timeout_s} s; closing the stream") from None
        yield item


def new_session_id() -> str:
    return uuid.uuid4().hex
