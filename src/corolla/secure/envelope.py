"""Signed BTARD protocol messages.

Every message is an ``Envelope``: a ``Header`` (run, sender, kind, step, slot and the SHA-256 of the body), the
sender's Ed25519 signature over the header, and the body (msgpack). The signature covers the body only through its
digest, so a ``SignedDigest`` (header + signature, no body) is itself a transferable proof of what a peer said: two
valid signed digests from one sender for the same (kind, step, slot) with different digests prove that it told
different peers different things (equivocation), without carrying either body.

A peer's Ed25519 key is published in its DHT record (``protocol.records.BtardPeerInfo``), which its libp2p identity
signs; so a message that claims a sender is accepted only with that sender's key (``open_envelope``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["KINDS", "Envelope", "ForgedMessage", "Header", "SignedDigest", "Signer", "open_envelope"]

# a signature made for this protocol cannot be replayed as anything else; the version changes with what peers must
# compute alike (3: check directions from numpy's PCG64, two per partition, shared by partitions of one size;
# commitments are digests of part messages; float32 aggregates; witnessed own parts), so that peers of two versions
# refuse each other's messages instead of accusing each other
DOMAIN = "corolla-btard/3"
KINDS = ("commit", "part", "aggregate", "reveal", "check", "accuse")
MAX_BODY_BYTES = 64 * 2**20
HEAD_BYTES = 2**16  # a message's header and signature fit in its first bytes (the body comes last)


class ForgedMessage(ValueError):
    """A message whose signature or body digest does not check out against its claimed sender's key."""


@dataclass(frozen=True)
class Header:
    run: str
    sender: str
    kind: str
    step: int
    slot: int  # the partition a part or aggregate belongs to; 0 for the other kinds
    digest: bytes  # SHA-256 of the body

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown message kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.step < 0 or self.slot < 0:
            raise ValueError(f"step and slot must be >= 0, got {self.step}, {self.slot}")
        if len(self.digest) != 32:
            raise ValueError(f"a body digest has 32 bytes, got {len(self.digest)}")

    def signed_bytes(self) -> bytes:
        return msgpack.packb([DOMAIN, self.run, self.sender, self.kind, self.step, self.slot, self.digest])

    def to_list(self) -> list:
        return [self.run, self.sender, self.kind, self.step, self.slot, self.digest]

    @classmethod
    def from_list(cls, fields: object) -> Header:
        if not isinstance(fields, list | tuple) or len(fields) != 6:
            raise ValueError("a header is [run, sender, kind, step, slot, digest]")
        run, sender, kind, step, slot, digest = fields
        if not (isinstance(run, str) and isinstance(sender, str) and isinstance(kind, str)):
            raise ValueError("a header's run, sender and kind are strings")
        if not (type(step) is int and type(slot) is int and isinstance(digest, bytes)):
            raise ValueError("a header's step and slot are integers and its digest is bytes")
        return cls(run, sender, kind, step, slot, digest)


@dataclass(frozen=True)
class SignedDigest:
    """What a peer signed about one message, without the message's body."""

    header: Header
    signature: bytes

    def verify(self, public_key: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(self.signature, self.header.signed_bytes())
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_list(self) -> list:
        return [self.header.to_list(), self.signature]

    @classmethod
    def from_list(cls, fields: object) -> SignedDigest:
        if not isinstance(fields, list | tuple) or len(fields) != 2 or not isinstance(fields[1], bytes):
            raise ValueError("a signed digest is [header, signature]")
        return cls(Header.from_list(fields[0]), fields[1])


@dataclass(frozen=True)
class Envelope:
    header: Header
    signature: bytes
    body: bytes

    @property
    def proof(self) -> SignedDigest:
        return SignedDigest(self.header, self.signature)

    def decode(self) -> dict:
        """The body as a dict (ValueError if it is not msgpack of a dict)."""
        try:
            value = msgpack.unpackb(self.body, raw=False, strict_map_key=False)
        except Exception as e:
            raise ValueError(f"a {self.header.kind} body is not msgpack: {e}") from e
        if not isinstance(value, dict):
            raise ValueError(f"a {self.header.kind} body must be a map, got {type(value).__name__}")
        return value

    def to_list(self) -> list:
        return [self.header.to_list(), self.signature, self.body]

    def to_wire(self) -> bytes:
        return msgpack.packb(self.to_list())

    @classmethod
    def from_list(cls, fields: object) -> Envelope:
        if not isinstance(fields, list | tuple) or len(fields) != 3:
            raise ValueError("an envelope is [header, signature, body]")
        header, signature, body = fields
        if not isinstance(signature, bytes) or not isinstance(body, bytes):
            raise ValueError("an envelope's signature and body are bytes")
        if len(body) > MAX_BODY_BYTES:
            raise ValueError(f"a message body may have at most {MAX_BODY_BYTES} bytes, got {len(body)}")
        return cls(Header.from_list(header), signature, body)

    @staticmethod
    def signed_prefix(data: bytes) -> SignedDigest | None:
        """The header and signature at the start of a message's wire bytes, before its body has arrived (None while
        ``data`` is too short to hold them; ValueError if it does not start like an envelope)."""
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data[:HEAD_BYTES])
        try:
            if unpacker.read_array_header() != 3:
                raise ValueError("an envelope is [header, signature, body]")
            fields = [unpacker.unpack(), unpacker.unpack()]
        except msgpack.OutOfData:
            if len(data) >= HEAD_BYTES:
                raise ValueError(f"no header and signature in the first {HEAD_BYTES} bytes") from None
            return None
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"a message is not msgpack: {e}") from None
        return SignedDigest.from_list(fields)

    @classmethod
    def from_wire(cls, data: bytes) -> Envelope:
        try:
            fields = msgpack.unpackb(data, raw=False)
        except Exception as e:
            raise ValueError(f"a message is not msgpack: {e}") from e
        return cls.from_list(fields)


class Signer:
    """A peer's message-signing key (a fresh Ed25519 key unless one is given)."""

    def __init__(self, key: Ed25519PrivateKey | None = None):
        self._key = key or Ed25519PrivateKey.generate()
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def seal(self, *, run: str, sender: str, kind: str, step: int, body: dict, slot: int = 0) -> Envelope:
        data = msgpack.packb(body)
        header = Header(run, sender, kind, step, slot, hashlib.sha256(data).digest())
        return Envelope(header, self._key.sign(header.signed_bytes()), data)


def open_envelope(envelope: Envelope, public_key: bytes) -> dict:
    """The body of ``envelope`` if it was signed with ``public_key`` and its body matches the signed digest;
    ForgedMessage otherwise (ValueError for a body that is not a msgpack map)."""
    if hashlib.sha256(envelope.body).digest() != envelope.header.digest:
        raise ForgedMessage(f"the body of {envelope.header.sender}'s {envelope.header.kind} does not match its digest")
    if not envelope.proof.verify(public_key):
        raise ForgedMessage(
            f"the {envelope.header.kind} of step {envelope.header.step} is not signed by {envelope.header.sender}"
        )
    return envelope.decode()
