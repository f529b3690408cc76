"""Peer identities: one RSA key gives both the libp2p peer id and the owner marker that signs DHT records."""

from __future__ import annotations

import stat

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey

from corolla.net.identity import load_or_create_identity, owner_marker, peer_id_from_owner_marker


def test_owner_marker_gives_the_peer_id_of_the_identity_file(tmp_path):
    path, key = load_or_create_identity(tmp_path / "server.key")
    assert path == tmp_path / "server.key" and path.is_file()
    from_file = PeerID.from_identity(path.read_bytes())  # what libp2p (p2pd) derives from the identity file
    assert peer_id_from_owner_marker(owner_marker(key)) == from_file


def test_persistent_identity_gives_the_same_peer_id_twice(tmp_path):
    path = tmp_path / "nested" / "dir" / "server.key"
    _, first_key = load_or_create_identity(path)
    data = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, "the private key must not be readable by others"
    _, second_key = load_or_create_identity(path)
    assert path.read_bytes() == data, "loading an existing identity must not rewrite it"
    assert owner_marker(first_key) == owner_marker(second_key)
    assert peer_id_from_owner_marker(owner_marker(second_key)) == peer_id_from_owner_marker(owner_marker(first_key))
    assert peer_id_from_owner_marker(owner_marker(second_key)) == PeerID.from_identity(data)


def test_fresh_identities_differ(tmp_path):
    (first, a), (second, b) = load_or_create_identity(None), load_or_create_identity(None)
    try:
        assert first != second
        assert peer_id_from_owner_marker(owner_marker(a)) != peer_id_from_owner_marker(owner_marker(b))
        assert peer_id_from_owner_marker(owner_marker(a)) == PeerID.from_identity(first.read_bytes())
    finally:
        first.unlink(missing_ok=True)
        second.unlink(missing_ok=True)


def test_owner_marker_is_what_the_signature_validator_protects():
    key = RSAPrivateKey()
    marker = owner_marker(key)
    assert marker == RSASignatureValidator(key).local_public_key
    assert marker.startswith(b"[owner:") and marker.endswith(b"]")


@pytest.mark.parametrize(
    "marker",
    [b"", b"no owner here", owner_marker(RSAPrivateKey()) + owner_marker(RSAPrivateKey())],
    ids=["empty", "no marker", "two keys"],
)
def test_peer_id_from_owner_marker_rejects_bad_markers(marker):
    with pytest.raises(ValueError):
        peer_id_from_owner_marker(marker)


def test_records_with_unreadable_owners_are_skipped():
    """A subkey whose owner is not an RSA key is ignored when reading block records, never trusted."""
    from hivemind.utils import ValueWithExpiration

    from corolla.net.dht_records import _parse_block_value
    from corolla.protocol.server_info import ServerInfo, ServerState

    key = RSAPrivateKey()
    record = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=2, throughput=1.0).to_record()
    value = {
        b"[owner:not a key]": ValueWithExpiration(record, 0.0),
        b"plain subkey": ValueWithExpiration(record, 0.0),
        owner_marker(key): ValueWithExpiration(record, 0.0),
    }
    parsed = _parse_block_value(value)
    assert list(parsed) == [peer_id_from_owner_marker(owner_marker(key))]


def test_non_rsa_identity_is_refused(tmp_path):
    from hivemind.proto import crypto_pb2

    path = tmp_path / "ed25519.key"
    path.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=b"\x00" * 64).SerializeToString())
    with pytest.raises(ValueError, match="must be RSA keys"):
        load_or_create_identity(path)


def test_the_swarm_validator_takes_signed_subkeys_and_hivemind_averaging_subkeys_only():
    """hivemind's averaging (SWARM stages) keys its matchmaking records by the averager's peer id; anything else
    that is not an owner-signed subkey (a plain value, an arbitrary subkey) is still refused."""
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer

    from corolla.net.identity import OwnedSubkeysOnly

    def record(subkey) -> DHTRecord:
        return DHTRecord(b"key", MSGPackSerializer.dumps(subkey), b"value", 1e9)

    validator = OwnedSubkeysOnly()
    rsa_peer = PeerID.from_base58("QmQADFyjLWDW7KqgVe8TJ1uejJviUVLCsjWwf6MCX2AJcc").to_bytes()
    ed25519_peer = PeerID.from_base58("12D3KooWDnAnTS3XhChWHq7eacgpp7aoo7Da1HUbFwxBxa9dhn4Z").to_bytes()
    assert validator.validate(record(owner_marker(RSAPrivateKey())))
    assert validator.validate(record(rsa_peer)) and validator.validate(record(ed25519_peer))
    assert not validator.validate(DHTRecord(b"key", b"", b"value", 1e9))  # a plain value (no subkey)
    for other in (b"anything", rsa_peer[:-1], b"\x12\x20" + b"x" * 33, "text", 7):
        assert not validator.validate(record(other)), other
