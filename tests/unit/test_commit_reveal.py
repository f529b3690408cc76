"""Commit–reveal randomness (algorithms/commit_reveal.py): detection of bad reveals, determinism, and a uniform seed
with one honest participant among adversaries that choose their values after seeing its commitment."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import chisquare

from corolla.algorithms.commit_reveal import (
    COMMIT_DOMAIN,
    SEED_DOMAIN,
    VALUE_SIZE_BYTES,
    combine,
    draw_value,
    make_commitment,
    seed_to_generator,
    seed_to_int,
    verify_reveal,
)

NAMES = ["alice", "bob", "carol", "dave", "eve"]
BUCKETS = 16


def _round(round_id: str, values: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    commitments = {p: make_commitment(round_id, p, v) for p, v in values.items()}
    return dict(values), commitments


def _values(seed: int, names=NAMES) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {p: draw_value(rng) for p in names}


def _flip_bit(value: bytes, bit: int) -> bytes:
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _bucket(seed: bytes) -> int:
    return seed_to_int(seed, 64) % BUCKETS  # 2**64 is a multiple of 16: exactly uniform if the seed is


# --- the protocol ---------------------------------------------------------------------------------------------------


def test_round_trip():
    reveals, commitments = _round("step-7/0", _values(1))
    for p in NAMES:
        assert len(commitments[p]) == 32
        assert verify_reveal(commitments[p], "step-7/0", p, reveals[p])
    result = combine("step-7/0", reveals, commitments)
    assert result.ok and result.seed is not None and len(result.seed) == 32
    assert result.failed == frozenset() and result.uncommitted == frozenset()
    assert result.participants == tuple(sorted(NAMES))
    assert result.seed_without(()) == result.seed


def test_seed_matches_the_documented_encoding():
    """A reference implementation written from the docstring: sha256 over length-prefixed fields."""

    def fields_hash(*fields: bytes) -> bytes:
        return hashlib.sha256(b"".join(len(f).to_bytes(8, "big") + f for f in fields)).digest()

    values = _values(2)
    reveals, commitments = _round(b"r", values)
    assert commitments["bob"] == fields_hash(COMMIT_DOMAIN, b"r", b"bob", values["bob"])
    pairs = [x for p in sorted(NAMES) for x in (p.encode(), values[p])]
    assert combine(b"r", reveals, commitments).seed == fields_hash(SEED_DOMAIN, b"r", *pairs)


def test_one_flipped_bit_is_detected():
    reveals, commitments = _round("r", _values(3))
    for bit in (0, 7, 100, 8 * VALUE_SIZE_BYTES - 1):
        bad = dict(reveals, carol=_flip_bit(reveals["carol"], bit))
        assert not verify_reveal(commitments["carol"], "r", "carol", bad["carol"])
        result = combine("r", bad, commitments)
        assert result.cheaters == {"carol"} and result.missing == frozenset()
        assert result.seed is None and not result.ok
    flipped_commitment = _flip_bit(commitments["carol"], 5)
    assert not verify_reveal(flipped_commitment, "r", "carol", reveals["carol"])


def test_reveal_for_another_round_or_participant_is_detected():
    reveals, commitments = _round("r1", _values(4))
    assert not verify_reveal(commitments["alice"], "r2", "alice", reveals["alice"])
    assert combine("r2", reveals, commitments).cheaters == frozenset(NAMES)
    # bob copies alice's commitment (he saw it before committing) and then her reveal: the name is hashed in
    copied = dict(commitments, bob=commitments["alice"])
    result = combine("r1", dict(reveals, bob=reveals["alice"]), copied)
    assert result.cheaters == {"bob"} and result.seed is None
    # a value that is right for another participant
    assert combine("r1", dict(reveals, dave=reveals["eve"]), commitments).cheaters == {"dave"}


def test_fields_are_unambiguous_and_str_means_utf8():
    value = bytes(VALUE_SIZE_BYTES)
    assert make_commitment("r1", "ab", value) != make_commitment("r1a", "b", value)
    assert make_commitment("r", "ab", value) != make_commitment("ra", "b", value)
    assert make_commitment("r1", "ab", value) == make_commitment(b"r1", "ab", value)


def test_malformed_input():
    with pytest.raises(ValueError, match="32 bytes"):
        make_commitment("r", "alice", b"short")
    commitment = make_commitment("r", "alice", bytes(32))
    assert not verify_reveal(commitment, "r", "alice", bytes(31))
    assert not verify_reveal(commitment, "r", "alice", bytes(33))
    assert not verify_reveal(commitment[:-1], "r", "alice", bytes(32))
    result = combine("r", {"alice": b"short"}, {"alice": commitment})
    assert result.cheaters == {"alice"}
    with pytest.raises(ValueError, match="no participant committed"):
        combine("r", {"alice": bytes(32)}, {})
    with pytest.raises(ValueError, match="gave 3 bytes"):
        draw_value(lambda n: b"abc")


def test_missing_reveals_are_reported_and_block_the_seed():
    reveals, commitments = _round("r", _values(5))
    del reveals["dave"], reveals["alice"]
    result = combine("r", reveals, commitments)
    assert result.missing == {"dave", "alice"} and result.cheaters == frozenset()
    assert result.seed is None
    with pytest.raises(ValueError, match="must be excluded"):
        result.seed_without({"dave"})
    with pytest.raises(ValueError, match="did not commit"):
        result.seed_without({"dave", "alice", "mallory"})
    rest = result.seed_without({"dave", "alice"})
    # the same reveals among the rest give the same seed as a round of the rest only, and differ from the full seed
    others = [p for p in NAMES if p not in ("dave", "alice")]
    assert rest == combine("r", reveals, {p: commitments[p] for p in others}).seed
    full = combine("r", *_round("r", _values(5)))
    assert full.seed is not None and rest != full.seed
    assert result.seed_without({"dave", "alice", "bob"}) != rest  # further exclusions are allowed
    with pytest.raises(ValueError, match="no participant"):
        result.seed_without(NAMES)


def test_uncommitted_reveal_is_ignored_and_reported():
    reveals, commitments = _round("r", _values(6))
    result = combine("r", dict(reveals, mallory=bytes(32)), commitments)
    assert result.uncommitted == {"mallory"}
    assert result.seed == combine("r", reveals, commitments).seed


def test_determinism():
    reveals, commitments = _round("r", _values(7))
    shuffled = dict(reversed(list(reveals.items())))
    seeds = {combine("r", r, commitments).seed for r in (reveals, shuffled, dict(sorted(reveals.items())))}
    assert len(seeds) == 1
    assert _values(7) == _values(7)  # seeded sources give the same values
    assert draw_value(np.random.default_rng(3)) == draw_value(np.random.default_rng(3))
    assert combine("r2", *_round("r2", _values(7))).seed not in seeds  # another round, another seed


def test_seed_helpers():
    seed = hashlib.sha256(b"x").digest()
    assert seed_to_int(seed, 8) == seed[0]
    assert seed_to_int(seed, 256) == int.from_bytes(seed, "big")
    assert 0 <= seed_to_int(seed) < 2**64
    for bits in (0, 257):
        with pytest.raises(ValueError, match="bits"):
            seed_to_int(seed, bits)
    a, b = seed_to_generator(seed), seed_to_generator(seed)
    assert np.array_equal(a.standard_normal(8), b.standard_normal(8))
    other = seed_to_generator(hashlib.sha256(b"y").digest())
    assert not np.array_equal(seed_to_generator(seed).standard_normal(8), other.standard_normal(8))
    with pytest.raises(ValueError):
        seed_to_generator(b"")


# --- one honest participant suffices ---------------------------------------------------------------------------------

# An adversary's value as a function of what it saw before committing: the honest commitment (and the round). The
# commitments are broadcast before any reveal, so this is all it can adapt to; it cannot invert the commitment.
Strategy = Callable[[str, bytes], bytes]

STRATEGIES: dict[str, Strategy] = {
    "zeros": lambda round_id, honest_commitment: bytes(VALUE_SIZE_BYTES),
    "copy_commitment": lambda round_id, honest_commitment: honest_commitment,
    "hash_of_view": lambda round_id, honest_commitment: hashlib.sha256(round_id.encode() + honest_commitment).digest(),
    "constant": lambda round_id, honest_commitment: b"\xff" * VALUE_SIZE_BYTES,
}


def _grind(round_id: str, others: dict[str, bytes], adversary: str, target: int) -> bytes:
    """The value for ``adversary`` that puts the seed over ``others`` plus itself in bucket ``target``: possible only
    when it knows all the other values (here: no honest participant, or the values were revealed)."""
    for counter in range(10_000):
        value = counter.to_bytes(VALUE_SIZE_BYTES, "big")
        reveals, commitments = _round(round_id, {**others, adversary: value})
        seed = combine(round_id, reveals, commitments).seed
        if seed is not None and _bucket(seed) == target:
            return value
    raise AssertionError("grinding failed")


def test_one_honest_participant_gives_uniform_seeds():
    """10^4 rounds, 1 honest participant (seeded numpy source) and 4 adversaries, one per strategy above, plus a
    fifth that grinds its value to make the seed of the adversaries alone land in bucket 0 (what it would get if it
    could ignore the honest value). Chi-square of the seeds' buckets against uniform: p > 0.001."""
    rng = np.random.default_rng(20240601)
    counts = np.zeros(BUCKETS, dtype=np.int64)
    rounds = 10_000
    for step in range(rounds):
        round_id = f"step-{step}"
        honest = draw_value(rng)
        honest_commitment = make_commitment(round_id, "honest", honest)
        values = {"honest": honest}
        values |= {f"adv-{name}": s(round_id, honest_commitment) for name, s in STRATEGIES.items()}
        if step % 20 == 0:  # grinding is costly (16 tries on average): a sample of rounds
            adversaries = {p: v for p, v in values.items() if p != "honest"}
            values["adv-grind"] = _grind(round_id, adversaries, "adv-grind", target=0)
        reveals, commitments = _round(round_id, values)
        result = combine(round_id, reveals, commitments)
        assert result.seed is not None
        counts[_bucket(result.seed)] += 1
    assert counts.sum() == rounds
    assert chisquare(counts).pvalue > 0.001, counts


def test_without_an_honest_participant_the_seed_is_chosen():
    """The negative control: the same chi-square test does see a bias when every participant is adversarial (the
    last one grinds its value knowing all the others)."""
    counts = np.zeros(BUCKETS, dtype=np.int64)
    for step in range(500):
        round_id = f"step-{step}"
        others = {f"adv-{name}": s(round_id, bytes(32)) for name, s in STRATEGIES.items()}
        values = others | {"adv-grind": _grind(round_id, others, "adv-grind", target=3)}
        seed = combine(round_id, *_round(round_id, values)).seed
        assert seed is not None
        counts[_bucket(seed)] += 1
    assert counts[3] == 500
    assert chisquare(counts).pvalue < 1e-100


@pytest.mark.parametrize("colluders", [1, 2])
def test_withholding_buys_one_redraw_per_eliminated_peer(colluders: int):
    """Adversaries reveal last and withhold their reveal when the seed would fall in the lower half of the buckets
    (they want the upper half). The caller's rule: every failed participant is eliminated and the round re-run with
    fresh values and a new round id. Each adversary can then force one re-draw, at the cost of its place: the upper
    half comes out with probability 1 - 2**-(colluders + 1) instead of 1/2, and each re-draw costs one peer."""
    rng = np.random.default_rng(7 + colluders)
    rounds, wins, eliminated = 3_000, 0, 0
    for step in range(rounds):
        active = ["honest-1", "honest-2"] + [f"adv-{i}" for i in range(colluders)]
        for attempt in range(colluders + 1):
            round_id = f"step-{step}/attempt-{attempt}"
            values = {p: draw_value(rng) for p in active}  # fresh values every attempt (adversaries' don't matter)
            reveals, commitments = _round(round_id, values)
            full = combine(round_id, reveals, commitments)
            assert full.seed is not None
            withholder = next((p for p in active if p.startswith("adv")), None)
            if withholder is not None and _bucket(full.seed) < BUCKETS // 2:
                del reveals[withholder]
                result = combine(round_id, reveals, commitments)
                assert result.seed is None and result.missing == {withholder}
                active.remove(withholder)
                eliminated += 1
                continue
            wins += _bucket(full.seed) >= BUCKETS // 2
            break
    expected = 1 - 2.0 ** -(colluders + 1)
    assert abs(wins / rounds - expected) < 0.03, (wins / rounds, expected)
    # each adversary withholds (and is eliminated) in about half the rounds in which it gets to decide
    assert abs(eliminated / rounds - (1 - 2.0**-colluders)) < 0.04, eliminated / rounds
