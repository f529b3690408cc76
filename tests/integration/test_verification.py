"""Servers that return plausible but wrong values (correct shape, finite) are caught by verification.

Each swarm has honest servers 0:3 (two) and 3:6, and a liar on 0:3 that claims to be the fastest, so every route
starts with it: noise of 1 % of its outputs' norm, another block's weights, honest for 5 computations then lying, or
lying to the first client only (honest with the next). A client with ``verify=1`` checks every answer on a second
server of the same blocks and settles disagreements with a third: the liar is caught and never used again, no honest
server is blamed, and greedy tokens and gradients still equal local transformers. With ``verify=0.3`` a sampled check
covers every step since the previous one, so the liar is caught within a few steps.

The liar signs its answers (as a real one would), so the first client that catches it publishes a proof to the DHT;
a later client that verifies nothing itself reads that proof, recomputes the one answer from its own copy of the
weights, and never uses the liar. A false proof (an honest server's right answer, "reported") is recognised as such.
The tests that show a client catching the liar by itself turn reading proofs off (``check_proofs=False``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.algorithms.routing import RouteHop
from corolla.client.span_calls import SpanCallInputs, call_forward
from corolla.local_swarm import LocalSwarm, wait_for
from corolla.net.loop import run_sync
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

HOSTILE = str(Path(__file__).parents[1] / "fixtures" / "hostile_server.py")
HONEST = ("server0", "server1", "server2")


@pytest.fixture(scope="module", params=["noise", "other-weights", "after-5", "one-client"])
def swarm(request, tmp_path_factory):
    path = str(zoo_checkpoint("llama"))
    logs = tmp_path_factory.mktemp(f"logs-{request.param}")
    args = ["--throughput", "100", "--update-period", "2"]
    with LocalSwarm(model=path, spans=["0:3", "3:6", "0:3"], server_args=args, log_dir=logs) as s:
        s.start_server("liar", ["--blocks", "0:3", "--throughput", "1000000"], entry=[HOSTILE, request.param])
        s.wait_until_served(min_servers=4)
        yield request.param, path, s


@pytest.fixture(scope="module")
def local():
    return AutoModelForCausalLM.from_pretrained(str(zoo_checkpoint("llama"))).eval()


def _client(path, s, **kwargs):
    kwargs = {"check_proofs": False} | kwargs  # by default a client catches the liar by itself
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=s.initial_peers, seed=0, **kwargs)


def _published(model) -> None:
    """Wait until the client's proof against the liar is stored in the DHT (it is stored in the background)."""
    reports = model.remote_blocks.swarm.lie_reports
    wait_for(lambda: reports.stats.published >= 1, timeout_s=20, what="the proof to be published")


def _caught_only_the_liar(model, s) -> None:
    swarm = model.remote_blocks.swarm
    assert set(swarm.distrusted()) == {s.peer_ids["liar"]}, swarm.distrusted()
    assert not {s.peer_ids[name] for name in HONEST} & swarm.banned()
    assert swarm.verifier.stats.liars == 1 and swarm.verifier.stats.undecided == 0


def test_every_step_checked_gives_exact_tokens_and_catches_the_liar(swarm, local):
    mode, path, s = swarm
    model = _client(path, s, verify=1.0)
    try:
        ids = torch.randint(4, 400, (1, 8), generator=torch.Generator().manual_seed(0))
        expected = local.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        with model.inference_session(max_length=18) as session:
            got = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, session=session)
            assert s.peer_ids["liar"] not in {hop.peer_id for hop in session.route}
        assert torch.equal(got, expected)
        _caught_only_the_liar(model, s)
        _published(model)
    finally:
        model.shutdown()


def test_a_client_that_checks_nothing_avoids_the_liar_from_the_published_proof(swarm, local):
    mode, path, s = swarm
    model = _client(path, s, check_proofs=True)  # verify=0: it compares nothing with other servers
    try:
        swarm_view = model.remote_blocks.swarm
        assert set(swarm_view.distrusted()) == {s.peer_ids["liar"]}, swarm_view.distrusted()
        assert swarm_view.lie_reports.stats.proven == 1 and swarm_view.lie_reports.stats.false == 0
        ids = torch.randint(4, 400, (1, 8), generator=torch.Generator().manual_seed(3))
        expected = local.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with model.inference_session(max_length=14) as session:
            got = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, session=session)
            assert s.peer_ids["liar"] not in {hop.peer_id for hop in session.route}
        assert torch.equal(got, expected)
    finally:
        model.shutdown()


def test_a_false_proof_against_an_honest_server_is_recognised(swarm, local):
    mode, path, s = swarm
    if mode != "noise":
        pytest.skip("the liar does not matter here")
    reporter = _client(path, s, verify=1.0)  # a hostile client: it "reports" an honest server's right answer
    try:
        honest = s.peer_ids["server0"]
        hidden = local.get_input_embeddings()(torch.randint(4, 400, (1, 6))).detach()
        evidence = []
        call = call_forward(
            reporter.remote_blocks.swarm,
            RouteHop(peer_id=honest, start=0, end=3),
            hidden,
            SpanCallInputs(),
            evidence=evidence,
        )
        run_sync(call, timeout_s=30)
        reporter.remote_blocks.swarm.report_lie(evidence[0].proof())
        _published(reporter)
    finally:
        reporter.shutdown()
    model = _client(path, s, check_proofs=True)
    try:
        reports = model.remote_blocks.swarm.lie_reports
        assert reports.stats.false == 1 and reports.stats.proven == 1  # the false proof, and the first client's
        assert set(model.remote_blocks.swarm.distrusted()) == {s.peer_ids["liar"]}
    finally:
        model.shutdown()


def test_checked_forward_and_backward_give_exact_gradients(swarm, local):
    mode, path, s = swarm
    if mode == "after-5":
        pytest.skip("honest for its first computations: the forward passes here are among them")
    model = _client(path, s, verify=1.0)
    try:
        ids = torch.randint(4, 400, (2, 10), generator=torch.Generator().manual_seed(1))
        embeds = local.get_input_embeddings()(ids).detach()
        remote, expected = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
        logits = model(inputs_embeds=remote).logits
        torch.testing.assert_close(logits, local(inputs_embeds=expected).logits, atol=1e-4, rtol=1e-4)
        logits.square().mean().backward()
        local(inputs_embeds=expected).logits.square().mean().backward()
        torch.testing.assert_close(remote.grad, expected.grad, atol=1e-5, rtol=1e-4)
        if mode == "one-client":  # it lies to the first client (the previous test's) only: honest with this one
            assert not model.remote_blocks.swarm.distrusted() and model.remote_blocks.swarm.verifier.stats.checks
        else:
            _caught_only_the_liar(model, s)
    finally:
        model.shutdown()


def test_sampled_checks_cover_the_steps_between_them(swarm, local):
    mode, path, s = swarm
    if mode != "noise":
        pytest.skip("one liar is enough to show windowed checks")
    model = _client(path, s, verify=0.3)
    try:
        ids = torch.randint(4, 400, (1, 8), generator=torch.Generator().manual_seed(2))
        model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        stats = model.remote_blocks.swarm.verifier.stats
        assert 1 <= stats.checks < 17  # not every step was checked, yet the liar was caught
        _caught_only_the_liar(model, s)
    finally:
        model.shutdown()


def test_speculative_steps_are_checked_too(swarm, local):
    """Prompt lookup with sampled checks: a check's window may start inside a step whose guesses were partly
    rejected (the client's history, the checked answers and the shadow's cache are all cut back); the tokens stay
    exact and the liar is caught."""
    mode, path, s = swarm
    if mode != "noise":
        pytest.skip("one liar is enough")
    model = _client(path, s, verify=0.5)
    try:
        pattern = torch.randint(4, 400, (1, 5), generator=torch.Generator().manual_seed(12))
        ids = torch.cat([pattern, pattern, pattern[:, :3]], dim=1)
        kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
        expected = local.generate(ids, **kwargs)
        with model.inference_session(max_length=ids.shape[1] + 20) as session:
            got = model.generate(ids, session=session, prompt_lookup_num_tokens=4, **kwargs)
            assert session.dropped_tokens > 0 and session.steps < 20
        assert torch.equal(got, expected)
        _caught_only_the_liar(model, s)
    finally:
        model.shutdown()
