"""One forward or backward call to one server for a range of its blocks, unary or streamed by payload size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hivemind.proto import runtime_pb2

from corolla.algorithms.routing import RouteHop
from corolla.client.answer_evidence import SignedCall
from corolla.errors import RemoteCallError, UnsignedAnswerError
from corolla.net.streaming import call_maybe_streamed
from corolla.net.tensors import pack, unpack_tensors
from corolla.protocol.messages import BackwardRequest, SpanRequest
from corolla.protocol.rpc import BLOCK_SERVER, RpcStub


@dataclass(frozen=True)
class SpanCallInputs:
    """What a forward or backward call sends besides the hidden states: the mask, positions and deep prompts.

    attention_mask [batch, tokens], position_ids [batch, tokens], prompts [blocks of the call, batch or 1, prefix,
    hidden] (already sliced to the call's blocks), each optional.
    """

    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    prompts: torch.Tensor | None = None

    def extras(self) -> list[torch.Tensor]:
        return [t for t in (self.attention_mask, self.position_ids, self.prompts) if t is not None]

    def flags(self) -> dict:
        return dict(
            has_attention_mask=self.attention_mask is not None,
            has_position_ids=self.position_ids is not None,
            has_prompts=self.prompts is not None,
        )


async def call_forward(
    swarm, hop: RouteHop, hidden: torch.Tensor, extra: SpanCallInputs, *, activation_id: str | None = None,
    evidence: list[SignedCall] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Hidden states through blocks ``hop.start..hop.end-1`` on ``hop.peer_id``; with an ``activation_id`` the
    server may keep the activations for the backward call that passes the same id. With verification on, the
    answer's signature is checked, and the call's ``SignedCall`` is appended to ``evidence`` if one is given."""
    compression = swarm.config.compression
    meta = SpanRequest(
        start_block=hop.start,
        end_block=hop.end,
        output_compression=compression,
        active_adapter=swarm.config.active_adapter,
        activation_id=activation_id,
        **extra.flags(),
    )
    request = pack([hidden, *extra.extras()], meta.model_dump(), compression=compression)
    outputs = await _call(swarm, hop, meta, request, "forward", evidence)
    if len(outputs) != 1 or outputs[0].shape != hidden.shape:
        raise RemoteCallError(f"server {hop.peer_id} returned a malformed forward result")
    check_finite_reply(hop.peer_id, "forward result", outputs[0], hidden)
    return outputs[0].to(hidden.dtype)


async def call_backward(
    swarm, hop: RouteHop, hidden: torch.Tensor, grad_outputs: torch.Tensor, extra: SpanCallInputs,
    *, activation_id: str | None = None, evidence: list[SignedCall] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(grad of ``hidden``, grad of ``extra.prompts`` or None) for blocks ``hop.start..hop.end-1``;
    ``activation_id`` names the forward call whose kept activations the server may reuse (else it recomputes);
    ``evidence`` as in ``call_forward``."""
    compression = swarm.config.compression
    meta = BackwardRequest(
        start_block=hop.start,
        end_block=hop.end,
        output_compression=compression,
        active_adapter=swarm.config.active_adapter,
        activation_id=activation_id,
        **extra.flags(),
    )
    request = pack([hidden, grad_outputs, *extra.extras()], meta.model_dump(), compression=compression)
    outputs = await _call(swarm, hop, meta, request, "backward", evidence)
    expected = 1 + int(extra.prompts is not None)
    if len(outputs) != expected or outputs[0].shape != hidden.shape:
        raise RemoteCallError(f"server {hop.peer_id} returned a malformed backward result")
    check_finite_reply(hop.peer_id, "backward result", outputs[0], hidden, grad_outputs)
    if extra.prompts is None:
        return outputs[0].to(hidden.dtype), None
    if outputs[1].shape != extra.prompts.shape:
        raise RemoteCallError(f"server {hop.peer_id} returned deep-prompt gradients of a wrong shape")
    check_finite_reply(hop.peer_id, "deep-prompt gradient", outputs[1], hidden, grad_outputs, extra.prompts)
    return outputs[0].to(hidden.dtype), outputs[1].to(extra.prompts.dtype)


def check_finite_reply(peer_id: str, what: str, output: torch.Tensor, *inputs: torch.Tensor) -> None:
    """A reply with NaN or Inf computed from finite inputs is a failed call of the server that sent it.

    The client checks every reply before it passes the values on: otherwise the next server would rightly refuse
    them as its input and be blamed (and banned) for the previous server's fault.
    """
    if not torch.isfinite(output).all() and all(torch.isfinite(t).all() for t in inputs):
        raise RemoteCallError(f"server {peer_id} returned a {what} with NaN or Inf values for finite inputs")


async def _call(swarm, hop: RouteHop, meta, request: runtime_pb2.ExpertRequest, rpc: str, evidence):
    stub = RpcStub(await swarm.transport(), hop.peer_id, BLOCK_SERVER)
    response = await call_maybe_streamed(stub, rpc, request, timeout_s=swarm.config.request_timeout_s)
    if swarm.verifier.enabled:  # only a verifying client can catch a lie, and prove it with the signed answer
        try:
            signed = SignedCall.checked(
                hop.peer_id,
                rpc,
                meta,
                request,
                response,
                dht_prefix=swarm.dht_prefix,
                announced=swarm.announced(hop.peer_id),
            )
        except UnsignedAnswerError as e:
            swarm.distrust(hop.peer_id, str(e))
            raise
        if evidence is not None:
            evidence.append(signed)
    try:
        return unpack_tensors(response)
    except Exception as e:  # undecodable bytes are the server's fault, not a client bug
        raise RemoteCallError(f"server {hop.peer_id} sent an undecodable {rpc} reply: {e}") from e
