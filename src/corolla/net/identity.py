"""One RSA key per peer, used both as its libp2p identity (peer id) and to sign its DHT records.

Because a server's peer id is derived from the same public key that signs its records, a client can check that a
record about peer X was written by X: the peer id is computed from the record's owner key, never read from the
record's value.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.serializer import MSGPackSerializer


def load_or_create_identity(path: str | os.PathLike | None) -> tuple[Path, RSAPrivateKey]:
    """Load the RSA identity at ``path`` (creating it if missing); with None, a fresh one in a private temp file."""
    if path is None:
        fd, name = tempfile.mkstemp(prefix="corolla-identity-", suffix=".key")
        os.close(fd)
        os.unlink(name)
        path = name
    path = Path(path).expanduser()
    if not path.exists():
        key = RSAPrivateKey()
        path.parent.mkdir(parents=True, exist_ok=True)
        protobuf = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes())
        path.write_bytes(protobuf.SerializeToString())
        path.chmod(0o400)
    data = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    if data.key_type != crypto_pb2.KeyType.RSA:
        raise ValueError(f"{path}: corolla identities must be RSA keys (found key type {data.key_type})")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = serialization.load_der_private_key(data.data, password=None)
    return path, key


def owner_marker(key: RSAPrivateKey) -> bytes:
    """The ``[owner:...]`` marker that makes a DHT subkey writable only by ``key``'s holder."""
    return RSASignatureValidator(key).local_public_key


def peer_id_from_owner_marker(marker: bytes) -> PeerID:
    """The libp2p peer id of the key in an ``[owner:ssh-rsa ...]`` marker; ValueError if there is none."""
    found = RSASignatureValidator._PUBLIC_KEY_RE.findall(marker)
    if len(found) != 1:
        raise ValueError("expected exactly one owner key in the subkey")
    return peer_id_of_rsa_key(RSAPublicKey.from_bytes(found[0]))


def peer_id_of_rsa_key(key: RSAPublicKey) -> PeerID:
    """The libp2p peer id of an RSA public key (the sha2-256 multihash of its protobuf encoding)."""
    der = key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest)


class OwnedSubkeysOnly(RecordValidatorBase):
    """Refuse every DHT record that is neither an owner-signed subkey nor one of hivemind averaging's subkeys.

    RSASignatureValidator only protects records that carry an ``[owner:...]`` marker; without this validator any
    peer could store a plain value (or an unmarked subkey) under a block key and, with a later expiration, hide
    every server of that block. corolla's own records are all owner-signed subkeys. hivemind's averaging (SWARM
    stages average gradients with it) keys its matchmaking and state-download records by the averager's peer id,
    unsigned, as every hivemind swarm does: a subkey that is exactly a libp2p peer id is accepted too. Such a
    subkey cannot replace a signed one (subkeys are independent entries) and corolla's record readers skip it.
    """

    def validate(self, record: DHTRecord) -> bool:
        return RSASignatureValidator._PUBLIC_KEY_RE.search(record.subkey) is not None or _is_peer_id(record.subkey)


def _is_peer_id(serialized_subkey: bytes) -> bool:
    """A (msgpack-serialized, as validators see it) libp2p peer id: the sha2-256 multihash of an RSA key (0x12, 32,
    then 32 bytes) or an Ed25519 key inlined as an identity multihash (0x00, 36, then 36 bytes)."""
    try:
        subkey = MSGPackSerializer.loads(serialized_subkey)
    except Exception:
        return False
    if not isinstance(subkey, bytes):
        return False
    return (len(subkey) == 34 and subkey[:2] == b"\x12\x20") or (len(subkey) == 38 and subkey[:2] == b"\x00\x24")


def swarm_validators(key: RSAPrivateKey) -> list[RecordValidatorBase]:
    """The record validators every corolla DHT node (server, client, bootstrap) runs."""
    return [RSASignatureValidator(key), OwnedSubkeysOnly()]
