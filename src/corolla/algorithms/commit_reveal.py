"""Multi-party randomness by commit–reveal (the MPRNG of BTARD-SGD): a seed that no coalition can choose.

A round (``round_id``: e.g. the training step and the attempt number; a str stands for its UTF-8 bytes) runs in two
phases:

1. **Commit.** Each participant draws a secret ``value`` of ``VALUE_SIZE_BYTES`` random bytes and broadcasts
   ``commitment = sha256(len‖COMMIT_DOMAIN ‖ len‖round_id ‖ len‖participant ‖ len‖value)``, every field prefixed by
   its length (8 bytes, big-endian), so that no two different field tuples hash the same bytes. Then a barrier: nobody
   reveals before every commitment is in.
2. **Reveal.** Each participant broadcasts ``value``; everyone checks it against the commitment (``verify_reveal``).

The seed (``combine``) is ``sha256`` over ``SEED_DOMAIN``, the round and the pairs ``(participant, value)`` of the
participants in order of their UTF-8 bytes, all length-prefixed. Why it is uniform when one participant ``h`` is
honest, i.e. draws its value uniformly and keeps it secret until every commitment is in (sha256 modelled as a random
oracle):

* hiding: ``h``'s commitment is a hash of 256 unknown random bits, so it tells the others nothing about ``h``'s value
  (they would have to guess it); whatever they commit to, even as a function of ``h``'s commitment, is independent of
  ``h``'s value;
* binding: after ``h`` reveals, a participant cannot open its commitment to another value (a second preimage), and a
  copied commitment does not open under another name, since the participant id is hashed in;
* so the seed is the hash of an input that is injective in ``h``'s uniform value, the other parts being fixed
  independently of it: a fresh random-oracle output, uniform over 256 bits.

XOR of the values (then hashed) would be uniform by the same argument (a one-time pad on ``h``'s value); the hash of
the list was chosen because it also binds the seed to the round and to the exact set of contributors, so a seed over
a subset (``seed_without``) is unrelated to the full one and a seed cannot be replayed in another round.

**Missing reveals.** The last revealer sees everyone else's value first, so it knows the seed before it reveals. If a
missing reveal were silently left out, it could choose between two seeds (reveal or withhold): a bias. So ``combine``
gives no seed while anyone failed (``CombineResult.seed`` is None; ``cheaters``: a reveal that does not open the
commitment; ``missing``: no reveal). The standard mitigation, which BTARD prescribes: the peers that failed are
eliminated (banned for a wrong reveal) and the round is run again **with fresh values and a new round_id** among the
rest. Withholding then buys at most one re-draw per withholding participant (the outcome it saw, or a fresh one it
cannot predict) and costs it its place; ``k`` colluders can force at most ``k`` re-draws and lose ``k`` peers.
``CombineResult.seed_without(failed)`` computes the seed over the remaining reveals of the same round for a caller
that cannot afford a re-run; it is weaker: every withholder knows both seeds before it decides, so ``k`` colluders
choose among up to ``2**k`` known seeds.

A reveal from someone who did not commit is not counted (it could have been chosen after seeing the others) and is
reported (``uncommitted``); it does not block the seed.

Honest values must come from a cryptographic source (``secrets.token_bytes``): a seeded ``random.Random`` or numpy
generator, fine for tests and simulations, can be reconstructed from the values it revealed in earlier rounds.

Pure: no I/O, no clock; randomness is passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COMMIT_DOMAIN",
    "SEED_DOMAIN",
    "VALUE_SIZE_BYTES",
    "CombineResult",
    "combine",
    "draw_value",
    "make_commitment",
    "seed_to_generator",
    "seed_to_int",
    "verify_reveal",
]

VALUE_SIZE_BYTES = 32
COMMIT_DOMAIN = b"corolla/btard/mprng/commit/v1"
SEED_DOMAIN = b"corolla/btard/mprng/seed/v1"
_DIGEST_SIZE_BYTES = 32  # sha256


def _as_bytes(field: bytes | str) -> bytes:
    return field.encode("utf-8") if isinstance(field, str) else bytes(field)


def _hash_fields(*fields: bytes) -> bytes:
    digest = hashlib.sha256()
    for field in fields:
        digest.update(len(field).to_bytes(8, "big"))
        digest.update(field)
    return digest.digest()


def draw_value(rng: random.Random | np.random.Generator | Callable[[int], bytes]) -> bytes:
    """A participant's secret: ``VALUE_SIZE_BYTES`` bytes from ``rng`` (a seeded source for tests and simulations;
    in production pass ``secrets.token_bytes``, see the module docstring)."""
    if isinstance(rng, random.Random):
        return rng.randbytes(VALUE_SIZE_BYTES)
    if isinstance(rng, np.random.Generator):
        return rng.bytes(VALUE_SIZE_BYTES)
    value = bytes(rng(VALUE_SIZE_BYTES))
    if len(value) != VALUE_SIZE_BYTES:
        raise ValueError(f"the byte source gave {len(value)} bytes, {VALUE_SIZE_BYTES} were asked for")
    return value


def make_commitment(round_id: bytes | str, participant: str, value: bytes) -> bytes:
    """The 32-byte commitment to ``value``. Raises ValueError unless ``value`` has ``VALUE_SIZE_BYTES`` bytes (a
    shorter secret could be guessed from its commitment)."""
    if len(value) != VALUE_SIZE_BYTES:
        raise ValueError(f"a committed value must have {VALUE_SIZE_BYTES} bytes, got {len(value)}")
    return _hash_fields(COMMIT_DOMAIN, _as_bytes(round_id), _as_bytes(participant), bytes(value))


def verify_reveal(commitment: bytes, round_id: bytes | str, participant: str, value: bytes) -> bool:
    """Whether ``value`` opens ``participant``'s ``commitment`` for this round. Malformed input (a value or a
    commitment of the wrong size) is False, not an error: it comes from peers."""
    if len(value) != VALUE_SIZE_BYTES or len(commitment) != _DIGEST_SIZE_BYTES:
        return False
    return hmac.compare_digest(make_commitment(round_id, participant, value), bytes(commitment))


def _seed(round_id: bytes, reveals: Iterable[tuple[str, bytes]]) -> bytes:
    fields = [SEED_DOMAIN, round_id]
    for participant, value in sorted(reveals, key=lambda pair: pair[0].encode("utf-8")):
        fields += [participant.encode("utf-8"), value]
    return _hash_fields(*fields)


@dataclass(frozen=True)
class CombineResult:
    """The outcome of a round. ``seed`` is None unless every participant that committed revealed correctly."""

    round_id: bytes
    participants: tuple[str, ...]  # everyone who committed, sorted
    valid_reveals: tuple[tuple[str, bytes], ...]  # (participant, value) that opened its commitment, sorted
    cheaters: frozenset[str]  # revealed a value that does not open its commitment
    missing: frozenset[str]  # committed but did not reveal
    uncommitted: frozenset[str]  # revealed without a commitment: not counted
    seed: bytes | None

    @property
    def failed(self) -> frozenset[str]:
        return self.cheaters | self.missing

    @property
    def ok(self) -> bool:
        return self.seed is not None

    def seed_without(self, excluded: Iterable[str]) -> bytes:
        """The seed over the valid reveals of the participants not in ``excluded``, which must hold every failed
        participant (and may hold others, e.g. peers banned meanwhile). Prefer a re-run without them: this seed
        lets each withholder choose between two seeds it knows (module docstring). Raises ValueError if a failed
        participant is kept, if ``excluded`` names a non-participant, or if nobody is left."""
        excluded = frozenset(excluded)
        kept_failed = self.failed - excluded
        if kept_failed:
            raise ValueError(f"participants {sorted(kept_failed)} failed to reveal and must be excluded")
        strangers = excluded - set(self.participants)
        if strangers:
            raise ValueError(f"{sorted(strangers)} did not commit in round {self.round_id!r}: nothing to exclude")
        kept = [(p, v) for p, v in self.valid_reveals if p not in excluded]
        if not kept:
            raise ValueError(f"no participant of round {self.round_id!r} is left to draw a seed from")
        return _seed(self.round_id, kept)


def combine(round_id: bytes | str, reveals: Mapping[str, bytes], commitments: Mapping[str, bytes]) -> CombineResult:
    """Checks every reveal against its commitment and draws the round's seed (None if anyone who committed failed).
    The participants are those in ``commitments``; raises ValueError if there are none."""
    if not commitments:
        raise ValueError("no participant committed: there is no seed to draw")
    round_bytes = _as_bytes(round_id)
    participants = tuple(sorted(commitments, key=lambda p: p.encode("utf-8")))
    valid: list[tuple[str, bytes]] = []
    cheaters: set[str] = set()
    missing: set[str] = set()
    for participant in participants:
        if participant not in reveals:
            missing.add(participant)
        elif verify_reveal(commitments[participant], round_bytes, participant, reveals[participant]):
            valid.append((participant, bytes(reveals[participant])))
        else:
            cheaters.add(participant)
    ok = not cheaters and not missing
    return CombineResult(
        round_id=round_bytes,
        participants=participants,
        valid_reveals=tuple(valid),
        cheaters=frozenset(cheaters),
        missing=frozenset(missing),
        uncommitted=frozenset(reveals) - frozenset(commitments),
        seed=_seed(round_bytes, valid) if ok else None,
    )


def seed_to_int(seed: bytes, bits: int = 64) -> int:
    """The first ``bits`` bits of ``seed`` as an unsigned integer, uniform in ``[0, 2**bits)`` if the seed is."""
    if not 0 < bits <= 8 * len(seed):
        raise ValueError(f"bits must be in 1..{8 * len(seed)} for a {len(seed)}-byte seed, got {bits}")
    return int.from_bytes(seed, "big") >> (8 * len(seed) - bits)


def seed_to_generator(seed: bytes) -> np.random.Generator:
    """A numpy generator (PCG64) seeded with all the bits of ``seed``: every peer derives the same stream from the
    same seed, e.g. the random projection direction or the choice of validators."""
    if not seed:
        raise ValueError("an empty seed")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(seed, "big"))))
