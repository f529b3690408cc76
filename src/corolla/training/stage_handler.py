"""The RPC handlers of a SWARM stage peer: parse and check a request, run it on the compute thread, answer.

A malformed or hostile request (wrong experiment or stage, token ids out of range, shapes that do not fit, NaN
inputs, an oversized micro-batch) fails alone with a message that says what was wrong; the peer keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from pydantic import ValidationError

from corolla.errors import InvalidRequestError
from corolla.net.streaming import receive_request, response_chunks, tensor_response_chunks
from corolla.net.tensors import pack_response, unpack_metadata, unpack_tensors
from corolla.protocol.stage_messages import StageBackward, StageForward, StagePeerStatus, StageReply, StageStateReply
from corolla.training.stage_backup import parse_state_request

if TYPE_CHECKING:
    from corolla.training.stage_worker import StageWorker, TrainingState

__all__ = ["StageHandler"]


class StageHandler:
    """Serves ``rpc_info``, ``rpc_forward`` and ``rpc_backward`` for whichever stage ``current()`` returns (a peer
    that moves between stages keeps its handlers). ``after_backward`` runs on the compute thread after each
    accumulated backward (the peer steps there when it alone holds the stage's whole target batch).
    ``rpc_state_stream`` answers with ``state_of(stage)``: (the state, whether it is a backup copy), or raises
    InvalidRequestError when this peer has no state of that stage."""

    def __init__(
        self,
        *,
        experiment: str,
        current: Callable[[], StageWorker | None],
        executor: concurrent.futures.ThreadPoolExecutor,
        max_request_samples: int,
        status: Callable[[], StagePeerStatus],
        max_request_bytes: int = 256 * 2**20,
        request_timeout_s: float = 60.0,
        after_backward: Callable[[], None] = lambda: None,
        state_of: Callable[[int], Awaitable[tuple[TrainingState, bool]]] | None = None,
    ):
        self.experiment, self.current, self.executor = experiment, current, executor
        self.max_request_samples, self.status, self.after_backward = max_request_samples, status, after_backward
        self.max_request_bytes, self.request_timeout_s = max_request_bytes, request_timeout_s
        self.queue_length = 0
        self.state_of = state_of

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(self.status().model_dump()))

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext):
        meta, worker, tensors = self._parse(request, StageForward)
        if worker.stage.is_last:
            raise InvalidRequestError("the last stage has no forward: send its backward with the labels")
        if len(tensors) != 1:
            raise InvalidRequestError(f"a forward request carries 1 tensor (the inputs), got {len(tensors)}")
        inputs = self._check_inputs(worker, tensors[0])
        outputs, compute_s = await self._compute(lambda: worker.forward(inputs))
        reply = StageReply(compute_s=compute_s, epoch=worker.epoch)
        return pack_response([outputs], reply.model_dump(), compression=meta.output_compression)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext):
        meta, worker, tensors = self._parse(request, StageBackward)
        if len(tensors) != 2:
            raise InvalidRequestError(
                f"a backward request carries 2 tensors (inputs, then grad_outputs or labels), got {len(tensors)}"
            )
        inputs = self._check_inputs(worker, tensors[0])
        target = self._check_target(worker, inputs, tensors[1])

        def work():
            outcome = worker.backward(meta.microbatch_id, inputs, target)
            self.after_backward()
            return outcome

        outcome = await self._compute(work)
        reply = StageReply(
            compute_s=outcome.compute_s, epoch=worker.epoch, loss=outcome.loss, accumulated=outcome.accumulated
        )
        grads = [] if outcome.grad_inputs is None else [outcome.grad_inputs]
        return pack_response(grads, reply.model_dump(), compression=meta.output_compression)

    async def rpc_forward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
        """``rpc_forward`` for requests over the transport's unary limit: tensors arrive and leave in chunks."""
        response = await self.rpc_forward(await self._receive(requests), context)
        for message in response_chunks(response):
            yield message

    async def rpc_backward_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
        """``rpc_backward`` for requests over the transport's unary limit."""
        response = await self.rpc_backward(await self._receive(requests), context)
        for message in response_chunks(response):
            yield message

    async def rpc_state_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
        """A stage's training state, from the stage this peer serves or the copy of another stage it keeps."""
        meta = parse_state_request(await self._receive(requests), self.experiment)
        if self.state_of is None:
            raise InvalidRequestError("this peer shares no training state")
        state, from_backup = await self.state_of(meta.stage)
        reply = StageStateReply(
            stage=meta.stage, epoch=state.epoch, optimizer_steps=state.optimizer_steps, from_backup=from_backup,
            num_tensors=len(state.tensors),
        )  # fmt: skip
        for message in tensor_response_chunks(state.tensors, reply.model_dump()):
            yield message

    async def _receive(self, requests) -> runtime_pb2.ExpertRequest:
        return await receive_request(
            requests,
            limit_bytes=self.max_request_bytes,
            timeout_s=self.request_timeout_s,
            too_large=f"the streamed request is over this peer's limit of {self.max_request_bytes / 2**20:g} MB",
        )

    # ---- checks --------------------------------------------------------------------------------------------
    def _parse(self, request, schema):
        try:
            meta = schema.model_validate(unpack_metadata(request))
            tensors = unpack_tensors(request)
        except (ValueError, ValidationError) as e:
            raise InvalidRequestError(f"malformed request: {' '.join(str(e).split())}") from None
        worker = self.current()
        if worker is None:
            raise InvalidRequestError("this peer is not serving a stage right now (joining or moving); retry another")
        if meta.experiment != self.experiment or meta.stage != worker.stage.stage:
            raise InvalidRequestError(
                f"this peer serves stage {worker.stage.stage} of experiment {self.experiment!r}, "
                f"not stage {meta.stage} of {meta.experiment!r}"
            )
        return meta, worker, tensors

    def _check_inputs(self, worker: StageWorker, inputs: torch.Tensor) -> torch.Tensor:
        config = worker.stage.config
        if inputs.shape[0] > self.max_request_samples:
            raise InvalidRequestError(
                f"a micro-batch of {inputs.shape[0]} samples is over this peer's limit of {self.max_request_samples}"
            )
        if inputs.ndim < 2 or inputs.shape[0] == 0 or inputs.shape[1] == 0:
            raise InvalidRequestError(f"inputs of shape {tuple(inputs.shape)} are empty or have too few dims")
        max_len = getattr(config, "max_position_embeddings", None)
        if max_len is not None and inputs.shape[1] > max_len:
            raise InvalidRequestError(f"sequences of {inputs.shape[1]} tokens are longer than the model's {max_len}")
        if worker.stage.is_first:
            return _check_token_ids(inputs, worker.stage.vocab_size, "inputs")
        hidden = config.hidden_size
        if inputs.ndim != 3 or inputs.shape[2] != hidden or not inputs.is_floating_point():
            raise InvalidRequestError(
                f"stage {worker.stage.stage} takes float hidden states [batch, seq, {hidden}], "
                f"got {inputs.dtype} {tuple(inputs.shape)}"
            )
        if not torch.isfinite(inputs).all():
            raise InvalidRequestError("the inputs contain NaN or Inf values")
        return inputs.float()

    def _check_target(self, worker: StageWorker, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if worker.stage.is_last:
            labels = _check_token_ids(target, worker.stage.vocab_size, "labels", allow_ignored=True)
            if labels.shape != inputs.shape[:2]:
                raise InvalidRequestError(f"labels {tuple(labels.shape)} do not fit inputs {tuple(inputs.shape)}")
            return labels
        expected = (*inputs.shape[:2], worker.stage.config.hidden_size)
        if tuple(target.shape) != expected or not target.is_floating_point():
            raise InvalidRequestError(
                f"grad_outputs must be float {expected}, got {target.dtype} {tuple(target.shape)}"
            )
        if not torch.isfinite(target).all():
            raise InvalidRequestError("grad_outputs contain NaN or Inf values")
        return target.float()

    async def _compute(self, fn):
        self.queue_length += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        finally:
            self.queue_length -= 1


def _check_token_ids(ids: torch.Tensor, vocab_size: int, what: str, *, allow_ignored: bool = False) -> torch.Tensor:
    if ids.dtype not in (torch.int32, torch.int64) or ids.ndim != 2:
        raise InvalidRequestError(f"{what} must be integer token ids [batch, seq], got {ids.dtype} {tuple(ids.shape)}")
    valid = (ids >= 0) & (ids < vocab_size)
    if allow_ignored:
        valid |= ids == -100
    if not valid.all():
        raise InvalidRequestError(f"{what} hold token ids outside 0..{vocab_size - 1}")
    return ids.long()
