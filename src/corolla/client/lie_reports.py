"""Proofs of lies shared through the DHT: publish the ones this client makes, check the ones others made.

A client that catches a server lying publishes a ``LieProof`` under ``lie_proofs_key(model, liar)`` in its own
owner subkey (``corolla.protocol.lie_proofs``). Every client that refreshes its view of the swarm reads the proofs
about the servers it sees; each proof it has not seen is checked once (``ProofChecker``: signatures, then one span
computation with the model's weights). A proven liar is distrusted for good, as if this client had caught it
itself; a refuted proof (forged, or an answer clearly right) is logged, and its reporter's other proofs are
ignored from then on; a proof the checker cannot judge (``Verdict.checked`` false) or a borderline one counts for
neither side.

Forging a proof is impossible without the accused's keys, and a forged one costs no computation (its signatures
fail first). A "proof" made of an honest server's genuine signed answer costs one span computation to refute, and
reporters are cheap to create, so each read checks at most ``MAX_CHECKS_PER_READ`` new proofs: a flood of false
proofs delays the checks of real ones. Checks run in the thread that refreshes the view (at connect, then
periodically and when routing finds blocks missing), each bounded by the checker's limits on span memory and tokens,
and the loaded span is freed after each read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hivemind.dht import DHT

from corolla.client.proof_check import ProofChecker
from corolla.log import get_logger
from corolla.net.records import fetch_records, store_record
from corolla.protocol.lie_proofs import (
    MAX_PROOF_BYTES,
    PROOF_EXPIRATION_S,
    InvalidProof,
    LieProof,
    LieProofRecord,
    lie_proofs_key,
)

logger = get_logger(__name__)

MAX_CHECKS_PER_READ = 2  # new proofs recomputed per refresh of the swarm view (the rest wait for the next one)


@dataclass
class LieReportStats:
    published: int = 0  # proofs this client stored in the DHT
    proven: int = 0  # proofs by others that held (their servers are distrusted)
    false: int = 0  # proofs by others that did not hold (forged, or the answer was right)


class LieReports:
    """One client's side of the shared proofs of lies, for one model."""

    def __init__(
        self, *, dht: DHT | None, dht_prefix: str, owner: bytes | None, checker: ProofChecker | None,
        distrust: Callable[[str, str], bool], timeout_s: float = 10.0,
    ):  # fmt: skip
        """``owner``: this client's owner marker (None: publish nothing); ``checker``: None to ignore others'
        proofs (it needs the model's weights); ``distrust(peer_id, reason)``: stop using a proven liar."""
        self.dht, self.dht_prefix, self.owner, self.checker = dht, dht_prefix, owner, checker
        self.distrust, self.timeout_s = distrust, timeout_s
        self.stats = LieReportStats()
        self._seen: set[str] = set()  # digests of proofs checked (or published) here
        self._false_reporters: set[str] = set()
        self._storing: set = set()  # MPFutures of the proofs being stored
        self._lock = threading.Lock()

    def publish(self, proof: LieProof) -> None:
        """Store ``proof`` in the DHT (in the background); failures are only logged."""
        if self.dht is None or self.owner is None:
            return
        size = len(proof.to_bytes())
        if size > MAX_PROOF_BYTES:
            logger.warning(
                "Not publishing the proof against %s: %d bytes, over the DHT limit of %d", proof.accused, size,
                MAX_PROOF_BYTES,
            )  # fmt: skip
            return
        with self._lock:
            self._seen.add(proof.digest)
        key = lie_proofs_key(self.dht_prefix, proof.accused)
        stored = store_record(
            self.dht, [key], LieProofRecord.of(proof), owner=self.owner, expiration_s=PROOF_EXPIRATION_S
        )
        self._storing.add(stored)  # hivemind drops the result of an MPFuture nobody holds
        stored.add_done_callback(lambda future: self._published(proof, future))

    def _published(self, proof: LieProof, future) -> None:
        self._storing.discard(future)
        try:
            ok = future.result()
        except Exception as e:
            ok = False
            logger.debug("Storing the proof against %s failed: %s", proof.accused, e)
        if ok:
            self.stats.published += 1
            logger.info("Published a proof that server %s lied (%s of blocks %d:%d)", proof.accused, proof.kind,
                        proof.start_block, proof.end_block)  # fmt: skip
        else:
            logger.warning("Could not publish the proof against server %s", proof.accused)

    def read(self, peer_ids: Iterable[str]) -> None:
        """Check the proofs published about ``peer_ids`` that this client has not checked yet (blocking)."""
        if self.dht is None or self.checker is None:
            return
        keys = {lie_proofs_key(self.dht_prefix, peer): peer for peer in peer_ids}
        if not keys:
            return
        found = fetch_records(self.dht, list(keys), LieProofRecord, timeout_s=self.timeout_s)
        budget = MAX_CHECKS_PER_READ
        try:
            for records in found.values():
                for reporter, record in records.items():
                    if budget <= 0:
                        return
                    try:
                        budget -= self._check(reporter.to_base58(), record)
                    except Exception as e:  # a hostile record fails alone
                        logger.info("Could not check %s's proof: %s: %s", reporter, type(e).__name__, e)
        finally:
            self.checker.release()

    def _check(self, reporter: str, record: LieProofRecord) -> bool:
        """Check one published proof unless seen before; whether it was recomputed now."""
        if reporter in self._false_reporters:
            return False
        try:
            proof = record.parsed()
        except InvalidProof as e:
            self._false(reporter, record.accused, f"malformed: {e}")
            return False
        with self._lock:
            if proof.digest in self._seen:
                return False
            self._seen.add(proof.digest)
        verdict = self.checker.check(proof)
        if verdict.proven:
            self.stats.proven += 1
            self.distrust(proof.accused, f"proof published by {reporter}: {verdict.reason}")
        elif not verdict.refuted:
            logger.info("Not proven: %s's proof against server %s: %s", reporter, proof.accused, verdict.reason)
        else:
            self._false(reporter, proof.accused, verdict.reason)
        return True

    def _false(self, reporter: str, accused: str, reason: str) -> None:
        self.stats.false += 1
        self._false_reporters.add(reporter)
        logger.warning("Ignoring %s's proof against server %s, and its other proofs: %s", reporter, accused, reason)
