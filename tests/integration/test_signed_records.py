"""DHT records are signed: no peer can write or overwrite a record under another peer's identity.

A forger joins the swarm's DHT with its own RSA identity and tries to replace a real server's record (same key, the
server's owner subkey) with a more attractive, longer-lived one. Every DHT node must refuse it, and the record
that clients read must stay the real server's. What the forger may write under its own subkey is attributed to
the forger's peer id, never to the victim's. The same holds for the records of the other roles (a SWARM stage
peer, a model registry entry), which round-trip between two real DHT peers.
"""

from __future__ import annotations

import re

import pytest
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from corolla.local_swarm import LocalSwarm, wait_for
from corolla.models.checkpoint import default_dht_prefix
from corolla.net.dht_records import (
    block_key,
    collect_servers,
    declare_model,
    declare_stage_peer,
    fetch_block_records,
    fetch_models,
    fetch_stage_peers,
)
from corolla.net.identity import load_or_create_identity, owner_marker, peer_id_from_owner_marker, swarm_validators
from corolla.protocol.records import MODEL_REGISTRY_KEY, ModelRegistryEntry, PeerState, StagePeerInfo, stage_key
from corolla.protocol.server_info import ServerInfo, ServerState
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NUM_BLOCKS = 6
SPAN = (2, 5)  # the real server hosts blocks 2..4
BLOCK = 3  # the block whose record the forger attacks


@pytest.fixture(scope="module")
def checkpoint():
    return zoo_checkpoint("llama")


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory):
    """A bootstrap peer and one server of blocks SPAN (not all blocks, so LocalSwarm.start's wait does not apply)."""
    logs = tmp_path_factory.mktemp("signed-records-logs")
    # a long update period: the server does not re-announce during the test, so its record must stay byte-identical
    local_swarm = LocalSwarm(
        model=str(checkpoint), server_args=["--throughput", "100", "--update-period", "600"], log_dir=logs
    )
    try:
        local_swarm.start_bootstrap()
        server = local_swarm.start_server("server0", ["--blocks", f"{SPAN[0]}:{SPAN[1]}"])

        def serving() -> bool:
            assert server.poll() is None, f"the server exited with code {server.returncode}"
            return "Serving blocks" in (logs / "server0.log").read_text()  # logged once its ONLINE record is stored

        wait_for(serving, timeout_s=120, what="the server to start", poll_s=0.25)
        yield local_swarm, logs
    finally:
        local_swarm.stop()


@pytest.fixture(scope="module")
def prefix(checkpoint):
    return default_dht_prefix(str(checkpoint))


@pytest.fixture(scope="module")
def server_peer_id(swarm) -> PeerID:
    """The server's libp2p peer id, as the server itself reports it (independent of any DHT record)."""
    _, logs = swarm
    found = re.findall(r"Serving blocks \d+:\d+ of .* as peer (\w+)", (logs / "server0.log").read_text())
    assert len(found) == 1, "the server did not log its peer id"
    return PeerID.from_base58(found[0])


def _dht(initial_peers, key: RSAPrivateKey, *, honest: bool, **kwargs) -> DHT:
    # an honest node validates like every corolla node; the attacker's node accepts anything it is given
    validators = swarm_validators(key) if honest else [RSASignatureValidator(key)]
    return DHT(initial_peers=initial_peers, start=True, record_validators=validators, **kwargs)


@pytest.fixture(scope="module")
def reader(swarm):
    """An honest client's DHT node, used to read the records."""
    local_swarm, _ = swarm
    dht = _dht(local_swarm.initial_peers, RSAPrivateKey(), honest=True, client_mode=True)
    yield dht
    dht.shutdown()


@pytest.fixture(scope="module")
def forger(swarm, tmp_path_factory):
    """The attacker: a full DHT node (it could even be asked to store records) with its own persistent identity."""
    local_swarm, _ = swarm
    identity_path, key = load_or_create_identity(tmp_path_factory.mktemp("forger") / "identity.key")
    dht = _dht(local_swarm.initial_peers, key, honest=False, identity_path=str(identity_path))
    yield dht, key
    dht.shutdown()


def _raw_entries(dht: DHT, key: str) -> dict:
    """Subkey -> ValueWithExpiration of the newest value of ``key`` in the DHT."""
    found = dht.get(key, latest=True)
    assert found is not None and isinstance(found.value, dict), f"no records under {key}"
    return dict(found.value)


def _forged_info(**overrides) -> dict:
    info = ServerInfo(
        state=ServerState.ONLINE,
        start_block=0,
        end_block=NUM_BLOCKS,
        throughput=1e9,  # irresistible to any client's routing
        cache_tokens_left=10**9,
        public_name="forged",
    )
    return info.model_copy(update=overrides).to_record()


def test_forged_record_under_another_peers_identity_is_rejected(swarm, prefix, reader, forger, server_peer_id):
    forger_dht, forger_key = forger
    key = block_key(prefix, BLOCK)
    before = _raw_entries(reader, key)
    assert len(before) == 1
    ((victim_marker, real_entry),) = before.items()
    assert peer_id_from_owner_marker(victim_marker) == server_peer_id
    real_info = ServerInfo.from_record(real_entry.value)
    assert (real_info.start_block, real_info.end_block, real_info.state) == (*SPAN, ServerState.ONLINE)

    later = max(real_entry.expiration_time, get_dht_time()) + 3600  # newer than the real record: it would win
    forged = _forged_info()
    # 1. the record as is: the forger cannot sign for the victim's key, so it goes out unsigned
    assert forger_dht.store(key, forged, later, subkey=victim_marker) is False
    # 2. signed by the forger (its own marker is in the subkey too), but under the victim's marker
    assert forger_dht.store(key, forged, later, subkey=victim_marker + owner_marker(forger_key)) is False
    # 3. a subkey with the victim's marker embedded in other bytes
    assert forger_dht.store(key, forged, later, subkey=b"x" + victim_marker + b"y") is False

    after = _raw_entries(reader, key)
    assert after.get(victim_marker) == real_entry, "the real server's record changed"
    records = fetch_block_records(reader, dht_prefix=prefix, num_blocks=NUM_BLOCKS)
    for block in range(NUM_BLOCKS):
        for peer_id, info in records[block].items():
            assert info.public_name != "forged", f"a forged record is listed for block {block} as {peer_id}"
    assert records[BLOCK][server_peer_id] == real_info
    online = collect_servers(records)
    assert list(online) == [server_peer_id]
    assert (online[server_peer_id].start_block, online[server_peer_id].end_block) == SPAN


def test_a_record_is_attributed_to_its_signer(swarm, prefix, reader, forger, server_peer_id):
    forger_dht, forger_key = forger
    forger_peer_id = peer_id_from_owner_marker(owner_marker(forger_key))
    assert forger_peer_id == forger_dht.peer_id, "the forger's peer id comes from the same key that signs"
    assert forger_peer_id != server_peer_id

    key = block_key(prefix, BLOCK)
    (victim_marker,) = [m for m in _raw_entries(reader, key) if peer_id_from_owner_marker(m) == server_peer_id]
    real_entry = _raw_entries(reader, key)[victim_marker]
    forged = _forged_info(start_block=SPAN[0], end_block=SPAN[1], public_name="impersonator")
    assert forger_dht.store(key, forged, get_dht_time() + 60, subkey=owner_marker(forger_key)) is True

    def listed() -> bool:
        return forger_peer_id in fetch_block_records(reader, dht_prefix=prefix, num_blocks=NUM_BLOCKS)[BLOCK]

    wait_for(listed, timeout_s=20, what="the forger's own record")
    records = fetch_block_records(reader, dht_prefix=prefix, num_blocks=NUM_BLOCKS)[BLOCK]
    assert set(records) == {server_peer_id, forger_peer_id}
    assert records[forger_peer_id].public_name == "impersonator"  # the claim is there, but under the forger's id
    assert records[server_peer_id] == ServerInfo.from_record(real_entry.value)
    entries = _raw_entries(reader, key)
    assert set(entries) == {victim_marker, owner_marker(forger_key)}
    assert entries[victim_marker] == real_entry, "the real server's record changed"


def test_plain_value_cannot_wipe_the_signed_records(prefix, reader, forger, server_peer_id):
    forger_dht, _ = forger
    key = block_key(prefix, BLOCK)
    accepted = forger_dht.store(key, "wiped", get_dht_time() + 3600)
    records = fetch_block_records(reader, dht_prefix=prefix, num_blocks=NUM_BLOCKS)[BLOCK]
    assert not accepted and server_peer_id in records, "a plain value replaced the block's signed server records"


EXPERIMENT = "signed-records-exp"
STAGE_PEER = StagePeerInfo(experiment=EXPERIMENT, stage=1, state=PeerState.ONLINE, throughput_sps=42.5, queue_length=2)
MODEL = ModelRegistryEntry(
    model_name="corolla-tests/signed-model", dht_prefix="signed-model-hf", num_blocks=NUM_BLOCKS, model_type="llama"
)


@pytest.fixture(scope="module")
def announced(swarm, tmp_path_factory):
    """An honest peer of the new roles (its own identity and DHT node) that announced STAGE_PEER and MODEL."""
    local_swarm, _ = swarm
    identity_path, key = load_or_create_identity(tmp_path_factory.mktemp("stage-peer") / "identity.key")
    dht = _dht(local_swarm.initial_peers, key, honest=True, identity_path=str(identity_path))
    try:
        assert declare_stage_peer(dht, STAGE_PEER, owner=owner_marker(key), expiration_s=600).result(timeout=30)
        assert declare_model(dht, MODEL, owner=owner_marker(key), expiration_s=600).result(timeout=30)
        yield dht, key
    finally:
        dht.shutdown()


def _read_stage(reader: DHT) -> dict[PeerID, StagePeerInfo]:
    return fetch_stage_peers(reader, experiment=EXPERIMENT, num_stages=2)[1]


def test_stage_peer_and_registry_records_round_trip(reader, announced):
    dht, key = announced
    assert peer_id_from_owner_marker(owner_marker(key)) == dht.peer_id
    wait_for(lambda: _read_stage(reader) == {dht.peer_id: STAGE_PEER}, timeout_s=20, what="the stage-peer record")
    assert fetch_stage_peers(reader, experiment=EXPERIMENT, num_stages=2)[0] == {}
    wait_for(lambda: MODEL.model_name in fetch_models(reader), timeout_s=20, what="the registry entry")
    assert fetch_models(reader)[MODEL.model_name] == [(dht.peer_id, MODEL)]


@pytest.mark.parametrize("kind", ["stage peer", "registry entry"])
def test_a_peer_cannot_overwrite_another_peers_record_of_the_new_kinds(reader, forger, announced, kind):
    forger_dht, forger_key = forger
    victim_dht, victim_key = announced
    victim_marker = owner_marker(victim_key)
    if kind == "stage peer":
        key, real = stage_key(EXPERIMENT, 1), STAGE_PEER
        forged = real.model_copy(update={"throughput_sps": 1e9, "queue_length": 0})  # would draw every micro-batch

        def read() -> dict:
            return _read_stage(reader)
    else:
        key, real = MODEL_REGISTRY_KEY, MODEL
        forged = real.model_copy(update={"dht_prefix": "hijacked", "num_blocks": 1})  # would send clients elsewhere

        def read() -> dict:
            return dict(fetch_models(reader).get(MODEL.model_name, []))

    wait_for(lambda: victim_dht.peer_id in read(), timeout_s=20, what=f"the real {kind} record")
    real_entry = _raw_entries(reader, key)[victim_marker]
    later = max(real_entry.expiration_time, get_dht_time()) + 3600
    for subkey in (victim_marker, victim_marker + owner_marker(forger_key), b"x" + victim_marker + b"y"):
        assert forger_dht.store(key, forged.to_record(), later, subkey=subkey) is False
    assert _raw_entries(reader, key)[victim_marker] == real_entry, f"the real {kind} record changed"
    assert read()[victim_dht.peer_id] == real
    assert forger_dht.peer_id not in read()
