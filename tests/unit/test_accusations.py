"""BTARD accusation rules (algorithms/accusations.py): each rule, immutability, and the invariants under random
attacks: no honest peer is ever banned, and the Byzantine share of the active peers never rises."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from corolla.algorithms.accusations import (
    BanState,
    Event,
    MissingMessage,
    ProvenLie,
    apply,
    apply_all,
    byzantine_share,
)

PEERS = [f"p{i:02d}" for i in range(16)]
BYZANTINE = frozenset(PEERS[:7])  # 7 of 16, as in the paper's experiments
HONEST = frozenset(PEERS) - BYZANTINE


def _start() -> BanState:
    return BanState.start(PEERS)


# --- each rule ------------------------------------------------------------------------------------------------------


def test_proven_lie_bans_the_accused():
    state = apply(_start(), ProvenLie("p10", "p01", evidence_valid=True, detail="gradient differs"))
    assert "p01" in state.banned and "p01" not in state.active and "p10" in state.active
    assert "p10" in state.banned["p01"] and "gradient differs" in state.banned["p01"]
    assert state.status("p01") == "banned" and state.eliminated == frozenset()
    assert state.log[-1].banned == {"p01"} and state.log[-1].ignored_because is None


def test_invalid_evidence_bans_the_accuser():
    state = apply(_start(), ProvenLie("p01", "p10", evidence_valid=False))
    assert set(state.banned) == {"p01"} and "false accusation against p10" in state.banned["p01"]
    assert "p10" in state.active and "p01" not in state.active


def test_missing_message_eliminates_both_ends():
    state = apply(_start(), MissingMessage(reporter="p10", silent="p01"))
    assert state.eliminated == {"p10", "p01"} and not state.banned
    assert state.active == frozenset(PEERS) - {"p10", "p01"}
    assert state.status("p10") == state.status("p01") == "eliminated"
    assert state.log[-1].eliminated == {"p10", "p01"}


@pytest.mark.parametrize(
    "event",
    [
        ProvenLie("p01", "p02", evidence_valid=True),  # accuser banned
        ProvenLie("p03", "p01", evidence_valid=False),  # accused banned
        ProvenLie("p03", "p05", evidence_valid=True),  # accused eliminated
        ProvenLie("p05", "p03", evidence_valid=False),  # accuser eliminated
        MissingMessage("p01", "p03"),
        MissingMessage("p03", "p05"),
        MissingMessage("p03", "stranger"),  # never seen
        ProvenLie("stranger", "p03", evidence_valid=False),
    ],
)
def test_events_about_inactive_peers_are_ignored(event: Event):
    before = apply_all(_start(), [ProvenLie("p02", "p01", True), MissingMessage("p04", "p05")])
    after = apply(before, event)
    assert after.active == before.active and after.banned == before.banned and after.eliminated == before.eliminated
    assert after.log[:-1] == before.log and after.log[-1].event == event
    assert after.log[-1].ignored_because is not None and not after.log[-1].banned and not after.log[-1].eliminated


def test_self_accusation_raises():
    with pytest.raises(ValueError, match="cannot accuse itself"):
        ProvenLie("p01", "p01", evidence_valid=True)
    with pytest.raises(ValueError, match="cannot report itself"):
        MissingMessage("p01", "p01")


def test_state_validation_and_share():
    with pytest.raises(ValueError, match="more than one"):
        BanState(active=frozenset({"a", "b"}), eliminated=frozenset({"b"}))
    with pytest.raises(ValueError, match="more than one"):
        BanState(active=frozenset({"a"}), banned={"b": "x"}, eliminated=frozenset({"b"}))
    with pytest.raises(TypeError, match="unknown event"):
        apply(_start(), "p01 is lying")  # type: ignore[arg-type]
    assert byzantine_share(_start(), BYZANTINE) == 7 / 16
    assert byzantine_share(BanState.start([]), BYZANTINE) == 0.0


def test_apply_does_not_modify_its_input():
    state = apply(_start(), ProvenLie("p10", "p00", True))
    snapshot = copy.deepcopy((state.active, dict(state.banned), state.eliminated, state.log))
    for event in [ProvenLie("p11", "p01", True), ProvenLie("p02", "p11", False), MissingMessage("p12", "p03")]:
        new = apply(state, event)
        assert new is not state
        assert (state.active, dict(state.banned), state.eliminated, state.log) == snapshot
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.active = frozenset()  # type: ignore[misc]
    with pytest.raises(TypeError):
        state.banned["p05"] = "x"  # type: ignore[index]
    # a mutable mapping given to the constructor is copied, not kept
    reasons = {"x": "lied"}
    held = BanState(active=frozenset({"a"}), banned=reasons)
    reasons["y"] = "later"
    assert dict(held.banned) == {"x": "lied"}


# --- the invariants under random attacks -----------------------------------------------------------------------------
#
# The model (BTARD's assumptions, §2.2 and §2.5 of the reference):
# * messages are signed, so valid evidence of a lie exists only against a peer that lied, and only Byzantine peers
#   lie; the caller checks evidence correctly, so ``evidence_valid`` is true exactly when the accused is Byzantine
#   and did lie (here: an accused Byzantine peer may or may not have lied; an accused honest peer never did);
# * honest peers only report true things: a ProvenLie against a Byzantine peer that lied (valid evidence), a
#   MissingMessage when a Byzantine peer was silent towards them;
# * honest peers always reach each other in time: there is never a true MissingMessage between two honest peers,
#   and an honest peer never stays silent, so a MissingMessage has a Byzantine reporter (true or fake report) or a
#   Byzantine silent peer (or both);
# * Byzantine peers collude and do anything else: false accusations against honest peers, accusations of each
#   other with valid or invalid evidence, fake MissingMessage reports against anyone, silence towards anyone;
# * events may also name peers that were already removed (late or replayed messages), which must be ignored.


def _late_event(rng: random.Random, state: BanState) -> Event:
    """A late or replayed message that names at least one peer that is no longer active."""
    gone = rng.choice(sorted(frozenset(PEERS) - state.active))
    other = rng.choice([p for p in PEERS if p != gone])
    a, b = (gone, other) if rng.random() < 0.5 else (other, gone)
    return rng.choice([ProvenLie(a, b, rng.random() < 0.5), MissingMessage(a, b)])


def _random_event(rng: random.Random, state: BanState) -> Event:
    active = sorted(state.active)
    byzantine = [p for p in active if p in BYZANTINE]
    honest = [p for p in active if p in HONEST]
    if not byzantine or len(active) < 2 or (len(active) < len(PEERS) and rng.random() < 0.1):
        return _late_event(rng, state)  # (with no Byzantine peer left, nothing else can happen)
    kinds = ["byzantine_accuses", "byzantine_reports", "byzantine_silent_to_byzantine"]
    if honest:
        kinds += ["honest_accuses", "honest_reports_silence"]
    kind = rng.choice(kinds)
    if kind == "honest_accuses":  # true, with valid evidence
        return ProvenLie(rng.choice(honest), rng.choice(byzantine), evidence_valid=True)
    if kind == "honest_reports_silence":  # a Byzantine peer was silent towards an honest one
        return MissingMessage(reporter=rng.choice(honest), silent=rng.choice(byzantine))
    accuser = rng.choice(byzantine)
    target = rng.choice([p for p in active if p != accuser])
    if kind == "byzantine_accuses":  # against an honest peer the evidence is forged, i.e. invalid
        return ProvenLie(accuser, target, evidence_valid=target in BYZANTINE and rng.random() < 0.5)
    if kind == "byzantine_reports":  # a fake (or, against a Byzantine peer, maybe true) report
        return MissingMessage(reporter=accuser, silent=target)
    others = [p for p in byzantine if p != accuser]
    return MissingMessage(reporter=accuser, silent=rng.choice(others or [target]))


def test_invariants_over_random_attacks():
    """2,000 sequences of 30 events over 16 peers, 7 Byzantine: no honest peer is ever banned; every elimination
    takes at least one Byzantine peer; the Byzantine share of the active peers never rises (through any event);
    eliminated honest peers never outnumber removed Byzantine ones."""
    rng = random.Random(1234)
    seen = {"ban": 0, "elimination": 0, "honest_eliminated": 0, "ignored": 0}
    for _ in range(2_000):
        state = _start()
        for _ in range(30):
            event = _random_event(rng, state)
            before = state
            state = apply(state, event)
            decision = state.log[-1]
            assert decision.event is event and len(state.log) == len(before.log) + 1
            assert not (HONEST & state.banned.keys()), (event, dict(state.banned))
            if decision.eliminated:
                assert decision.eliminated & BYZANTINE, event
                seen["elimination"] += 1
                seen["honest_eliminated"] += len(decision.eliminated & HONEST)
            seen["ban"] += len(decision.banned)
            seen["ignored"] += decision.ignored_because is not None
            assert byzantine_share(state, BYZANTINE) <= byzantine_share(before, BYZANTINE) + 1e-12, event
            removed_byzantine = len(BYZANTINE - state.active)
            assert len(HONEST & state.eliminated) <= removed_byzantine
            assert state.active | state.banned.keys() | state.eliminated == frozenset(PEERS)
    # the sequences did exercise every rule
    assert all(count > 500 for count in seen.values()), seen


def test_the_share_can_rise_when_byzantine_peers_are_the_majority():
    """The bound needs a Byzantine share of at most 1/2: with 3 of 5, trading one Byzantine peer for one honest one
    raises the share (2/3 > 3/5). This is the condition under which eliminations are safe, not a bug."""
    state = BanState.start(["b1", "b2", "b3", "h1", "h2"])
    byzantine = {"b1", "b2", "b3"}
    after = apply(state, MissingMessage(reporter="b1", silent="h1"))
    assert byzantine_share(after, byzantine) > byzantine_share(state, byzantine)
    assert not after.banned  # still no honest peer banned
