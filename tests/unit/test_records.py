"""Signed typed DHT records, parsed from the raw shapes hivemind returns (no DHT, no processes).

A key with subkeys comes back from ``DHTNode.get_many`` as ``{subkey: ValueWithExpiration(record, expiration)}``;
the reader must keep only well-formed records of the expected kind under subkeys that are exactly one owner marker,
and attribute each to the peer id derived from that marker.
"""

from __future__ import annotations

import logging

import pytest
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration
from hivemind.utils.crypto import RSAPrivateKey

from corolla.net.dht_records import block_key, group_models, only_stage
from corolla.net.identity import owner_marker, peer_id_from_owner_marker
from corolla.net.records import owner_of_subkey, parse_records, store_record
from corolla.protocol.records import (
    MODEL_REGISTRY_KEY,
    ModelRegistryEntry,
    PeerState,
    StagePeerInfo,
    stage_key,
)
from corolla.protocol.server_info import ServerInfo, ServerState


@pytest.fixture(scope="module")
def keys() -> list[RSAPrivateKey]:
    return [RSAPrivateKey() for _ in range(3)]


def _peer(key: RSAPrivateKey) -> PeerID:
    return peer_id_from_owner_marker(owner_marker(key))


def _raw(entries: dict) -> dict:
    return {subkey: ValueWithExpiration(value, 1e9) for subkey, value in entries.items()}


def _stage(**overrides) -> StagePeerInfo:
    fields = dict(experiment="exp", stage=1, state=PeerState.ONLINE, throughput_sps=12.5, queue_length=3)
    return StagePeerInfo(**(fields | overrides))


def _model(**overrides) -> ModelRegistryEntry:
    fields = dict(model_name="org/tiny-llama", dht_prefix="tiny-llama-hf", num_blocks=6, model_type="llama")
    return ModelRegistryEntry(**(fields | overrides))


def test_key_naming_per_role():
    assert block_key("tiny-llama-hf", 3) == "tiny-llama-hf.3"
    assert stage_key("exp", 2) == "exp.stage.2" == _stage(stage=2).key()
    assert MODEL_REGISTRY_KEY == "corolla.models"
    for experiment, stage in [("", 0), ("two words", 0), ("exp", -1)]:
        with pytest.raises(ValueError):
            stage_key(experiment, stage)


@pytest.mark.parametrize("record", [_stage(), _model(), ServerInfo(state=2, start_block=0, end_block=2, throughput=1)])
def test_records_round_trip_and_ignore_unknown_fields(record):
    raw = record.to_record()
    # stage records added ``movable``, then backups; server records ``relayed``
    version = {StagePeerInfo: 3, ServerInfo: 2}.get(type(record), 1)
    assert raw["kind"] == type(record).record_kind() and raw["schema_version"] == version
    future = raw | {"field_from_the_future": {"nested": [1, 2]}, "schema_version": 7}
    parsed = type(record).from_record(future)
    assert parsed.model_copy(update={"schema_version": version}) == record and parsed.schema_version == 7
    with pytest.raises(ValueError):  # frozen
        parsed.kind = "other"


def test_a_stage_record_of_schema_1_reads_as_movable():
    old = {k: v for k, v in _stage().to_record().items() if k != "movable"} | {"schema_version": 1}
    assert StagePeerInfo.from_record(old).movable


def test_a_stage_record_of_schema_2_holds_no_backup():
    new = _stage(backup_of=2, backup_epoch=5).to_record()
    old = {k: v for k, v in new.items() if not k.startswith("backup")} | {"schema_version": 2}
    parsed = StagePeerInfo.from_record(old)
    assert parsed.backup_of is None and parsed.backup_epoch is None
    assert StagePeerInfo.from_record(new).backup_of == 2


def test_server_records_without_a_kind_still_parse():
    """Records written before ``kind`` existed are block-server records."""
    old = {"state": 2, "start_block": 0, "end_block": 2, "throughput": 1.0, "version": "0.1", "protocol_version": 2}
    assert ServerInfo.from_record(old).kind == "block_server"


@pytest.mark.parametrize(
    ("schema", "record"),
    [
        (StagePeerInfo, _stage().to_record() | {"throughput_sps": -1.0}),
        (StagePeerInfo, _stage().to_record() | {"state": 7}),
        (StagePeerInfo, _stage().to_record() | {"stage": "first"}),
        (StagePeerInfo, _stage().to_record() | {"backup_of": -1}),
        (StagePeerInfo, {k: v for k, v in _stage().to_record().items() if k != "experiment"}),
        (StagePeerInfo, _model().to_record()),  # another kind is never reinterpreted
        (ModelRegistryEntry, _model().to_record() | {"num_blocks": 0}),
        (ModelRegistryEntry, _model().to_record() | {"model_name": ["a"]}),
        (ModelRegistryEntry, _stage().to_record()),
        (ServerInfo, {"state": 2, "start_block": 4, "end_block": 4, "throughput": 1.0}),  # empty span
        (ServerInfo, _stage().to_record() | {"start_block": 0, "end_block": 1, "throughput": 1.0}),
        (ServerInfo, [2, 0, 1, 1.0]),
        (ServerInfo, None),
    ],
)
def test_malformed_records_are_refused(schema, record):
    with pytest.raises(ValueError):
        schema.from_record(record)


def test_owner_of_subkey_accepts_exactly_one_marker(keys):
    marker = owner_marker(keys[0])
    assert owner_of_subkey(marker) == _peer(keys[0])
    for bad in [marker.decode(), b"x" + marker, marker + b"y", marker + owner_marker(keys[1]), b"[owner:junk]", 7]:
        with pytest.raises(ValueError):
            owner_of_subkey(bad)


def test_parse_keeps_only_attributable_well_formed_records(keys, caplog):
    good, other = owner_marker(keys[0]), owner_marker(keys[1])
    raw = _raw(
        {
            good: _stage().to_record(),
            other: _stage().to_record() | {"queue_length": -5},  # malformed
            owner_marker(keys[2]) + b"suffix": _stage().to_record(),  # not exactly an owner marker
            b"plain subkey": _stage().to_record(),  # not owned at all
            good.decode(): _stage(queue_length=99).to_record(),  # a str subkey: not how owners write
            b"[owner:not a key]": _stage().to_record(),
        }
    )
    with caplog.at_level(logging.DEBUG, logger="corolla.net.records"):
        parsed = parse_records(raw, StagePeerInfo)
    assert parsed == {_peer(keys[0]): _stage()}
    assert sum("Skipping a malformed stage_peer record" in r.getMessage() for r in caplog.records) == 5


@pytest.mark.parametrize("value", [None, "wiped", 42, [1, 2], {owner_marker(RSAPrivateKey()): "not an entry"}])
def test_parse_of_values_without_records_is_empty(value):
    assert parse_records(value, ModelRegistryEntry) == {}


def test_a_record_of_another_kind_under_a_key_is_skipped(keys):
    raw = _raw({owner_marker(keys[0]): _model().to_record(), owner_marker(keys[1]): _stage().to_record()})
    assert parse_records(raw, StagePeerInfo) == {_peer(keys[1]): _stage()}
    assert parse_records(raw, ModelRegistryEntry) == {_peer(keys[0]): _model()}
    assert parse_records(raw, ServerInfo) == {}


def test_stage_records_about_another_stage_are_skipped(keys):
    a, b, c = (_peer(k) for k in keys)
    peers = {a: _stage(), b: _stage(stage=2), c: _stage(experiment="other")}
    assert only_stage(peers, experiment="exp", stage=1) == {a: _stage()}


def test_registry_groups_entries_by_model(keys):
    a, b, c = (_peer(k) for k in keys)
    other = _model(model_name="org/other", dht_prefix="other-hf", num_blocks=30, repo_id="org/other", revision="v1")
    models = group_models({c: _model(), b: other, a: _model()})
    assert list(models) == ["org/other", "org/tiny-llama"]
    assert models["org/other"] == [(b, other)]
    assert models["org/tiny-llama"] == sorted([(a, _model()), (c, _model())], key=lambda item: item[0].to_base58())
    assert group_models({}) == {}


def test_server_state_is_the_shared_peer_state():
    assert ServerState is PeerState and ServerState.ONLINE == 2 and PeerState(1).name == "JOINING"


@pytest.mark.parametrize(
    ("keys_", "owner", "expiration_s"),
    [([], None, 10.0), (["k"], None, 0.0), (["k"], b"plain subkey", 10.0)],
    ids=["no keys", "no lifetime", "not an owner marker"],
)
def test_store_refuses_bad_arguments_before_touching_the_dht(keys, keys_, owner, expiration_s):
    owner = owner or owner_marker(keys[0])
    with pytest.raises(ValueError):
        store_record(None, keys_, _stage(), owner=owner, expiration_s=expiration_s)  # type: ignore[arg-type]
