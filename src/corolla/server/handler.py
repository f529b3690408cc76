"""The block server's RPC handlers: framing and wiring only.

Requests are parsed here and handed to the compute backend (``corolla.server.backend``); inference sessions live in
the session table (``corolla.server.sessions``). A bad request fails alone with a message saying what was wrong, and
the server keeps serving everyone else. A session's reservation of attention-cache tokens is released whatever way
the session ends (done, error, timeout, client gone). Every answer is signed (``corolla.protocol.answer_signing``):
forward and backward answers carry a receipt and the server's certificate, an inference step's answer a receipt of
the session's chained inputs (the certificate with its first answer).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from pydantic import ValidationError

from corolla import __version__
from corolla.errors import InvalidRequestError
from corolla.log import get_logger
from corolla.net.streaming import receive_request, response_chunks, timed
from corolla.net.tensors import (
    pack,
    pack_response,
    unpack_metadata,
    unpack_tensors,
)
from corolla.net.transport import HandlerWrapper, P2PTransport, serve, unserve
from corolla.protocol.answer_signing import AnswerSigner, SessionChain, call_digest, span_fields
from corolla.protocol.messages import (
    BackwardRequest,
    InferenceOpen,
    InferenceStep,
    PushedStep,
    ServerStatus,
    SpanRequest,
    StepResult,
)
from corolla.protocol.rpc import BLOCK_SERVER
from corolla.protocol.versions import PROTOCOL_VERSION
from corolla.server.backend import SpanBackend
from corolla.server.compute import ComputeQueue
from corolla.server.config import ServerConfig
from corolla.server.memory_cache import CacheBudget
from corolla.server.push_sender import PushSender
from corolla.server.sessions import CLIENT, Action, Session, SessionTable

logger = get_logger(__name__)


class BlockServicer:
    """The ``BLOCK_SERVER`` RPCs of one server, hosting blocks ``span.start..span.end-1``."""

    def __init__(
        self, *, span, config: ServerConfig, budget: CacheBudget, compute: ComputeQueue, signer: AnswerSigner
    ):
        """``signer`` signs every answer with this server's answer key (certified by its identity)."""
        self.config, self.budget, self.signer = config, budget, signer
        self.sessions = SessionTable()
        self.backend = SpanBackend(span=span, config=config, compute=compute, sessions=self.sessions)
        self._p2p: P2P | None = None
        self._transport: P2PTransport | None = None

    @property
    def span(self):
        return self.backend.span

    async def start(self, p2p: P2P, *, wrap: HandlerWrapper | None = None) -> None:
        """Register the handlers on ``p2p`` (also used to push outputs to the next servers); ``wrap`` wraps each
        handler (``corolla.net.faults.FaultPlan.wrap_handler`` makes a server misbehave on purpose)."""
        self._p2p, self._transport = p2p, P2PTransport(p2p)
        await serve(p2p, BLOCK_SERVER, self, wrap=wrap)

    async def stop(self) -> None:
        """Remove the handlers (open streams end as their clients notice)."""
        if self._p2p is not None:
            await unserve(self._p2p, BLOCK_SERVER)

    def swap_span(self, span) -> None:
        """Serve other blocks from now on; sessions opened before keep running on the span they started with."""
        self.backend.swap_span(span)

    # ---- info -------------------------------------------------------------------------------------------------
    def status(self) -> ServerStatus:
        span = self.backend.span
        cfg = span.config
        return ServerStatus(
            version=__version__,
            protocol_version=PROTOCOL_VERSION,
            model_type=cfg.model_type,
            start_block=span.start,
            end_block=span.end,
            hidden_size=cfg.hidden_size,
            dtype=str(self.backend.dtype).removeprefix("torch."),
            quant=self.config.span.quant,
            cache_tokens_total=self.budget.total_tokens,
            cache_tokens_left=self.budget.tokens_left,
            max_batch_tokens=self.config.limits.max_batch_tokens,
            max_session_length=self.config.limits.max_session_length,
            active_sessions=len(self.sessions),
            adapters=self.backend.adapters,
            steps_from_pushes=self.sessions.steps_from_pushes,
            **self._batching_counts(),
            **self._activation_counts(),
        )

    def _activation_counts(self) -> dict[str, int]:
        activations = self.backend.activations
        stats = activations.stats
        return {
            "activation_hits": stats.hits,
            "activation_misses": stats.misses,
            "activation_evictions": stats.evictions,
            "activation_bytes": activations.size_bytes,
            "activation_peak_bytes": stats.peak_bytes,
        }

    def _batching_counts(self) -> dict[str, int]:
        batcher = self.backend.batcher
        if batcher is None:
            return {}
        stats = batcher.stats
        return {"steps_batched": stats.steps_batched, "batched_forwards": stats.forwards - stats.alone}

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(self.status().model_dump()))

    # ---- forward and backward ---------------------------------------------------------------------------------
    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Run hidden states through a sub-range of the hosted blocks (no cache)."""
        meta, tensors = _parse(SpanRequest, request)
        output = await self.backend.forward(meta, tensors)
        return self._signed("forward", meta, request, pack_response([output], {}, compression=meta.output_compression))

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Like rpc_forward for payloads over the transport's unary limit: tensors arrive and leave in chunks."""
        response = await self.rpc_forward(await self._receive_stream(requests), context)
        for message in response_chunks(response):
            yield message

    async def rpc_backward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Gradients of a sub-range's inputs (and deep prompts) given the gradient of its outputs."""
        meta, tensors = _parse(BackwardRequest, request)
        grads = await self.backend.backward(meta, tensors)
        return self._signed("backward", meta, request, pack_response(grads, {}, compression=meta.output_compression))

    def _signed(self, kind: str, meta: SpanRequest, request, response: runtime_pb2.ExpertResponse):
        """``response`` with this server's receipt for it (and its certificate) in the metadata."""
        flags = (meta.has_attention_mask, meta.has_position_ids, meta.has_prompts)
        inputs = call_digest(kind, span_fields(meta.start_block, meta.end_block, meta.active_adapter, flags),
                             request.tensors)  # fmt: skip
        receipt = self.signer.sign(kind, inputs, response.tensors)
        response.metadata = MSGPackSerializer.dumps(
            {"receipt": receipt.to_list(), "certificate": self.signer.certificate_list}
        )
        return response

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Like rpc_backward for payloads over the transport's unary limit."""
        response = await self.rpc_backward(await self._receive_stream(requests), context)
        for message in response_chunks(response):
            yield message

    async def _receive_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> runtime_pb2.ExpertRequest:
        """Reassemble a streamed request, refusing (after draining) anything over the server's token limits."""
        return await receive_request(
            requests,
            limit_bytes=64 * self.config.limits.max_batch_tokens * self.span.config.hidden_size,  # 16x fp32 hidden
            timeout_s=self.config.limits.request_timeout_s,
            too_large="streamed request is larger than this server's max_batch_tokens allow",
        )

    # ---- inference --------------------------------------------------------------------------------------------
    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A session: the first message opens it (and may carry a step); each later message is one step."""
        requests = timed(requests, self.config.limits.session_timeout_s)
        first = await anext(requests, None)
        if first is None:
            return
        opened, _ = _parse(InferenceOpen, first)
        self.backend.check_open(opened)
        tokens = opened.batch_size * opened.max_length
        async with self.budget.reserve(tokens, timeout_s=self.config.limits.alloc_timeout_s):
            span, cache = self.backend.new_cache(opened)
            with self.sessions.open(opened, span=span, cache=cache) as session:
                session.chain = SessionChain(
                    opened.session_id, opened.start_block, opened.end_block, opened.active_adapter
                )
                session.pushes = PushSender(self._transport, timeout_s=self.config.limits.request_timeout_s)
                reader = asyncio.create_task(_read_client(requests, session.inbox))
                logger.debug("Session %s opened for %d tokens", opened.session_id, tokens)
                try:
                    source, message = CLIENT, first
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
                    await session.pushes.close()
                    logger.debug("Session %s closed", opened.session_id)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """The previous server of a chain hands over its output for a step of one of our sessions."""
        self._deliver_push(request, context.remote_id.to_base58())
        return runtime_pb2.ExpertResponse()

    async def rpc_push_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """The previous server of a chain pushes the outputs of a session's steps, one message each (no answers).
        A push that is malformed or not allowed is dropped alone; the stream goes on."""
        sender = context.remote_id.to_base58()
        try:
            async for request in timed(requests, self.config.limits.session_timeout_s):
                try:
                    self._deliver_push(request, sender)
                except InvalidRequestError as e:
                    logger.debug("Dropped a push from %s: %s", sender, e)
        except InvalidRequestError:  # idle for a whole session timeout: the pushing session is gone
            pass
        return
        yield  # an async generator that answers nothing

    def _deliver_push(self, request: runtime_pb2.ExpertRequest, sender: str) -> None:
        """Queue a pushed step into its session (its tensors are decoded only if the step runs)."""
        pushed = _metadata(PushedStep, request)
        self.sessions.deliver_push(pushed.session_id, sender, request)

    async def _step(
        self, session: Session, message: runtime_pb2.ExpertRequest, source: str
    ) -> runtime_pb2.ExpertResponse | None:
        """Run one step; None when it needs no answer (a second copy of a step already answered)."""
        step = _metadata(InferenceStep, message)
        action = self.sessions.decide(session, step, source)
        if action is Action.SKIP:
            return None  # (its tensors are not even decoded)
        if action is Action.REPEAT:
            return session.last_output  # a repeated step is answered, not recomputed
        try:
            tensors = _tensors(message, InferenceStep)
            output = await self.backend.step(session, step, tensors)
        except InvalidRequestError as e:
            if source == CLIENT:
                raise
            # a pushed input this server refuses (e.g. NaN from a broken or lying previous server) is that server's
            # fault, not the session's: drop it, the client's own copy of the step (checked by the client) decides
            logger.warning(
                "Refused a step pushed by %s into session %s: %s", session.pusher, session.opened.session_id, e
            )
            return None
        if step.push_chain:  # first: the next server waits for it, the client's answer is not on the critical path
            self._push(session, step, output, tensors[1:])
        flags = (step.has_attention_mask, step.has_position_ids, step.has_prompts)
        inputs = session.chain.add(step.position, flags, message.tensors)
        response = pack_response([output], {}, compression=session.opened.output_compression)
        receipt = self.signer.sign("step", inputs, response.tensors, step=session.chain.steps)
        result = StepResult(
            step_id=step.step_id, position=session.length, cache_tokens_left=self.budget.tokens_left,
            receipt=receipt.to_list(), certificate=self.signer.certificate_list if session.chain.steps == 1 else None,
        )  # fmt: skip
        response.metadata = MSGPackSerializer.dumps(result.model_dump())
        self.sessions.record(session, step.step_id, source, response)
        return response

    def _push(self, session: Session, step: InferenceStep, output: torch.Tensor, extras: list[torch.Tensor]) -> None:
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
        session.pushes.push(target.peer_id, pack([output, *extras], pushed.model_dump()))


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
    return _metadata(schema, message), _tensors(message, schema)


def _metadata(schema, message):
    """The message's metadata validated against ``schema``; InvalidRequestError if malformed."""
    try:
        return schema.model_validate(unpack_metadata(message))
    except (ValueError, ValidationError) as e:
        raise InvalidRequestError(f"malformed {schema.__name__}: {_short(e)}") from None


def _tensors(message, schema) -> list[torch.Tensor]:
    """The message's decoded tensors; InvalidRequestError if one cannot be decoded."""
    try:
        return unpack_tensors(message)
    except ValueError as e:
        raise InvalidRequestError(f"malformed {schema.__name__}: {_short(e)}") from None


def _short(error: Exception) -> str:
    text = str(error).replace("\n", "; ")
    return text if len(text) < 300 else text[:300] + "..."
