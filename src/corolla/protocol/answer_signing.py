"""Signed answers: a block server signs every answer, so an answer it got wrong is provable to anyone.

At start a server makes an Ed25519 *answer key* and certifies it once with its libp2p identity, the RSA key its peer
id is derived from (``Certificate``): signing an answer with RSA would cost about 1.1 ms here, Ed25519 0.05 ms. The
certificate also binds the model (DHT prefix) and the number format the server announces (dtype, quantization),
which set the tolerance anyone checking its answers uses.

Each answer carries a ``Receipt``: the answer key's signature over a digest of the call's inputs and a digest of its
output tensors, exactly as they travelled (``tensor_digest`` hashes a serialized tensor: codec, dtype, shape and
bytes, so client and server hash the same bytes without decoding anything). An inference session's inputs are
*chained*: step k signs ``H(chain of steps 1..k-1, step k)``, so a receipt for step k commits the server to the
whole history that built its attention cache, and a replay of those steps reproduces the state it computed from
(``SessionChain``). A forward or backward call is one link of its own.

``corolla.protocol.lie_proofs`` turns a receipt plus the inputs and outputs it covers into a proof of a lie.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from corolla.net.identity import peer_id_of_rsa_key

DOMAIN = "corolla-answer/1"  # signatures made for answers cannot be replayed as anything else
KINDS = ("forward", "backward", "step")


class ForgedAnswer(ValueError):
    """A certificate or receipt whose signature, key or digest does not check out."""


def tensor_digest(tensor: runtime_pb2.Tensor) -> bytes:
    """SHA-256 of one serialized tensor as it travels: codec, dtype, shape, then its bytes."""
    digest = hashlib.sha256(msgpack.packb([int(tensor.compression), tensor.dtype, list(tensor.size)]))
    digest.update(tensor.buffer)
    return digest.digest()


def call_digest(kind: str, fields: Sequence, tensors: Sequence[runtime_pb2.Tensor]) -> bytes:
    """Digest of one call's inputs (or of one step of a session): what was asked (``fields``) and its tensors."""
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}: expected one of {', '.join(KINDS)}")
    packed = msgpack.packb([DOMAIN, kind, list(fields), [tensor_digest(t) for t in tensors]])
    return hashlib.sha256(packed).digest()


def outputs_digest(tensors: Sequence[runtime_pb2.Tensor]) -> bytes:
    """Digest of an answer's tensors."""
    return hashlib.sha256(msgpack.packb([DOMAIN, "outputs", [tensor_digest(t) for t in tensors]])).digest()


def span_fields(start_block: int, end_block: int, adapter: str | None, flags: Sequence[bool]) -> list:
    """What a forward or backward call asks besides its tensors (the blocks, the adapter, which optional tensors)."""
    return [start_block, end_block, adapter or "", *map(bool, flags)]


def step_fields(position: int, flags: Sequence[bool]) -> list:
    """What one inference step asks besides its tensors: where it starts (a rewind goes back) and which tensors."""
    return [position, *map(bool, flags)]


class SessionChain:
    """The running digest of an inference session's steps (the same code on the server and in a proof's check)."""

    def __init__(self, session_id: str, start_block: int, end_block: int, adapter: str | None):
        packed = msgpack.packb([DOMAIN, "session", session_id, start_block, end_block, adapter or ""])
        self.head = hashlib.sha256(packed).digest()
        self.steps = 0

    def add(self, position: int, flags: Sequence[bool], tensors: Sequence[runtime_pb2.Tensor]) -> bytes:
        """Chain one computed step; returns the new head (what the step's receipt signs)."""
        link = call_digest("step", step_fields(position, flags), tensors)
        self.head = hashlib.sha256(self.head + link).digest()
        self.steps += 1
        return self.head


def peer_id_of(identity_key: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in hivemind's byte format (``RSAPublicKey.to_bytes``)."""
    return peer_id_of_rsa_key(RSAPublicKey.from_bytes(identity_key)).to_base58()


@dataclass(frozen=True)
class Certificate:
    """A server's answer key, signed by its identity: who answers, for which model, in which number format."""

    peer_id: str
    identity_key: bytes  # RSA public key (hivemind's byte format); hashes to ``peer_id``
    answer_key: bytes  # raw Ed25519 public key (32 bytes)
    dht_prefix: str
    dtype: str
    quant: str
    issued_at: float
    signature: bytes  # RSA (identity) over ``signed_bytes()``

    def signed_bytes(self) -> bytes:
        return msgpack.packb(
            [DOMAIN, "certificate", self.peer_id, self.answer_key, self.dht_prefix, self.dtype, self.quant,
             self.issued_at]
        )  # fmt: skip

    def check(self) -> None:
        """ForgedAnswer unless the identity key is ``peer_id``'s and signed this certificate."""
        if len(self.answer_key) != 32:
            raise ForgedAnswer("an answer key is 32 bytes (Ed25519)")
        if not math.isfinite(self.issued_at):
            raise ForgedAnswer("the certificate's issue time is not a number")
        try:
            key = RSAPublicKey.from_bytes(self.identity_key)
            owner = peer_id_of(self.identity_key)
        except Exception as e:
            raise ForgedAnswer(f"the certificate's identity key cannot be read: {e}") from None
        if owner != self.peer_id:
            raise ForgedAnswer(f"the certificate's identity key belongs to {owner}, not to {self.peer_id}")
        if not key.verify(self.signed_bytes(), self.signature):
            raise ForgedAnswer(f"the certificate is not signed by {self.peer_id}'s identity")

    def to_list(self) -> list:
        return [self.peer_id, self.identity_key, self.answer_key, self.dht_prefix, self.dtype, self.quant,
                self.issued_at, self.signature]  # fmt: skip

    @classmethod
    def from_list(cls, fields: object) -> Certificate:
        """ForgedAnswer for anything that is not a well-typed certificate (its signature is checked by ``check``)."""
        types = (str, bytes, bytes, str, str, str, (int, float), bytes)
        if not isinstance(fields, list | tuple) or len(fields) != len(types):
            raise ForgedAnswer("a certificate is [peer_id, identity_key, answer_key, dht_prefix, dtype, quant, "
                               "issued_at, signature]")  # fmt: skip
        if not all(isinstance(value, kind) and not isinstance(value, bool) for value, kind in zip(fields, types)):
            raise ForgedAnswer("a certificate field has the wrong type")
        return cls(*fields[:6], float(fields[6]), fields[7])


@dataclass(frozen=True)
class Receipt:
    """A server's signature over one answer: ``inputs`` (a call's digest, or a session's chain head after step
    ``step``) and ``outputs`` (the digest of the answer's tensors)."""

    kind: str
    step: int  # steps: how many steps the session had computed with this one; 0 for forward and backward
    inputs: bytes
    outputs: bytes
    signature: bytes  # Ed25519 (the certificate's answer key) over ``signed_bytes()``

    def signed_bytes(self) -> bytes:
        return msgpack.packb([DOMAIN, "receipt", self.kind, self.step, self.inputs, self.outputs])

    def check(self, certificate: Certificate) -> None:
        """ForgedAnswer unless the certificate's answer key signed this receipt."""
        try:
            Ed25519PublicKey.from_public_bytes(certificate.answer_key).verify(self.signature, self.signed_bytes())
        except (InvalidSignature, ValueError):
            raise ForgedAnswer(f"the answer is not signed by {certificate.peer_id}'s answer key") from None

    def to_list(self) -> list:
        return [self.kind, self.step, self.inputs, self.outputs, self.signature]

    @classmethod
    def from_list(cls, fields: object) -> Receipt:
        if not isinstance(fields, list | tuple) or len(fields) != 5:
            raise ForgedAnswer("a receipt is [kind, step, inputs, outputs, signature]")
        kind, step, inputs, outputs, signature = fields
        if kind not in KINDS or type(step) is not int or step < 0:
            raise ForgedAnswer("a receipt's kind or step is malformed")
        if not (isinstance(inputs, bytes) and isinstance(outputs, bytes) and isinstance(signature, bytes)):
            raise ForgedAnswer("a receipt's digests and signature are bytes")
        if len(inputs) != 32 or len(outputs) != 32:
            raise ForgedAnswer("a receipt's digests are 32 bytes")
        return cls(kind, step, inputs, outputs, signature)


class AnswerSigner:
    """The server's side: a fresh answer key, certified by ``identity``, that signs every answer."""

    def __init__(
        self, identity: RSAPrivateKey, *, dht_prefix: str, dtype: str, quant: str,
        clock: Callable[[], float] = time.time,
    ):  # fmt: skip
        self._key = Ed25519PrivateKey.generate()
        identity_key = identity.get_public_key().to_bytes()
        unsigned = Certificate(
            peer_id=peer_id_of(identity_key), identity_key=identity_key,
            answer_key=self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw), dht_prefix=dht_prefix,
            dtype=dtype, quant=quant, issued_at=float(clock()), signature=b"",
        )  # fmt: skip
        self.certificate = Certificate(**{**unsigned.__dict__, "signature": identity.sign(unsigned.signed_bytes())})
        self.certificate_list = self.certificate.to_list()

    def sign(self, kind: str, inputs: bytes, outputs: Sequence[runtime_pb2.Tensor], *, step: int = 0) -> Receipt:
        unsigned = Receipt(kind, step, inputs, outputs_digest(outputs), b"")
        return Receipt(kind, step, inputs, unsigned.outputs, self._key.sign(unsigned.signed_bytes()))
