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
    public_key = RSAPublicKey.from_bytes(found[0])._public_key
    der = public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest)


class OwnedSubkeysOnly(RecordValidatorBase):
    """Refuse every DHT record that is not an owner-signed subkey.

    RSASignatureValidator only protects records that carry an ``[owner:...]`` marker; without this validator any
    peer could store a plain value (or an unmarked subkey) under a block key and, with a later expiration, hide
    every server of that block. corolla stores nothing else in its DHT, so every node refuses such records.
    """

    def validate(self, record: DHTRecord) -> bool:
        return RSASignatureValidator._PUBLIC_KEY_RE.search(record.subkey) is not None


def swarm_validators(key: RSAPrivateKey) -> list[RecordValidatorBase]:
    """The record validators every corolla DHT node (server, client, bootstrap) runs."""
    return [RSASignatureValidator(key), OwnedSubkeysOnly()]
