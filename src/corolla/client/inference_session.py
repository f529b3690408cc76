"""Inference sessions: one stream per server of a chain, each keeping the attention cache of its blocks.

The client keeps every input it sent to each span, so when a server fails the client bans it, routes around it
and replays those inputs to the replacement, which rebuilds the lost cache; generation continues unchanged.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import torch
from hivemind.proto import runtime_pb2

from corolla.algorithms.output_check import token_error
from corolla.algorithms.routing import RouteHop
from corolla.client.answer_evidence import SessionLog
from corolla.client.failover import describe
from corolla.client.span_calls import check_finite_reply
from corolla.client.swarm import SwarmView
from corolla.client.verification import WrongValuesError
from corolla.errors import MissingBlocksError, RemoteCallError, UnsignedAnswerError
from corolla.log import get_logger
from corolla.net.loop import background_loop, run_sync
from corolla.net.tensors import pack, unpack_metadata, unpack_tensors
from corolla.protocol.messages import InferenceOpen, InferenceStep, PushTarget
from corolla.protocol.rpc import BLOCK_SERVER, MessageStream, RpcStub

logger = get_logger(__name__)


@dataclass(kw_only=True)
class _Sent:
    """What the client sent to a span at one step (kept to replay it to a replacement server)."""

    hidden_states: torch.Tensor
    position_ids: torch.Tensor | None
    output: torch.Tensor | None = None  # the server's answer, kept until a check covers it (verification on)
    signed_step: int | None = None  # which step of the stream's SessionLog answered it (verification on)

    def first(self, tokens: int) -> _Sent:
        """The same step cut to its first ``tokens`` tokens."""
        return _Sent(
            hidden_states=self.hidden_states[:, :tokens],
            position_ids=None if self.position_ids is None else self.position_ids[:, :tokens],
            output=None if self.output is None else self.output[:, :tokens],
            signed_step=self.signed_step,
        )


class _ServerStream:
    """One open inference stream to one server for blocks ``hop.start..hop.end-1``.

    It uses a raw message stream (rather than a request iterator) so that a server whose connection closes is
    noticed at once, instead of after a timeout.
    """

    def __init__(
        self,
        hop: RouteHop,
        *,
        max_length: int,
        batch_size: int,
        compression: str,
        timeout_s: float,
        active_adapter: str | None = None,
        dht_prefix: str | None = None,
        announced: tuple | None = None,
    ):
        """With a ``dht_prefix`` (verification on), every answer's signature is checked and kept in ``log``."""
        self.hop, self.max_length, self.batch_size = hop, max_length, batch_size
        self.compression, self.timeout_s, self.active_adapter = compression, timeout_s, active_adapter
        self._stream: MessageStream | None = None
        self._opened = False
        self.session_id = uuid.uuid4().hex
        self.log: SessionLog | None = None
        if dht_prefix is not None:
            self.log = SessionLog(
                peer_id=hop.peer_id, session_id=self.session_id, start_block=hop.start, end_block=hop.end,
                adapter=active_adapter, dht_prefix=dht_prefix, announced=announced,
            )  # fmt: skip

    async def open(self, swarm: SwarmView) -> None:
        stub = RpcStub(await swarm.transport(), self.hop.peer_id, BLOCK_SERVER)
        self._stream = await stub.open_stream("inference", timeout_s=self.timeout_s)

    async def step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        position: int,
        *,
        step_id: str | None = None,
        push_chain: list[PushTarget] = (),
        pusher: str | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step; ``pusher``: the server before this one, which may push this step's input here."""
        mask, positions = _unless_default(mask, positions, position)
        step = InferenceStep(
            step_id=step_id or uuid.uuid4().hex,
            position=position,
            has_attention_mask=mask is not None,
            has_position_ids=positions is not None,
            has_prompts=prompts is not None,
            push_chain=list(push_chain),
            pusher=pusher,
        ).model_dump()
        if not self._opened:
            step = (
                InferenceOpen(
                    session_id=self.session_id,
                    max_length=self.max_length,
                    batch_size=self.batch_size,
                    start_block=self.hop.start,
                    end_block=self.hop.end,
                    output_compression=self.compression,
                    active_adapter=self.active_adapter,
                ).model_dump()
                | step
            )
            self._opened = True
        tensors = [hidden] + [t for t in (mask, positions, prompts) if t is not None]
        if self._stream is None:
            raise ConnectionError(f"the stream to {self.hop.peer_id} is closed")
        request = pack(tensors, step, compression=self.compression)
        await self._stream.send(request)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            response = await self._receive(deadline)
            meta = self._decode(unpack_metadata, response)
            answered = meta.get("step_id") if isinstance(meta, dict) else None
            if answered == step["step_id"]:
                break
            # the answer to an older step, e.g. one a previous server pushed here before the client replaced it
            logger.debug("Skipping the answer to step %s from %s", answered, self.hop.peer_id)
        outputs = self._decode(unpack_tensors, response)
        if len(outputs) != 1 or outputs[0].shape != hidden.shape:
            raise RemoteCallError(f"server {self.hop.peer_id} returned a malformed step result")
        check_finite_reply(self.hop.peer_id, "step result", outputs[0], hidden)
        if self.log is not None:
            flags = (mask is not None, positions is not None, prompts is not None)
            self.log.record(position, flags, request, response, meta)
        return outputs[0]

    def _decode(self, decode, response: runtime_pb2.ExpertResponse):
        """Undecodable bytes are the server's fault (a RemoteCallError), not a client bug."""
        try:
            return decode(response)
        except Exception as e:
            raise RemoteCallError(f"server {self.hop.peer_id} sent an undecodable step result: {e}") from e

    async def _receive(self, deadline: float) -> runtime_pb2.ExpertResponse:
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        return await self._stream.receive(runtime_pb2.ExpertResponse, timeout)

    async def close(self) -> None:
        """End the stream politely (the server then frees the session's cache at once)."""
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        await stream.close()


@dataclass(kw_only=True)
class _SpanState:
    """A contiguous range of blocks served by one stream, with the inputs sent to it so far."""

    hop: RouteHop
    stream: _ServerStream | None = None
    sent: list[_Sent] = field(default_factory=list)
    shadow: _ServerStream | None = None  # a session on another server of these blocks that checks this one
    checked: int = 0  # how many of ``sent`` the shadow has computed too (and agreed on)

    def tokens(self, entries: list[_Sent]) -> int:
        return sum(entry.hidden_states.shape[1] for entry in entries)

    def keep_tokens(self, count: int) -> None:
        """Cut what was sent to the first ``count`` tokens (the session rewinds); a shadow whose check covered
        more rewinds by itself at its next check, which starts where the kept checked entries end."""
        kept, total = [], 0
        for entry in self.sent:
            if total >= count:
                break
            length = entry.hidden_states.shape[1]
            if total + length > count:
                entry = entry.first(count - total)
            kept.append(entry)
            total += entry.hidden_states.shape[1]
        self.sent = kept
        self.checked = min(self.checked, len(kept))

    async def close(self) -> None:
        for stream in (self.stream, self.shadow):
            if stream is not None:
                await stream.close()
        self.shadow = None


class InferenceSession:
    """A generation session over blocks start..end-1 of the swarm, up to ``max_length`` tokens.

    ``step`` takes the hidden states of new tokens (plus the full attention mask and the new tokens' position ids)
    and returns the last block's outputs for them. Use as a context manager, or call ``close()``.
    """

    def __init__(self, swarm: SwarmView, *, start: int, end: int, max_length: int):
        self.swarm, self.start, self.end, self.max_length = swarm, start, end, max_length
        self.position = 0
        self.token_history: torch.Tensor | None = None  # ids the servers have seen (kept by generate)
        self.mask_history: torch.Tensor | None = None
        self._spans: list[_SpanState] | None = None
        self._prompts: torch.Tensor | None = None  # deep prompts of the first step, kept for replays
        self._closed = False
        self._background: set[asyncio.Future] = set()
        self.steps = 0  # steps run (each may carry several tokens)
        self.dropped_tokens = 0  # tokens sent and then dropped by ``rewind`` (rejected speculative guesses)

    @property
    def route(self) -> tuple[RouteHop, ...]:
        """The servers this session runs through now, in block order (empty before its first step); after a
        server fails, the replacement hops are here."""
        return tuple(span.hop for span in self._spans or ())

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run new tokens through all blocks; returns hidden states of the same shape.

        ``prompts``: deep prompts [blocks, batch or 1, prefix, hidden] for the session's first step only.
        """
        self._check_step(hidden_states, prompts)
        step = self._step(hidden_states, attention_mask, position_ids, with_prompts=prompts is not None)
        output = run_sync(step, timeout_s=self._step_timeout_s())
        self.position += hidden_states.shape[1]
        self.steps += 1
        return output

    async def astep(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``step`` for asyncio code (e.g. a web server running many sessions on one event loop): awaits the step
        without blocking a thread. Cancelling it cancels the step; the session must then be closed."""
        self._check_step(hidden_states, prompts)
        step = self._step(hidden_states, attention_mask, position_ids, with_prompts=prompts is not None)
        output = await asyncio.wait_for(_on_background_loop(step), timeout=self._step_timeout_s())
        self.position += hidden_states.shape[1]
        self.steps += 1
        return output

    def rewind(self, position: int) -> None:
        """Forget every token from ``position`` on (speculative decoding drops the rejected guesses this way).

        Nothing is sent now: the next step starts at ``position``, and each server then drops the later tokens of
        its cache before computing it. What the client keeps to replay to a replacement server is cut to
        ``position`` tokens too, so a server that fails later is rebuilt with the accepted tokens only.
        """
        if self._closed:
            raise RuntimeError("this inference session is closed")
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to position {position}: the session holds {self.position} tokens")
        for span in self._spans or ():
            span.keep_tokens(position)
        self.dropped_tokens += self.position - position
        self.position = position

    def _step_timeout_s(self) -> float:
        return self.swarm.config.step_timeout_s * (self.end - self.start + 2)

    def _check_step(self, hidden_states: torch.Tensor, prompts: torch.Tensor | None) -> None:
        if self._closed:
            raise RuntimeError("this inference session is closed")
        if prompts is not None:
            if self.position != 0:
                raise ValueError("deep prompts can only be passed with the first step of a session")
            if prompts.shape[0] != self.end - self.start:
                raise ValueError(f"prompts are for {prompts.shape[0]} blocks, the session has {self.end - self.start}")
            self._prompts = prompts.detach()
        new_tokens = hidden_states.shape[1]
        if self.position + new_tokens > self.max_length:
            raise ValueError(
                f"the session was opened for max_length={self.max_length} tokens; this step would reach "
                f"{self.position + new_tokens}. Open a longer session."
            )

    async def _step(self, hidden, mask, positions, *, with_prompts: bool):
        batch_size = hidden.shape[0]
        if self._spans is None:
            self._spans = await self._open_chain_with_retries(self.start, self.end, batch_size, replay_from=None)
        index, failovers = 0, {}  # one retry budget per span of blocks
        step_ids = [uuid.uuid4().hex for _ in self._spans]
        while index < len(self._spans):
            span = self._spans[index]
            check = None  # this step's check on the span's shadow server runs while the span computes the step
            if self.swarm.verifier.enabled and self.swarm.verifier.sample():
                check = asyncio.ensure_future(self._shadow_step(span, hidden, mask, positions))
            try:
                output = await span.stream.step(
                    hidden, mask, positions, self.position, step_id=step_ids[index],
                    push_chain=[] if with_prompts else self._push_chain(index, step_ids),
                    pusher=None if with_prompts else self._pusher(index),
                    prompts=self._prompts_for(span.hop) if with_prompts else None,
                )  # fmt: skip
                if check is not None:
                    output = await self._verify(span, hidden, mask, positions, output, check)
            except Exception as e:
                if check is not None:
                    check.cancel()
                if isinstance(e, UnsignedAnswerError):
                    self.swarm.distrust(span.hop.peer_id, str(e))
                await span.close()
                blocks = (span.hop.start, span.hop.end)
                failover = failovers.setdefault(blocks, self.swarm.failover(*blocks))
                await failover.failed(span.hop.peer_id, e)  # raises for a client bug, or when the budget is spent
                # refresh the swarm view in the background: the current view (minus the banned server) usually
                # already has a replacement, and routing refreshes by itself when blocks seem missing
                self._background.add(asyncio.ensure_future(asyncio.to_thread(self._refresh_quietly)))
                self._background = {task for task in self._background if not task.done()}
                replay_mask = None if mask is None else mask[:, : self.position]
                self._spans[index : index + 1] = await self._open_chain_with_retries(
                    span.hop.start, span.hop.end, batch_size, replay_from=(span, replay_mask)
                )
                step_ids = step_ids[:index] + [uuid.uuid4().hex for _ in self._spans[index:]]
                continue  # retry this step on the replacement chain
            kept = output if self.swarm.verifier.enabled and span.checked <= len(span.sent) else None
            span.sent.append(_Sent(hidden_states=hidden, position_ids=positions, output=kept,
                                   signed_step=_last_signed(span.stream)))  # fmt: skip
            self.swarm.forgive(span.hop.peer_id)
            hidden = output
            index += 1
        return hidden

    def _refresh_quietly(self) -> None:
        try:
            self.swarm.refresh()
        except Exception as e:  # routing refreshes again by itself if it finds blocks missing
            logger.debug("Background refresh of the swarm view failed: %s", describe(e))

    @property
    def _pushing(self) -> bool:
        return self.swarm.config.push and not self.swarm.verifier.enabled

    async def _shadow_step(self, span: _SpanState, hidden, mask, positions) -> tuple[torch.Tensor, int] | None:
        """On ``span``'s shadow server (opened on first use), every input since the last check plus this step's:
        (its outputs for those tokens, how many entries of ``span.sent`` they cover), or None when no other server
        can check (counted) or the checking server failed (banned; the check is skipped). Needs nothing from the
        checked server, so it runs while that server computes the step."""
        verifier = self.swarm.verifier
        if span.shadow is None:
            checker = verifier.checker(span.hop, exclude=set())
            if checker is None:
                verifier.stats.unverifiable += 1
                return None
            span.shadow, span.checked = self._new_stream(checker, hidden.shape[0]), 0
        shadow, covered = span.shadow, len(span.sent)
        window_start = span.tokens(span.sent[: span.checked])
        entries = [*span.sent[span.checked :], _Sent(hidden_states=hidden, position_ids=positions)]
        window_hidden, window_positions = _joined(entries)
        try:
            if span.checked == 0:
                await shadow.open(self.swarm)
            prompts = self._prompts_for(span.hop) if window_start == 0 else None
            checked = await shadow.step(window_hidden, mask, window_positions, window_start, prompts=prompts)
        except Exception as e:  # the checking server failed: an ordinary failure of that server
            verifier.checker_failed(shadow.hop, e)
            await shadow.close()
            if span.shadow is shadow:
                span.shadow = None
            return None
        verifier.stats.checks += 1
        verifier.stats.count(window_hidden)
        return checked, covered

    async def _verify(self, span: _SpanState, hidden, mask, positions, output: torch.Tensor, shadow_step):
        """Compare ``span``'s answers since its last check (``output``, this step's, included) with its shadow's
        (``shadow_step``: the task of ``_shadow_step``); returns ``output`` when it stands. A shadow caught lying is
        replaced by the server that settled it; a checked server caught lying raises WrongValuesError (it is
        distrusted; the step is retried on a replacement)."""
        verifier = self.swarm.verifier
        result = await shadow_step
        if result is None:
            return output
        checked, covered = result
        shadow = span.shadow
        pending = [*span.sent[span.checked : covered], _Sent(hidden_states=hidden, position_ids=positions)]
        window_start = span.tokens(span.sent[: span.checked])
        answered = torch.cat([*(entry.output for entry in pending[:-1]), output], dim=1)
        if token_error(answered, checked) <= verifier.tolerance(span.hop, span.hop.peer_id, shadow.hop.peer_id):
            self._checked(span)
            return output
        verifier.stats.mismatches += 1
        what = f"inference of blocks {span.hop.start}:{span.hop.end}"
        third_hop = verifier.checker(span.hop, exclude={shadow.hop.peer_id})
        if third_hop is None:
            verifier.stats.undecided += 1
            raise WrongValuesError(
                f"servers {span.hop.peer_id} and {shadow.hop.peer_id} disagree on {what}; no third server can decide"
            )
        third = self._new_stream(third_hop, hidden.shape[0])
        everything = [*span.sent, pending[-1]]
        try:
            await third.open(self.swarm)
            full_hidden, full_positions = _joined(everything)
            verifier.stats.count(full_hidden)
            prompts = self._prompts_for(span.hop)
            settled = (await third.step(full_hidden, mask, full_positions, 0, prompts=prompts))[:, window_start:]
        except Exception as e:
            verifier.checker_failed(third_hop, e)
            await third.close()
            verifier.stats.undecided += 1
            raise WrongValuesError(f"servers disagree on {what}; the third server failed") from e
        hops = [span.hop.peer_id, shadow.hop.peer_id, third_hop.peer_id]
        answers = [answered, checked, settled]
        winner = verifier.settle(span.hop, hops, answers, what)  # distrusts the liars
        provable = verifier.provable_error(span.hop, *hops)
        pending_outputs = [*(entry.output for entry in pending[:-1]), output]
        lying_step = _first_wrong(pending, pending_outputs, answers[winner], provable, last=_last_signed(span.stream))
        for stream, step, value in ((span.stream, lying_step, answered), (shadow, _last_signed(shadow), checked),
                                    (third, _last_signed(third), settled)):  # fmt: skip
            if stream.log is not None and step is not None and token_error(value, answers[winner]) > provable:
                proof = stream.log.proof(step)
                if proof is not None:
                    self.swarm.report_lie(proof)
        if span.hop.peer_id in self.swarm.distrusted():
            await third.close()
            raise WrongValuesError(f"server {span.hop.peer_id} returned wrong values for {what}")
        await shadow.close()  # the shadow lied: the third server, which holds the whole session too, takes over
        span.shadow = third
        self._checked(span)
        logger.debug("Kept server %s's answer (index %d) for %s", span.hop.peer_id, winner, what)
        return output

    @staticmethod
    def _checked(span: _SpanState) -> None:
        """Everything sent to ``span`` so far, and the step being added, is checked: the answers need not be kept."""
        for entry in span.sent:
            entry.output = None
        span.checked = len(span.sent) + 1

    def _prompts_for(self, hop: RouteHop) -> torch.Tensor | None:
        """The session's deep prompts for the blocks of one hop (None without deep prompts)."""
        if self._prompts is None:
            return None
        return self._prompts[hop.start - self.start : hop.end - self.start]

    def _push_chain(self, index: int, step_ids: list[str]) -> list[PushTarget]:
        """The servers after ``index``: each server pushes its output to the next one (if push is on and the
        session is not verified: the client checks what it forwards itself)."""
        if not self._pushing:
            return []
        return [
            PushTarget(peer_id=span.hop.peer_id, session_id=span.stream.session_id, step_id=step_id)
            for span, step_id in zip(self._spans[index + 1 :], step_ids[index + 1 :])
        ]

    def _pusher(self, index: int) -> str | None:
        """The server before span ``index``, which pushes its outputs there (None for the first, or push off)."""
        if not self._pushing or index == 0:
            return None
        return self._spans[index - 1].hop.peer_id

    async def _open_chain_with_retries(self, start: int, end: int, batch_size: int, *, replay_from):
        """A chain for blocks start..end-1 whose caches hold the session so far (replayed from ``replay_from``).

        A server that fails while being opened or replayed to is banned and another chain is tried, within the
        retry budget (``corolla.client.failover``). MissingBlocksError (nobody left to serve the blocks) is raised
        at once, and so is a client-side bug.
        """
        failover = self.swarm.failover(start, end)
        while True:
            spans: list[_SpanState] = []
            try:
                route = await asyncio.to_thread(
                    self.swarm.inference_route, start, end, cache_tokens=batch_size * self.max_length
                )  # DHT reads block: keep them off the event loop (hivemind resolves their futures through it)
                logger.info("Route: %s", " -> ".join(f"{h.peer_id[-6:]}[{h.start}:{h.end}]" for h in route))
                for hop in route:
                    spans.append(_SpanState(hop=hop, stream=self._new_stream(hop, batch_size)))
                    await spans[-1].stream.open(self.swarm)
                if replay_from is not None:
                    await self._replay(replay_from[0], spans, replay_from[1])
                return spans
            except MissingBlocksError:
                raise
            except Exception as e:
                bad = spans[-1] if spans else None
                for span in spans:
                    await span.stream.close()
                if isinstance(e, UnsignedAnswerError) and bad is not None:
                    self.swarm.distrust(bad.hop.peer_id, str(e))
                if bad is None:  # routing itself failed: nobody to ban
                    await failover.failed(None, e)
                else:
                    await failover.failed(bad.hop.peer_id, e, blocks=(bad.hop.start, bad.hop.end))

    def _new_stream(self, hop: RouteHop, batch_size: int) -> _ServerStream:
        return _ServerStream(
            hop,
            max_length=self.max_length,
            batch_size=batch_size,
            compression=self.swarm.config.compression,
            timeout_s=self.swarm.config.step_timeout_s,
            active_adapter=self.swarm.config.active_adapter,
            dht_prefix=self.swarm.dht_prefix if self.swarm.verifier.enabled else None,
            announced=self.swarm.announced(hop.peer_id),
        )

    async def _replay(self, failed: _SpanState, replacement: list[_SpanState], mask: torch.Tensor | None) -> None:
        """Send everything ``failed`` was sent to the replacement chain, so it rebuilds the lost caches.

        If a replacement server fails, the exception propagates with the failing span last in ``replacement``
        (spans after it are dropped from the list) so the caller knows whom to ban.
        """
        if not failed.sent:
            return
        hidden, positions = _joined(failed.sent)
        for i, span in enumerate(replacement):
            try:
                output = await span.stream.step(hidden, mask, positions, 0, prompts=self._prompts_for(span.hop))
            except Exception:
                for later in replacement[i + 1 :]:
                    await later.stream.close()
                del replacement[i + 1 :]
                raise
            kept = output if self.swarm.verifier.enabled else None
            span.sent.append(
                _Sent(hidden_states=hidden, position_ids=positions, output=kept, signed_step=_last_signed(span.stream))
            )
            hidden = output

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            run_sync(self._close_streams(), timeout_s=10)
        except Exception as e:
            logger.debug("Closing the session's streams failed: %s", e)

    async def aclose(self) -> None:
        """``close`` for asyncio code; safe to call from a task being cancelled (e.g. a client disconnected):
        the streams are closed on the client's background loop even if this call is interrupted."""
        if self._closed:
            return
        self._closed = True
        closing = asyncio.run_coroutine_threadsafe(self._close_streams(), background_loop())
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(closing)), timeout=10)
        except (asyncio.CancelledError, Exception) as e:  # the streams still close on the background loop
            logger.debug("Closing the session's streams did not finish here: %r", e)
            if isinstance(e, asyncio.CancelledError):
                raise

    async def _close_streams(self) -> None:
        for span in self._spans or []:
            try:
                await asyncio.wait_for(span.close(), timeout=5)
            except Exception as e:
                logger.debug("Closing a stream failed: %s", e)


def _unless_default(
    mask: torch.Tensor | None, positions: torch.Tensor | None, position: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The mask and position ids to send, without the ones a server would compute the same by itself: a mask of
    all ones (no padding), positions that continue the cache in every row. A decoding step then carries its one
    hidden state only, not a mask as long as the session."""
    if mask is not None and bool(mask.all()):
        mask = None
    if positions is not None and positions.ndim == 2:
        new = positions.shape[-1]
        expected = torch.arange(position, position + new, dtype=positions.dtype, device=positions.device)
        if bool((positions == expected).all()):
            positions = None
    return mask, positions


def _last_signed(stream: _ServerStream | None) -> int | None:
    """The index of the last step in ``stream``'s signed log (None without one)."""
    if stream is None or stream.log is None or not stream.log.steps:
        return None
    return len(stream.log.steps) - 1


def _first_wrong(entries: list[_Sent], outputs, reference: torch.Tensor, tol: float, *, last: int | None):
    """The signed step that answered the first of ``entries`` whose ``outputs`` disagree with ``reference`` (the
    majority's answer for the same tokens); the last entry (this step) has no ``signed_step`` yet: ``last``."""
    offset = 0
    for i, (entry, output) in enumerate(zip(entries, outputs)):
        tokens = output.shape[1]
        if token_error(output, reference[:, offset : offset + tokens]) > tol:
            return last if i == len(entries) - 1 else entry.signed_step
        offset += tokens
    return None


def _joined(entries: list[_Sent]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The hidden states (and position ids, if every entry has them) of consecutive steps as one step."""
    hidden = torch.cat([entry.hidden_states for entry in entries], dim=1)
    if any(entry.position_ids is None for entry in entries):
        return hidden, None
    return hidden, torch.cat([entry.position_ids for entry in entries], dim=1)


async def _on_background_loop(coro):
    """Await ``coro`` on the client's background loop (where the session's streams live) from any event loop."""
    loop = background_loop()
    if asyncio.get_running_loop() is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
