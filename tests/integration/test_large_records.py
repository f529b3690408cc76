"""A DHT record larger than the DHT process's pipe takes is stored intact, and the process survives it.

hivemind's DHT process reads requests from its pipe without blocking: a request over the pipe's buffer (a proof of a
lie of a few dozen SmolLM2 tokens is 100 KB) used to fail half-read and kill the process. ``store_record`` hands
such records over through a private file instead (``corolla.net.records.PIPE_SAFE_BYTES``).
"""

from __future__ import annotations

import base64
import glob
import os
import tempfile

import pytest
from hivemind.dht import DHT
from hivemind.utils.crypto import RSAPrivateKey

from corolla.net.dht_process import client_dht
from corolla.net.identity import owner_marker, swarm_validators
from corolla.net.records import PIPE_SAFE_BYTES, fetch_records, store_record
from corolla.protocol.lie_proofs import LieProofRecord

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def dhts():
    boot = DHT(start=True, record_validators=swarm_validators(RSAPrivateKey()))
    peers = [str(addr) for addr in boot.get_visible_maddrs()]
    key = RSAPrivateKey()
    writer, reader = client_dht(peers, key=key), client_dht(peers)
    yield writer, owner_marker(key), reader
    for dht in (writer, reader, boot):
        dht.shutdown()


@pytest.mark.parametrize("size", [1_000, 200_000, 1_000_000])
def test_records_of_any_size_up_to_a_proof_are_stored_and_read_back(dhts, size):
    writer, owner, reader = dhts
    record = LieProofRecord(accused="QmAccused", proof=base64.b64encode(os.urandom(size)).decode())
    assert size < PIPE_SAFE_BYTES or len(record.proof) > PIPE_SAFE_BYTES  # the large ones take the file path
    assert store_record(writer, [f"big.{size}"], record, owner=owner, expiration_s=60).result(timeout=30)
    found = fetch_records(reader, [f"big.{size}"], LieProofRecord, timeout_s=30)[f"big.{size}"]
    assert list(found.values()) == [record]
    assert writer.is_alive() and not glob.glob(os.path.join(tempfile.gettempdir(), "corolla-record-*"))
