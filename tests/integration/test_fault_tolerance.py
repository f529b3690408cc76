"""Inference sessions survive servers that die, hang or leave: same tokens as an uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.local_swarm import LocalSwarm
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NEW_TOKENS = 40
FAIL_AFTER = 10


class _AfterTokens:
    """A streamer that calls ``action`` once, after ``count`` generated tokens."""

    def __init__(self, count: int, action):
        self.count, self.action, self.seen = count, action, -1  # the first put() is the prompt

    def put(self, value):
        self.seen += 1
        if self.seen == self.count:
            self.action()

    def end(self):
        pass


def _server_on_block(session, swarm: LocalSwarm, block: int) -> str:
    hop = next(hop for hop in session.route if hop.start <= block < hop.end)
    return swarm.name_of(hop.peer_id)


@pytest.fixture(scope="module")
def reference():
    path = str(zoo_checkpoint("llama"))
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(4, 400, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = local.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return path, ids, expected


def _swarm(path, spans, tmp_path, spare=()):
    swarm = LocalSwarm(model=path, spans=spans, server_args=["--throughput", "100"], log_dir=tmp_path / "logs")
    swarm.__enter__()
    for i, span in enumerate(spare):
        swarm.start_server(f"spare{i}", ["--blocks", span])
    swarm.wait_until_served(min_servers=len(spans) + len(spare))
    return swarm


def _generate_with_fault(model, swarm, ids, block: int, sig: int, when: int = FAIL_AFTER):
    victim = []

    def fail():
        name = _server_on_block(session, swarm, block)
        victim.append(name)
        swarm.kill(name, sig)

    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        out = model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            session=session,
            streamer=_AfterTokens(when, fail),
        )
        chain = [swarm.name_of(hop.peer_id) for hop in session.route]
    return out, victim, chain


@pytest.mark.parametrize(
    ("spare", "sig"),
    [(["2:4"], signal.SIGKILL), (["2:3", "3:4"], signal.SIGKILL), (["2:4"], signal.SIGTERM)],
    ids=["sigkill", "sigkill-two-pieces", "sigterm"],
)
def test_middle_server_dies_mid_generation(reference, tmp_path, spare, sig):
    path, ids, expected = reference
    swarm = _swarm(path, ["0:2", "2:4", "4:6"], tmp_path, spare=spare)
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        out, victim, chain = _generate_with_fault(model, swarm, ids, block=2, sig=sig)
        assert victim, "the fault was never injected"
        assert out.tolist() == expected.tolist()
        assert victim[0] not in chain, "the session still routes through the failed server"
        model.shutdown()
    finally:
        swarm.stop()


def test_server_dies_during_speculative_generation(reference, tmp_path):
    """Prompt lookup: steps carry guesses, the rejected ones are dropped from the servers' caches and from what the
    client keeps for replay. A server killed after a rejection: its replacement is rebuilt from the accepted tokens
    only, and the output stays exact."""
    path, _, _ = reference
    pattern = torch.randint(4, 400, (1, 5), generator=torch.Generator().manual_seed(12))
    ids = torch.cat([pattern, pattern, pattern[:, :3]], dim=1)  # prompt lookup guesses (wrongly) at once
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    expected = local.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    swarm = _swarm(path, ["0:2", "2:4", "4:6"], tmp_path, spare=["2:4"])
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        victim, rejected_at = [], []

        class KillAfterARejection:
            """Kills the server of block 2 two steps after the first rejection, so that the rejected guesses lie
            inside the history the replacement is rebuilt from (at its end, the next step's rewind would hide them)."""

            def put(self, value):
                if not rejected_at and session.dropped_tokens > 0:
                    rejected_at.append(session.steps)
                if not victim and rejected_at and session.steps >= rejected_at[0] + 2:
                    victim.append(_server_on_block(session, swarm, 2))
                    swarm.kill(victim[0], signal.SIGKILL)

            def end(self):
                pass

        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            out = model.generate(
                ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, session=session,
                streamer=KillAfterARejection(), prompt_lookup_num_tokens=4,
            )  # fmt: skip
            chain = [swarm.name_of(hop.peer_id) for hop in session.route]
        assert victim, "no guess was rejected, so the fault was never injected"
        assert out.tolist() == expected.tolist()
        assert victim[0] not in chain
        model.shutdown()
    finally:
        swarm.stop()


def test_frozen_server_times_out_and_is_replaced(reference, tmp_path):
    path, ids, expected = reference
    swarm = _swarm(path, ["0:2", "2:4", "4:6"], tmp_path, spare=["2:4"])
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, step_timeout_s=3.0
        )
        out, victim, _ = _generate_with_fault(model, swarm, ids, block=2, sig=signal.SIGSTOP)
        assert victim and out.tolist() == expected.tolist()
        model.shutdown()
    finally:
        swarm.stop()


def test_failure_during_prefill_and_in_a_chat_session(reference, tmp_path):
    path, ids, _ = reference
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    swarm = _swarm(path, ["0:3", "3:6"], tmp_path, spare=["0:3", "3:6"])
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        with model.inference_session(max_length=128) as session:
            # the first step (prefill) goes to a chain, then that chain's first server dies before it answers
            model.remote_blocks.swarm.refresh()
            route = model.remote_blocks.swarm.inference_route(0, 6)
            swarm.kill(swarm.name_of(route[0].peer_id), signal.SIGKILL)
            first = model.generate(ids, max_new_tokens=6, do_sample=False, session=session)
            banned = model.remote_blocks.swarm.banned()
            assert route[0].peer_id in banned  # the prefill really went to the dead server and was recovered
            # second turn of the chat: the server now serving blocks 3:6 dies before the turn starts
            victim = _server_on_block(session, swarm, 3)
            swarm.kill(victim, signal.SIGKILL)
            turn2 = torch.tensor([[17, 18, 19]])
            second = model.generate(turn2, max_new_tokens=6, do_sample=False, session=session)
            assert swarm.peer_ids[victim] in model.remote_blocks.swarm.banned()
        expected_first = local.generate(ids, max_new_tokens=6, do_sample=False)
        history = torch.cat([expected_first, turn2], dim=1)
        expected_second = local.generate(history, max_new_tokens=6, do_sample=False)[:, expected_first.shape[1] :]
        assert first.tolist() == expected_first.tolist()
        assert second.tolist() == expected_second.tolist()
        model.shutdown()
    finally:
        swarm.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_failed_server_is_used_again_after_its_ban(reference, tmp_path):
    import math

    from hivemind.p2p import PeerID

    from corolla.local_swarm import wait_for
    from corolla.net.loop import run_sync

    path, ids, expected = reference
    swarm = LocalSwarm(model=path, server_args=["--throughput", "100"], log_dir=tmp_path / "logs")
    addresses = {name: ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{_free_port()}"] for name in ("a", "b")}
    try:
        swarm.start_bootstrap()
        for name, address in addresses.items():  # fixed ports, as a real server that restarts would have
            swarm.start_server(name, ["--blocks", "0:6", *address])
        swarm.wait_until_served(min_servers=2)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, ban_timeout_s=1.0
        )
        out, first_victim, _ = _generate_with_fault(model, swarm, ids, block=0, sig=signal.SIGKILL)
        assert out.tolist() == expected.tolist()
        (name,) = first_victim
        swarm.processes[name].wait(timeout=30)
        swarm.start_server(name, ["--blocks", "0:6", *addresses[name]])  # same identity and address: same peer
        swarm.wait_until_served(min_servers=2)
        view = model.remote_blocks.swarm
        peer = PeerID.from_base58(swarm.peer_ids[name])

        def reachable() -> bool:  # the client's transport may hold off re-dialling a peer that failed recently
            return math.isfinite(run_sync(_ping_via(view, peer), timeout_s=10))

        wait_for(reachable, timeout_s=120, what="the restarted server to be reachable again", poll_s=1)
        # a server of the chain dies again: either way the restarted server serves this session at some point
        out, second_victim, chain = _generate_with_fault(model, swarm, ids, block=0, sig=signal.SIGKILL)
        assert name in second_victim + chain
        assert out.tolist() == expected.tolist()
        model.shutdown()
    finally:
        swarm.stop()


async def _ping_via(view, peer):
    from corolla.net.ping import ping

    return await ping(await view.transport(), peer, timeout_s=3)


def _remote_blocks_node(output: torch.Tensor):
    """The autograd node of the RemoteSequential call that produced ``output`` (it holds the forward's route)."""
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "records"):
            return node
        stack.extend(next_node for next_node, _ in node.next_functions)
    raise AssertionError("no RemoteSequential call in the autograd graph")


@pytest.mark.parametrize("spare", [["2:4"], ["2:3", "3:4"]], ids=["spare", "spare-in-two-pieces"])
def test_server_dies_between_forward_and_backward(reference, tmp_path, spare):
    """Training: the server that ran a span's forward is SIGKILLed before backward; the span's backward is redone
    elsewhere (recomputing intermediate inputs when the replacement comes in pieces) and gradients are exact."""
    from tests.fixtures.prompted import prompted_forward

    path, _, _ = reference
    swarm = _swarm(path, ["0:2", "2:4", "4:6"], tmp_path, spare=spare)
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, tuning_mode="ptune", pre_seq_len=2
        )
        local = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
        prefix = model.prompt_tuning.prompt_embeddings.detach().clone().requires_grad_(True)
        ids = torch.randint(4, 400, (2, 9), generator=torch.Generator().manual_seed(5))
        mask = torch.ones_like(ids)

        logits = model(input_ids=ids, attention_mask=mask).logits
        hops = [hop for _, records in _remote_blocks_node(logits).records for hop, _ in records]
        victim = swarm.name_of(next(hop.peer_id for hop in hops if hop.start <= 2 < hop.end))
        swarm.kill(victim, signal.SIGKILL)
        logits.float().logsumexp(-1).mean().backward()

        expected = prompted_forward(local, ids, mask, prefix).logits[:, 2:]
        expected.float().logsumexp(-1).mean().backward()
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.prompt_tuning.prompt_embeddings.grad, prefix.grad, atol=1e-5, rtol=1e-4)
        assert victim in {swarm.name_of(p) for p in model.remote_blocks.swarm.banned()}
        model.shutdown()
    finally:
        swarm.stop()


def test_many_random_failures_keep_tokens_exact(reference, tmp_path):
    """Streams fail at random (seeded) all along a generation with push on, two servers per span: every failure
    is recovered by replay, and answers that servers computed from pushes of replaced servers are not mistaken
    for the answers to the replayed steps."""
    import random

    from corolla.net.faults import Close, FaultPlan, FaultyTransport

    path, ids, expected = reference
    swarm = _swarm(path, ["0:2", "2:4", "4:6"], tmp_path, spare=["0:2", "2:4", "4:6"])
    rng = random.Random(3)
    # the client's stream closes before an answer arrives: the server really drops the session and its cache
    plan = FaultPlan(lambda call: Close() if call.rpc == "inference" and rng.random() < 0.08 else None)
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, ban_timeout_s=0.5, max_retries=5
        )
        model.remote_blocks.swarm.wrap_transport(lambda transport: FaultyTransport(transport, plan))
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert len(plan.injected) >= 5
        assert out.tolist() == expected.tolist()
        model.shutdown()
    finally:
        swarm.stop()


STUCK = str(Path(__file__).parents[1] / "fixtures" / "stuck_in_compute.py")


def test_server_killed_while_it_computes_a_step(reference, tmp_path):
    """Both servers of blocks 2:4 can be caught inside a decode step (``tests/fixtures/stuck_in_compute.py``): the
    one the session uses is SIGKILLed while its compute thread is in the middle of the step's forward; the client
    recovers through the other one and the tokens equal transformers'."""
    import threading

    from corolla.local_swarm import wait_for

    path, ids, expected = reference
    folder = tmp_path / "stuck"
    folder.mkdir()
    position = ids.shape[1] + FAIL_AFTER
    swarm = LocalSwarm(model=path, server_args=["--throughput", "100"], log_dir=tmp_path / "logs")
    try:
        swarm.start_bootstrap()
        swarm.start_server("first", ["--blocks", "0:2"])
        swarm.start_server("last", ["--blocks", "4:6"])
        for name in ("middle", "spare"):
            swarm.start_server(name, ["--blocks", "2:4"], entry=[STUCK, str(folder), str(position)])
        swarm.wait_until_served(min_servers=4)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        pids = {process.pid: name for name, process in swarm.processes.items()}
        killed: list[str] = []

        def kill_the_computing_server():
            def computing():
                return next(folder.glob("computing-*"), None)

            wait_for(lambda: computing() is not None, timeout_s=120, what="a server inside a decode step")
            killed.append(pids[int(computing().name.split("-")[1])])  # KeyError: not a server of ours
            swarm.kill(killed[0], signal.SIGKILL)

        (folder / "armed").touch()
        killer = threading.Thread(target=kill_the_computing_server, daemon=True)
        killer.start()
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            out = model.generate(
                ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, session=session
            )
            chain = [swarm.name_of(hop.peer_id) for hop in session.route]
        killer.join(timeout=30)
        assert killed and killed[0] in ("middle", "spare")
        assert swarm.processes[killed[0]].wait(timeout=30) == -signal.SIGKILL  # by our SIGKILL, mid-step
        assert out.tolist() == expected.tolist()
        assert killed[0] not in chain and {"middle", "spare"} & set(chain), chain
        assert swarm.peer_ids[killed[0]] in model.remote_blocks.swarm.banned()
        model.shutdown()
    finally:
        swarm.stop()
