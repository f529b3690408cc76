"""Signed typed records in the DHT: store a record under keys in its owner's subkey, fetch and parse them back.

A record lives under a DHT key, in a subkey that is its writer's ``[owner:...]`` marker (``net.identity``). Every
corolla DHT node runs hivemind's RSASignatureValidator (and ``OwnedSubkeysOnly``), so such a subkey can only be
written, and overwritten, by the holder of the marker's key, and a reader's own node checks the signature of
everything it receives. The reader then attributes each record to the peer id derived from the marker, never to
anything the record's value says. What cannot be read or attributed (a value that does not fit the schema, a
subkey that is not exactly one owner marker) is skipped with a DEBUG line, never trusted.

The schemas (``protocol.records``) say what a record holds and under which keys; this module is the mechanism,
the same for every role.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import msgpack
from hivemind.dht import DHT, DHTNode
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils import MPFuture, get_dht_time

from corolla.log import get_logger
from corolla.net.identity import peer_id_from_owner_marker
from corolla.protocol.records import SignedRecord

logger = get_logger(__name__)

RecordT = TypeVar("RecordT", bound=SignedRecord)


def owner_of_subkey(subkey: object) -> PeerID:
    """The peer id of the only key in ``subkey``, which must be exactly one ``[owner:...]`` marker; ValueError if
    it is anything else (other bytes around the marker, two markers, not bytes)."""
    if not isinstance(subkey, bytes):
        raise ValueError(f"an owner subkey must be bytes, got {type(subkey).__name__}")
    if RSASignatureValidator._PUBLIC_KEY_RE.fullmatch(subkey) is None:
        raise ValueError("the subkey is not an owner marker")
    return peer_id_from_owner_marker(subkey)


PIPE_SAFE_BYTES = 32 * 1024
"""The largest record handed to the DHT process through its pipe. hivemind's DHT process reads that pipe with a
non-blocking ``recv``: a message over the pipe's buffer (64 KiB on Linux) fails half-read with EAGAIN, and the
next read finds the pipe garbled and kills the DHT process (measured: 60 KB fails, 30 KB works). Larger records go
through a private file instead (answers come back through another pipe, which has no such limit)."""


async def _store(_dht: DHT, node: DHTNode, keys: list[str], subkey: bytes, value: dict, expiration: float) -> bool:
    results = await node.store_many(keys, [value] * len(keys), expiration, subkeys=[subkey] * len(keys))
    return all(results.values())


async def _store_from_file(
    _dht: DHT, node: DHTNode, keys: list[str], subkey: bytes, path: str, expiration: float
) -> bool:
    """``_store`` of a record the host process wrote to ``path`` (msgpack), which is removed once read."""
    try:
        value = msgpack.unpackb(Path(path).read_bytes())
    finally:
        Path(path).unlink(missing_ok=True)
    return await _store(_dht, node, keys, subkey, value, expiration)


def store_record(
    dht: DHT, keys: Sequence[str], record: SignedRecord, *, owner: bytes, expiration_s: float
) -> MPFuture[bool]:
    """Store ``record`` under every key in ``keys``, in the subkey ``owner`` (this peer's ``owner_marker``), for
    ``expiration_s`` seconds from now.

    Returns an MPFuture (of the DHT process) that resolves to True if every key was stored on at least one DHT
    node; it does not raise for refused stores. ValueError right away for an empty ``keys`` or a non-positive
    ``expiration_s``.
    """
    if not keys:
        raise ValueError("store_record needs at least one key")
    if not expiration_s > 0:
        raise ValueError(f"expiration_s must be > 0, got {expiration_s}")
    owner_of_subkey(owner)  # our own subkey must be readable by others, or the record is lost
    expiration = get_dht_time() + expiration_s
    value = record.to_record()
    packed = msgpack.packb(value)
    if len(packed) <= PIPE_SAFE_BYTES:
        store = partial(_store, keys=list(keys), subkey=owner, value=value, expiration=expiration)
    else:
        fd, path = tempfile.mkstemp(prefix="corolla-record-", suffix=".msgpack")  # readable by this user only
        with os.fdopen(fd, "wb") as file:
            file.write(packed)
        store = partial(_store_from_file, keys=list(keys), subkey=owner, path=path, expiration=expiration)
    return dht.run_coroutine(store, return_future=True)


async def _get(_dht: DHT, node: DHTNode, keys: list[str], latest: bool) -> dict:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)
    return {key: (value.value if value is not None else None) for key, value in found.items()}


def request_raw(dht: DHT, keys: Sequence[str], *, latest: bool = True) -> MPFuture[dict[str, object]]:
    """Look ``keys`` up; the MPFuture resolves to ``{key: value}``, a value being what hivemind returns for a key
    with subkeys (``{subkey: ValueWithExpiration(record, expiration)}``), something else for a key without, or
    None where nothing was found. ``latest`` asks every node near a key (not just the first that has it)."""
    return dht.run_coroutine(partial(_get, keys=list(keys), latest=latest), return_future=True)


def parse_records(value: object, schema: type[RecordT]) -> dict[PeerID, RecordT]:
    """The records of one key, by their writers' peer ids: ``value`` as ``request_raw`` returns it for the key.

    A subkey that is not exactly an owner marker, or a record that does not fit ``schema`` (wrong kind, missing
    or malformed fields), is skipped with a DEBUG line. Anything but a dict of subkeys (a plain value, None) gives
    no records.
    """
    records: dict[PeerID, RecordT] = {}
    if not isinstance(value, Mapping):
        if value is not None:
            logger.debug("Skipping a %s value without subkeys (%s)", schema.record_kind(), type(value).__name__)
        return records
    for subkey, entry in value.items():
        try:
            peer_id = owner_of_subkey(subkey)
            records[peer_id] = schema.from_record(getattr(entry, "value", None))
        except Exception as e:  # a record we cannot read or attribute is ignored, never trusted
            logger.debug("Skipping a malformed %s record: %s", schema.record_kind(), e)
    return records


def fetch_records(
    dht: DHT, keys: Sequence[str], schema: type[RecordT], *, latest: bool = True, timeout_s: float = 10.0
) -> dict[str, dict[PeerID, RecordT]]:
    """For each key, the ``schema`` records under it by writer (see ``parse_records``); blocks up to ``timeout_s``
    (TimeoutError past it). Keys with nothing stored map to ``{}``."""
    raw = request_raw(dht, keys, latest=latest).result(timeout=timeout_s)
    return {key: parse_records(raw.get(key), schema) for key in keys}


async def fetch_records_async(
    dht: DHT, keys: Sequence[str], schema: type[RecordT], *, latest: bool = True, timeout_s: float = 10.0
) -> dict[str, dict[PeerID, RecordT]]:
    """``fetch_records`` for asyncio code: awaits the lookup instead of blocking the event loop."""
    raw = await asyncio.wait_for(asyncio.wrap_future(request_raw(dht, keys, latest=latest)), timeout_s)
    return {key: parse_records(raw.get(key), schema) for key in keys}
