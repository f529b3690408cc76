"""What a verifying client keeps of each signed answer, so that a lie it catches becomes a proof for everyone.

With verification on (``ClientConfig.verify`` > 0) every answer's receipt is checked as it arrives: the certificate
must be signed by the server's identity (and be that server's), the receipt by the certificate's answer key, over
the digest of exactly what the client sent (for a session: the chain of every step it sent to that server) and of
exactly the tensors that came back. An answer that fails this is a failed call of its server, like a malformed one,
since without a valid receipt a lie could not be proven. A certificate must also certify the number format the
server announces in the DHT (a liar that certified a coarser one would get a looser tolerance from proof checkers).
The client keeps the serialized requests and answers of each stream until the session ends, up to what one proof
may hold (``MAX_PROOF_BYTES``): past that only the chain is kept, since no proof of a later step could be published;
``proof`` turns one of them into a ``LieProof``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hivemind.proto import runtime_pb2

from corolla.errors import UnsignedAnswerError
from corolla.net.tensors import unpack_metadata
from corolla.protocol.answer_signing import (
    Certificate,
    ForgedAnswer,
    Receipt,
    SessionChain,
    call_digest,
    outputs_digest,
    span_fields,
)
from corolla.protocol.lie_proofs import MAX_PROOF_BYTES, LieProof, ProvenStep

_CHECKED: dict[bytes, Certificate] = {}  # certificates whose RSA signature held, by signature (one per server start)
_MAX_CHECKED = 1024


def _certificate(peer_id: str, fields: object, dht_prefix: str, announced: tuple | None) -> Certificate:
    """The answer's certificate, checked: signed by ``peer_id``, for this model and the format it announced."""
    certificate = Certificate.from_list(fields)
    if announced is not None and None not in announced and (certificate.dtype, certificate.quant) != announced:
        raise ForgedAnswer(f"the certificate says {certificate.dtype}/{certificate.quant}, the server announces "
                           f"{announced[0]}/{announced[1]}")  # fmt: skip
    if _CHECKED.get(certificate.signature) != certificate:  # an RSA check costs ~0.4 ms: once per certificate
        certificate.check()
        if len(_CHECKED) >= _MAX_CHECKED:
            _CHECKED.clear()
        _CHECKED[certificate.signature] = certificate
    if certificate.peer_id != peer_id:
        raise ForgedAnswer(f"the answer carries the certificate of {certificate.peer_id}")
    if certificate.dht_prefix != dht_prefix:
        raise ForgedAnswer(f"the certificate is for model {certificate.dht_prefix!r}, not {dht_prefix!r}")
    return certificate


def _covering(
    fields: object, certificate: Certificate, response, kind: str, inputs: bytes, *, what: str, step: int | None = None
) -> Receipt:
    """The answer's receipt, checked: of this kind (and step), over these inputs and the response's outputs, signed
    by the certificate's answer key (ForgedAnswer saying which part fails)."""
    receipt = Receipt.from_list(fields)
    if receipt.kind != kind or receipt.inputs != inputs or (step is not None and receipt.step != step):
        raise ForgedAnswer(f"the receipt is not for {what}")
    if receipt.outputs != outputs_digest(response.tensors):
        raise ForgedAnswer("the receipt is not for these outputs")
    receipt.check(certificate)
    return receipt


def _raw(tensors) -> tuple[bytes, ...]:
    return tuple(tensor.SerializeToString() for tensor in tensors)


@dataclass(frozen=True)
class SignedCall:
    """A forward or backward call and its server's signed answer."""

    kind: str
    certificate: Certificate
    receipt: Receipt
    request: runtime_pb2.ExpertRequest
    response: runtime_pb2.ExpertResponse
    start_block: int
    end_block: int
    adapter: str | None
    flags: tuple[bool, bool, bool]

    @classmethod
    def checked(
        cls, peer_id: str, kind: str, meta, request, response, *, dht_prefix: str, announced: tuple | None = None
    ) -> SignedCall:
        """The call's evidence; UnsignedAnswerError if the server's signature does not cover this answer.
        ``announced``: the (dtype, quantization) the server announces, which its certificate must state."""
        try:
            signed = unpack_metadata(response)
            certificate = _certificate(peer_id, signed.get("certificate"), dht_prefix, announced)
            flags = (meta.has_attention_mask, meta.has_position_ids, meta.has_prompts)
            fields = span_fields(meta.start_block, meta.end_block, meta.active_adapter, flags)
            inputs = call_digest(kind, fields, request.tensors)
            receipt = _covering(signed.get("receipt"), certificate, response, kind, inputs, what="this call")
        except (ForgedAnswer, ValueError) as e:
            raise UnsignedAnswerError(f"server {peer_id} sent a {kind} answer with no valid signature: {e}") from None
        return cls(kind, certificate, receipt, request, response, meta.start_block, meta.end_block,
                   meta.active_adapter, flags)  # fmt: skip

    def proof(self) -> LieProof:
        return LieProof(
            certificate=self.certificate, receipt=self.receipt, start_block=self.start_block,
            end_block=self.end_block, adapter=self.adapter, session_id="",
            steps=(ProvenStep(0, self.flags, _raw(self.request.tensors)),), outputs=_raw(self.response.tensors),
        )  # fmt: skip


@dataclass
class SessionLog:
    """Every step one inference stream sent, with the server's signed answers (the receipts chain them)."""

    peer_id: str
    session_id: str
    start_block: int
    end_block: int
    adapter: str | None
    dht_prefix: str
    announced: tuple | None = None  # the (dtype, quantization) the server announces
    certificate: Certificate | None = None
    kept_bytes: int = 0  # serialized tensors kept so far
    too_long: bool = False  # over what one proof may hold: tensors are no longer kept
    steps: list[tuple[int, tuple[bool, bool, bool], list]] = field(default_factory=list)  # position, flags, tensors
    answers: list[tuple[Receipt, list]] = field(default_factory=list)  # receipt, output tensors
    chain: SessionChain | None = None

    def __post_init__(self):
        self.chain = SessionChain(self.session_id, self.start_block, self.end_block, self.adapter)

    def record(self, position: int, flags, request: runtime_pb2.ExpertRequest, response, meta: dict) -> None:
        """Check and keep one step's answer (UnsignedAnswerError if its signature does not cover it)."""
        try:
            if self.certificate is None:
                self.certificate = _certificate(self.peer_id, meta.get("certificate"), self.dht_prefix, self.announced)
            head = self.chain.add(position, flags, request.tensors)
            receipt = _covering(meta.get("receipt"), self.certificate, response, "step", head,
                                step=self.chain.steps, what="the steps this client sent")  # fmt: skip
        except (ForgedAnswer, ValueError) as e:
            what = f"server {self.peer_id} sent a step answer with no valid signature"
            raise UnsignedAnswerError(f"{what}: {e}") from None
        self.kept_bytes += sum(t.ByteSize() for t in (*request.tensors, *response.tensors))
        if self.kept_bytes > MAX_PROOF_BYTES:
            self.too_long = True
        if self.too_long:  # keep counting steps (indices stay valid), not their tensors
            self.steps.append((position, tuple(flags), []))
            self.answers.append((receipt, []))
            return
        self.steps.append((position, tuple(flags), list(request.tensors)))
        self.answers.append((receipt, list(response.tensors)))

    def proof(self, index: int) -> LieProof | None:
        """The proof that the answer to step ``index`` (0-based) is what this server signed after these steps;
        None once the session is too long for a proof to be published."""
        if self.too_long:
            return None
        receipt, outputs = self.answers[index]
        sent = self.steps[: index + 1]
        steps = tuple(ProvenStep(position, flags, _raw(tensors)) for position, flags, tensors in sent)
        return LieProof(
            certificate=self.certificate, receipt=receipt, start_block=self.start_block, end_block=self.end_block,
            adapter=self.adapter, session_id=self.session_id, steps=steps, outputs=_raw(outputs),
        )  # fmt: skip
