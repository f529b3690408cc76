"""The BTARD step protocol (``secure.protocol``) between peers in one process, over an in-memory transport that
goes through the same ``receive`` checks as the network: honest steps equal butterfly CenteredClip computed
locally, and every protocol attack gets its peer banned (or, for silence, eliminated with one reporter) without
any honest peer banned and with the honest peers' parameters identical."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from corolla.algorithms.centered_clip import CenteredClipConfig, centered_clip
from corolla.secure.behaviour import Behaviour
from corolla.secure.digits import DigitsModel, DigitsTask, digits_split
from corolla.secure.envelope import Envelope, Signer
from corolla.secure.mailbox import Mailbox
from corolla.secure.protocol import BtardProtocol, ProtocolConfig

LR = 0.1
_DATA = digits_split(0)


def make_peers(
    behaviours: list[str], *, validators: int = 1, seed: int = 0, timeout_s: float = 1.0, drop=lambda *_: False
):
    """``drop(sender, receiver, header)``: True loses that message on the way (a link that failed)."""
    names = [f"peer{i}" for i in range(len(behaviours))]
    signers = {n: Signer() for n in names}
    keys = {n: s.public_key for n, s in signers.items()}
    peers: dict[str, BtardProtocol] = {}
    for i, (name, spec) in enumerate(zip(names, behaviours)):

        async def send(peer: str, envelope: Envelope, sender=name) -> None:
            if not drop(sender, peer, envelope.header):
                await peers[peer].receive(envelope.to_wire())

        task = DigitsTask(DigitsModel(_DATA[0], _DATA[1], hidden=16, batch_size=16, seed=0))
        peers[name] = BtardProtocol(
            me=name,
            signer=signers[name],
            keys=keys,
            config=ProtocolConfig(run="test", validators=validators, phase_timeout_s=timeout_s),
            task=task,
            send=send,
            mailbox=Mailbox(),
            behaviour=Behaviour.parse(spec),
            rng=random.Random(seed * 100 + i).randbytes,
        )
    return peers


async def run_steps(peers: dict[str, BtardProtocol], steps: int) -> list[dict]:
    """Each step: every active peer runs it; updates applied with plain SGD. Returns per step {peer: outcome}."""
    history = []
    for step in range(steps):
        alive = [n for n, p in peers.items() if n in p.state.active]
        outcomes = await asyncio.gather(*(peers[n].step(step) for n in alive))
        for name, outcome in zip(alive, outcomes):
            if outcome.update is not None:
                peers[name].task.model.flat = peers[name].task.model.flat - LR * outcome.update
        history.append(dict(zip(alive, outcomes)))
    return history


def test_honest_steps_equal_butterfly_centered_clip_computed_locally():
    peers = make_peers(["none"] * 4)
    local = DigitsModel(_DATA[0], _DATA[1], hidden=16, batch_size=16, seed=0)
    clip = CenteredClipConfig(tau=1.0, max_iters=500, tol=1e-9)
    history = asyncio.run(run_steps(peers, 3))
    for step, outcomes in enumerate(history):
        group = sorted(peers)
        grads = torch.stack([DigitsTask(local).gradient(step, p) for p in group]).to(torch.float32)
        parts = torch.tensor_split(grads, len(group), dim=1)
        expected = torch.cat([centered_clip(part.to(torch.float64), config=clip).value for part in parts])
        for outcome in outcomes.values():
            assert outcome.void_reason is None and not outcome.verdicts and not outcome.missing
            assert torch.equal(outcome.update, expected.to(torch.float32))
        local.flat = local.flat - LR * expected.to(torch.float32)
    for peer in peers.values():
        assert torch.equal(peer.task.params, local.flat)


@pytest.mark.parametrize(
    "attack",
    [
        "wrong_aggregate@1",
        "bad_part@1",
        "false_accusation@1",
        "changed_reveal@1",
        "equivocate@1",
        "wrong_aggregate@1,empty_check@1",  # an empty report would leave its wrong aggregate unchecked
        "empty_check@1",
        "malformed_aggregate@1",
        "malformed_report@1",
        "wrong_aggregate@1,malformed_report@1",  # a malformed own report would leave its wrong aggregate unjudged
        "nonfinite_part@1",  # committed NaN values: they must not stop the honest aggregators' CenteredClip
        "nonfinite_aggregate@1",
    ],
)
def test_a_protocol_lie_gets_its_peer_banned_and_no_one_else(attack):
    peers = make_peers(["none"] * 4 + [attack])
    history = asyncio.run(run_steps(peers, 3))
    for name in list(peers)[:4]:
        state = peers[name].state
        assert set(state.banned) == {"peer4"}, (attack, dict(state.banned))
        assert not state.eliminated
        assert "peer4" not in history[2]  # banned from the next step on
    honest = [peers[n].task.params for n in list(peers)[:4]]
    assert all(torch.equal(honest[0], p) for p in honest)
    lie_steps = [o["peer0"] for o in history[1:2]]
    if attack != "false_accusation@1":  # a false accusation changes no value: its step counts
        assert lie_steps[0].update is None, "a step with a proven false part, aggregate, reveal or report is void"


def test_a_wrong_aggregate_hidden_behind_a_malformed_own_report_is_banned_without_validators():
    """An aggregator that sends a wrong result and a report of the wrong shape for its own partition makes every
    check of that partition fail without a lying number to point at; the report's shape alone proves the lie, so it
    is banned and its step void even when no validator looks at it."""
    peers = make_peers(["none"] * 4 + ["wrong_aggregate@1,malformed_report@1"], validators=0)
    history = asyncio.run(run_steps(peers, 3))
    for name in list(peers)[:4]:
        assert set(peers[name].state.banned) == {"peer4"}, dict(peers[name].state.banned)
        assert "malformed_report" in peers[name].state.banned["peer4"]
    assert history[1]["peer0"].update is None
    assert all(o.update is not None for o in history[2].values())


def test_an_aggregator_that_cancels_the_check_with_its_own_report_is_caught_by_its_witness():
    """Aggregator j holds every part j, so it can compute the others' reports and report for its own part whatever
    makes the sums vanish: the check alone would pass a wrong aggregate. Its own part also goes to the next peer
    (its witness), which checks its report like the aggregator checks everyone else's: banned, step void, without
    any validator."""
    peers = make_peers(["none"] * 4 + ["wrong_aggregate@1,cancel_own_report@1"], validators=0)
    history = asyncio.run(run_steps(peers, 3))
    for name in list(peers)[:4]:
        assert set(peers[name].state.banned) == {"peer4"}, dict(peers[name].state.banned)
        assert "misreport" in peers[name].state.banned["peer4"]
    assert history[1]["peer0"].update is None
    honest = [peers[n].task.params for n in list(peers)[:4]]
    assert all(torch.equal(honest[0], p) for p in honest)


def test_two_peers_whose_reports_would_overflow_the_sums_are_banned_and_no_one_stops():
    """Projections near float64's largest value from two peers would overflow the exact sum of a partition's
    reports (fsum) and stop every honest peer; no honest projection exceeds tau, so such a report is a lie."""
    peers = make_peers(["none"] * 4 + ["huge_report@1"] * 2)
    history = asyncio.run(run_steps(peers, 3))
    for name in list(peers)[:4]:
        assert set(peers[name].state.banned) == {"peer4", "peer5"}, dict(peers[name].state.banned)
    assert history[1]["peer0"].update is None and history[2]["peer0"].update is not None


def test_an_honest_gradient_that_overflows_is_sent_clamped_not_punished():
    """A peer whose gradient on some batch overflows (inf, NaN) sends it cleaned the way every validator
    recomputes it (NaN as 0, infinities at float32's largest): no one takes it for a non-finite lie."""
    peers = make_peers(["none"] * 4)
    for peer in peers.values():
        original = peer.task.gradient

        def overflowing(step, who, *, wrong_labels=False, original=original):
            g = original(step, who, wrong_labels=wrong_labels).clone()
            if who == "peer2" and step == 1:
                g[:3] = torch.tensor([float("inf"), float("nan"), -float("inf")])
            return g

        peer.task.gradient = overflowing
    history = asyncio.run(run_steps(peers, 2))
    for outcome in history[1].values():
        assert not outcome.verdicts and outcome.void_reason is None, outcome.verdicts
    assert all(not peers[n].state.banned for n in peers)


def test_a_peer_that_goes_silent_mid_step_is_eliminated_with_one_reporter():
    peers = make_peers(["none"] * 4 + ["silent@1"], timeout_s=0.5)
    history = asyncio.run(run_steps(peers, 3))
    states = [peers[n].state for n in list(peers)[:4] if n in peers[n].state.active]
    assert len(states) == 3  # one honest reporter left with the silent peer
    for state in states:
        assert not state.banned and "peer4" in state.eliminated and len(state.eliminated) == 2
    assert history[1]["peer1"].void_reason == "a message was missing"
    assert history[2]["peer1"].void_reason is None and len(history[2]) == 3


def test_a_lost_aggregate_eliminates_its_link_and_bans_no_one():
    """peer1 never gets peer0's aggregate at step 1 (a link that failed, as on a slow network): peer1 has nothing
    to check and says so with an empty report, which is no misreport; it reports peer0 missing and both leave."""
    lost = lambda sender, receiver, h: (sender, receiver, h.kind, h.step) == ("peer0", "peer1", "aggregate", 1)  # noqa: E731
    peers = make_peers(["none"] * 5, timeout_s=0.5, drop=lost)
    history = asyncio.run(run_steps(peers, 3))
    for name in ("peer2", "peer3", "peer4"):
        state = peers[name].state
        assert not state.banned, dict(state.banned)
        assert state.eliminated == {"peer0", "peer1"}
        assert history[1][name].update is None and not [v for v in history[1][name].verdicts if v.result != "moot"]
        assert history[2][name].void_reason is None and len(history[2]) == 3


def test_a_peer_that_withholds_its_accusations_is_eliminated_at_the_next_step():
    """Its step is void for the others (they cannot know what it accused); the next step names it missing, and it
    leaves with one reporter, as a peer silent in any other phase does. (It applied the void step's update itself,
    so if a validator checks it at the next step, its gradient differs from the recomputation: banned instead, and
    the report of its silence then costs no one.)"""
    peers = make_peers(["none"] * 4 + ["withhold_accusations@1"], timeout_s=0.5)
    history = asyncio.run(run_steps(peers, 4))
    assert history[1]["peer0"].void_reason == "a message was missing"
    states = [peers[n].state for n in list(peers)[:4] if n in peers[n].state.active]
    assert len(states) >= 3
    for state in states:
        assert "peer4" not in state.active and not set(state.banned) - {"peer4"}
        assert len(state.eliminated - {"peer4"}) == 4 - len(states)
    assert "peer4" not in history[3] and history[3]["peer1"].void_reason is None


def test_a_forged_message_is_refused_and_changes_nothing():
    peers = make_peers(["none"] * 4 + ["forge@1"])
    history = asyncio.run(run_steps(peers, 2))
    assert sum(p.refused for p in peers.values()) == 3  # everyone but the forger and the impersonated peer
    for outcome in history[1].values():
        assert outcome.void_reason is None and not outcome.state.banned


def test_validators_ban_a_poisoned_gradient_and_clipping_bounds_it_meanwhile():
    peers = make_peers(["none"] * 4 + ["sign_flip@0"], validators=4)
    history = asyncio.run(run_steps(peers, 4))
    banned_at = next(step for step, outcomes in enumerate(history) if outcomes["peer0"].state.banned)
    assert banned_at <= 2 and set(peers["peer0"].state.banned) == {"peer4"}
    assert all(o.update is not None for o in history[banned_at].values())  # a validator's catch voids nothing


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda wire, peers: b"\x93garbage", "not msgpack|an envelope|a header"),
        (lambda wire, peers: Signer().seal(run="test", sender="peer1", kind="commit", step=0, body={}).to_wire(),
         "not signed by peer1"),
        (lambda wire, peers: Signer().seal(run="other", sender="peer1", kind="commit", step=0, body={}).to_wire(),
         "for run 'other'"),
        (lambda wire, peers: Signer().seal(run="test", sender="mallory", kind="commit", step=0, body={}).to_wire(),
         "not a peer of run"),
        (lambda wire, peers: _sealed(peers, "aggregate", {}), "needs 'data' as bytes, got NoneType"),
        (lambda wire, peers: _sealed(peers, "accuse", {"accusations": [], "missing": 5, "missing_prev": [],
                                                       "echo": []}), "needs 'missing' as list, got int"),
        (lambda wire, peers: _sealed(peers, "accuse", {"accusations": [], "missing": [7], "missing_prev": [],
                                                       "echo": []}), "ids"),
        (lambda wire, peers: _sealed(peers, "commit", {**COMMIT, "hashes": [b"short"]}), "32-byte"),
        (lambda wire, peers: _sealed(peers, "check", {"s": [["1"]], "nu": [1.0]}), "numbers"),
        (lambda wire, peers: _sealed(peers, "check", {"s": [1.0], "nu": [1.0]}), "along each direction"),
    ],
    ids=["garbage", "forged", "other-run", "stranger", "no-data", "missing-not-a-list", "missing-not-ids",
         "short-hash", "text-projection", "flat-projections"],
)  # fmt: skip
def test_receive_refuses_bad_messages_with_a_reason(mutate, reason):
    """Refused on arrival with the reason (the sender's call fails with it); a good message still gets in."""
    peers = make_peers(["none"] * 3)
    envelope = peers["peer1"].signer.seal(run="test", sender="peer1", kind="commit", step=0, body=COMMIT)
    with pytest.raises(ValueError, match=reason):
        asyncio.run(peers["peer0"].receive(mutate(envelope.to_wire(), peers)))
    assert peers["peer0"].refused == 1
    asyncio.run(peers["peer0"].receive(envelope.to_wire()))  # a good message still gets in
    assert peers["peer0"].mailbox.get(0, "commit", "peer1") == envelope


COMMIT = {"hashes": [bytes(32)] * 3, "seed_commitment": bytes(32), "state": bytes(32)}


def _sealed(peers, kind: str, body: dict) -> bytes:
    return peers["peer1"].signer.seal(run="test", sender="peer1", kind=kind, step=0, body=body).to_wire()


def test_a_large_message_is_screened_by_its_signed_header_before_its_body():
    """The header and signature lead a message's bytes: a receiver reads them from the first bytes of a stream and
    refuses a message that is not a run peer's before holding its body."""
    peers = make_peers(["none"] * 3)
    envelope = peers["peer1"].signer.seal(run="test", sender="peer1", kind="part", step=0, body={"data": bytes(10**6)})
    wire = envelope.to_wire()
    assert Envelope.signed_prefix(wire[:20]) is None  # not all there yet
    assert Envelope.signed_prefix(wire[:2000]) == envelope.proof
    peers["peer0"].screen(envelope.proof)  # a run peer's, signed: goes on
    strangers = [
        (Signer().seal(run="test", sender="peer1", kind="part", step=0, body={}), "not signed by peer1"),
        (Signer().seal(run="test", sender="mallory", kind="part", step=0, body={}), "not a peer of run"),
        (peers["peer1"].signer.seal(run="other", sender="peer1", kind="part", step=0, body={}), "for run 'other'"),
        (peers["peer1"].signer.seal(run="test", sender="peer1", kind="part", step=9, body={}), "outside"),
    ]
    for stranger, reason in strangers:
        with pytest.raises(ValueError, match=reason):
            peers["peer0"].screen(Envelope.signed_prefix(stranger.to_wire()))
    assert peers["peer0"].refused == len(strangers)
    garbage_cases = [(b"\x92\x01\x02", "an envelope is"), (b"\x93\x01\xc4\x01x", "a header is"), (b"\x01", "type")]
    for garbage, reason in garbage_cases:
        with pytest.raises(ValueError, match=reason):
            Envelope.signed_prefix(garbage)


def test_receive_refuses_a_step_far_ahead():
    peers = make_peers(["none"] * 3)
    envelope = peers["peer1"].signer.seal(run="test", sender="peer1", kind="commit", step=50, body={})
    with pytest.raises(ValueError, match="outside"):
        asyncio.run(peers["peer0"].receive(envelope.to_wire()))


def test_behaviour_flags_parse_and_refuse_mistakes():
    behaviour = Behaviour.parse("sign_flip@20,wrong_aggregate@40,silent")
    assert behaviour.gradient.kind == "sign_flip" and behaviour.gradient.start_step == 20
    assert behaviour.does("wrong_aggregate", 40) and not behaviour.does("wrong_aggregate", 39)
    assert behaviour.does("silent", 0) and Behaviour.parse("none").honest
    with pytest.raises(ValueError, match="unknown attack"):
        Behaviour.parse("teleport@3")
    with pytest.raises(ValueError, match="at most one gradient attack"):
        Behaviour.parse("sign_flip,ipm")
    with pytest.raises(ValueError, match="must be an integer"):
        Behaviour.parse("ipm@soon")
