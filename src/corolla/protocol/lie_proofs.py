"""Proofs that a server returned wrong values, published to the DHT for every client to check.

A client that caught a server lying (``corolla.client.verification``: a majority of servers disagreed with it)
holds that server's signed receipt for the answer and the exact inputs and outputs it covers. That is a
``LieProof``: the server's certificate, its receipt, the inputs (for an inference step, every step of the session up
to the wrong one, since they built its attention cache) and the answer. Anyone can check it in two parts:

1. ``LieProof.check_signed`` (cheap, no model): the certificate is signed by the accused's identity, the receipt by
   its answer key, and the inputs and outputs hash to what the receipt signs. A proof that fails here is forged.
2. ``corolla.client.proof_check`` (one span computation): recompute the answer from those inputs with the model's
   weights and compare it with the signed answer within the tolerance of the number format the server certified.
   Only if they disagree is the lie proven; a proof whose answer is right is false, and says so about its reporter.

A proof is stored under ``lie_proofs_key(dht_prefix, accused)``, in its reporter's owner subkey (one proof per
reporter and accused), so a client looks proofs up for exactly the servers it would use.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import msgpack
from hivemind.proto import runtime_pb2
from pydantic import Field

from corolla.protocol.answer_signing import (
    Certificate,
    ForgedAnswer,
    Receipt,
    SessionChain,
    call_digest,
    outputs_digest,
    span_fields,
)
from corolla.protocol.records import SignedRecord

MAX_PROOF_BYTES = 2**20  # a DHT value; a larger proof is not published (the client still stops using the liar)
MAX_PROOF_STEPS = 4096
PROOF_EXPIRATION_S = 24 * 3600.0


class InvalidProof(ValueError):
    """A proof that is malformed, too large, for another model, or whose signatures or digests do not hold."""


@dataclass(frozen=True)
class ProvenStep:
    """One call (forward, backward) or one inference step as the server received it."""

    position: int  # where an inference step starts (0 for forward and backward)
    flags: tuple[bool, bool, bool]  # has attention mask, position ids, deep prompts
    tensors: tuple[bytes, ...]  # serialized runtime_pb2.Tensor, exactly as sent

    def parsed(self) -> list[runtime_pb2.Tensor]:
        try:
            return [runtime_pb2.Tensor.FromString(raw) for raw in self.tensors]
        except Exception as e:
            raise InvalidProof(f"a tensor of the proof cannot be parsed: {e}") from None


@dataclass(frozen=True)
class LieProof:
    """A server's signed answer that its reporter says is wrong, with everything needed to recompute it."""

    certificate: Certificate
    receipt: Receipt
    start_block: int
    end_block: int
    adapter: str | None
    session_id: str  # inference steps only ("" for forward and backward)
    steps: tuple[ProvenStep, ...]  # forward and backward: exactly one
    outputs: tuple[bytes, ...]  # serialized tensors of the answer

    @property
    def accused(self) -> str:
        return self.certificate.peer_id

    @property
    def kind(self) -> str:
        return self.receipt.kind

    def check_signed(self, *, dht_prefix: str, num_blocks: int) -> None:
        """InvalidProof unless the accused signed this answer to these inputs, for this model's blocks."""
        if self.certificate.dht_prefix != dht_prefix:
            raise InvalidProof(f"the proof is about model {self.certificate.dht_prefix!r}, not {dht_prefix!r}")
        if not 0 <= self.start_block < self.end_block <= num_blocks:
            raise InvalidProof(f"blocks {self.start_block}:{self.end_block} are not blocks of this model")
        try:
            self.certificate.check()
            self.receipt.check(self.certificate)
        except ForgedAnswer as e:
            raise InvalidProof(str(e)) from None
        if self.kind == "step":
            chain = SessionChain(self.session_id, self.start_block, self.end_block, self.adapter)
            for step in self.steps:
                inputs = chain.add(step.position, step.flags, step.parsed())
            if self.receipt.step != len(self.steps):
                raise InvalidProof(f"the receipt is for step {self.receipt.step}, the proof holds {len(self.steps)}")
        else:
            if len(self.steps) != 1 or self.steps[0].position != 0:
                raise InvalidProof(f"a {self.kind} proof holds exactly one call")
            fields = span_fields(self.start_block, self.end_block, self.adapter, self.steps[0].flags)
            inputs = call_digest(self.kind, fields, self.steps[0].parsed())
        if inputs != self.receipt.inputs:
            raise InvalidProof("the proof's inputs are not the ones the server signed")
        if outputs_digest(self.parsed_outputs()) != self.receipt.outputs:
            raise InvalidProof("the proof's answer is not the one the server signed")

    def parsed_outputs(self) -> list[runtime_pb2.Tensor]:
        return ProvenStep(0, (False, False, False), self.outputs).parsed()

    # ---- bytes ------------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return self._packed

    @cached_property
    def _packed(self) -> bytes:  # a proof is packed for its size, its record and its digest: once
        steps = [[step.position, list(step.flags), list(step.tensors)] for step in self.steps]
        return msgpack.packb(
            [1, self.certificate.to_list(), self.receipt.to_list(), self.start_block, self.end_block,
             self.adapter or "", self.session_id, steps, list(self.outputs)]
        )  # fmt: skip

    @classmethod
    def from_bytes(cls, data: bytes) -> LieProof:
        """InvalidProof for anything that is not a well-formed proof within the size limits."""
        if len(data) > MAX_PROOF_BYTES:
            raise InvalidProof(f"the proof has {len(data)} bytes, over the limit of {MAX_PROOF_BYTES}")
        try:
            fields = msgpack.unpackb(data, strict_map_key=True)
            version, certificate, receipt, start, end, adapter, session_id, steps, outputs = fields
            if version != 1:
                raise ValueError(f"unknown proof format {version!r}")
            if not (type(start) is int and type(end) is int and isinstance(adapter, str)):
                raise ValueError("blocks are integers and the adapter a string")
            if not isinstance(session_id, str) or not isinstance(steps, list) or not isinstance(outputs, list):
                raise ValueError("malformed session id, steps or outputs")
            if not 1 <= len(steps) <= MAX_PROOF_STEPS:
                raise ValueError(f"a proof holds 1 to {MAX_PROOF_STEPS} steps, got {len(steps)}")
            return cls(
                certificate=Certificate.from_list(certificate),
                receipt=Receipt.from_list(receipt),
                start_block=start,
                end_block=end,
                adapter=adapter or None,
                session_id=session_id,
                steps=tuple(_step(step) for step in steps),
                outputs=_raw_tensors(outputs),
            )
        except (ValueError, TypeError, ForgedAnswer, msgpack.ExtraData) as e:
            raise InvalidProof(f"malformed proof: {e}") from None

    @property
    def digest(self) -> str:
        """Names this proof (the same accused, receipt and inputs give the same name, whoever reports it)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()[:16]


def _step(fields: object) -> ProvenStep:
    if not isinstance(fields, list) or len(fields) != 3:
        raise ValueError("a step is [position, flags, tensors]")
    position, flags, tensors = fields
    if type(position) is not int or position < 0:
        raise ValueError("a step's position is an integer >= 0")
    if not isinstance(flags, list) or len(flags) != 3 or not all(isinstance(flag, bool) for flag in flags):
        raise ValueError("a step's flags are three booleans")
    return ProvenStep(position, tuple(flags), _raw_tensors(tensors))


def _raw_tensors(tensors: object) -> tuple[bytes, ...]:
    if not isinstance(tensors, list) or not 1 <= len(tensors) <= 8 or not all(isinstance(t, bytes) for t in tensors):
        raise ValueError("tensors are a list of 1 to 8 serialized tensors")
    return tuple(tensors)


def lie_proofs_key(dht_prefix: str, peer_id: str) -> str:
    """Where proofs against server ``peer_id`` of a model are stored (one subkey per reporter)."""
    return f"{dht_prefix}.lies.{peer_id}"


class LieProofRecord(SignedRecord):
    """A reporter's proof against one server (``LieProof.to_bytes``, base64), signed as the reporter's record."""

    kind: Literal["lie_proof"] = "lie_proof"
    accused: str = Field(min_length=1, max_length=128)
    proof: str = Field(max_length=4 * MAX_PROOF_BYTES // 3 + 4)

    @classmethod
    def of(cls, proof: LieProof) -> LieProofRecord:
        return cls(accused=proof.accused, proof=base64.b64encode(proof.to_bytes()).decode())

    def parsed(self) -> LieProof:
        """The proof (InvalidProof if malformed, or about another server than the record says)."""
        try:
            data = base64.b64decode(self.proof, validate=True)
        except ValueError as e:
            raise InvalidProof(f"the proof is not base64: {e}") from None
        proof = LieProof.from_bytes(data)
        if proof.accused != self.accused:
            raise InvalidProof(f"the record accuses {self.accused}, its proof {proof.accused}")
        return proof
