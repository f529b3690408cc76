"""Client behaviour over a real loopback swarm: big payloads, wire compression, CLI, and actionable errors."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.errors import SwarmConnectionError
from corolla.local_swarm import LocalSwarm
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    path = str(zoo_checkpoint("llama"))
    args = [
        "--throughput",
        "100",
        "--max-batch-tokens",
        "32768",
        "--compute-chunk-tokens",
        "4096",
        "--update-period",
        "2",
    ]
    with LocalSwarm(model=path, spans=["0:4", "4:6"], server_args=args, log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield path, s


def test_payload_over_the_unary_limit_is_streamed_and_computed_in_chunks(swarm):
    """One sub-batch of 20,480 tokens (5 MiB): forward and backward go over the streaming RPCs, and the server
    computes it in chunks of --compute-chunk-tokens; results equal small unary sub-batches computed whole."""
    from corolla.net.faults import FaultPlan, FaultyTransport

    streamed = []

    def record(call):  # a fault plan that injects nothing: it only sees which RPCs the client calls
        if call.rpc.endswith("_stream") and call.message == 0:
            streamed.append(call.rpc)

    plan = FaultPlan(record)
    path, s = swarm
    big = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=s.initial_peers, sub_batch_tokens=32768)
    small = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=s.initial_peers)
    try:
        hidden = torch.randn(80, 256, big.config.hidden_size, generator=torch.Generator().manual_seed(0))
        assert hidden.numel() * 4 > 4 * 2**20  # bigger than the transport accepts in one unary message
        grad_out = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
        results = {}
        for name, model in (("big", big), ("small", small)):
            model.remote_blocks.swarm.wrap_transport(lambda transport: FaultyTransport(transport, plan))
            streamed.clear()
            x = hidden.clone().requires_grad_()
            out = model.remote_blocks(x)
            out.backward(grad_out)
            results[name] = (out.detach(), x.grad, len(streamed))
        # 2 spans x (forward + backward), each one streamed call; the small sub-batches never stream
        assert results["big"][2] == 4, streamed
        assert results["small"][2] == 0
        torch.testing.assert_close(results["big"][0], results["small"][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results["big"][1], results["small"][1], atol=1e-5, rtol=1e-5)
    finally:
        big.shutdown()
        small.shutdown()


@pytest.mark.parametrize(("compression", "atol"), [("FLOAT16", 2e-2), ("UNIFORM_8BIT", 0.5), ("QUANTILE_8BIT", 0.5)])
def test_compressed_activations_stay_close(swarm, compression, atol):
    path, s = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=s.initial_peers, compression=compression
    )
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    try:
        ids = torch.randint(4, 400, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            error = (model(ids).logits - local(ids).logits).abs().max().item()
        assert 0 < error < atol, f"{compression}: max logit error {error}"
        assert model.generate(ids[:1], max_new_tokens=4, do_sample=False).shape == (1, 16)
    finally:
        model.shutdown()


@pytest.mark.timeout(120)  # reported, not hung: connect_timeout_s bounds the wait
def test_unreachable_initial_peer_is_reported_quickly():
    path = str(zoo_checkpoint("llama"))
    bogus = "/ip4/127.0.0.1/tcp/9/p2p/QmWrongPeerIdWrongPeerIdWrongPeerIdWrongPeerId12"
    with pytest.raises(SwarmConnectionError, match="Check the addresses"):  # within pytest-timeout, not hanging
        AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[bogus], connect_timeout_s=5)


def test_generate_command_streams_text(swarm):
    """``corolla generate`` streams the text; with a local draft model (speculative decoding) the text is the same."""
    path, s = swarm

    def generate(*extra: str) -> subprocess.CompletedProcess:
        args = ["generate", path, "--initial-peers", *s.initial_peers, "--prompt", "the quick brown fox"]
        return subprocess.run(
            [sys.executable, "-m", "corolla.cli.main", *args, "--max-new-tokens", "8", *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )

    result = generate()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("the quick brown fox") and len(result.stdout) > len("the quick brown fox")
    assert "Route:" not in result.stderr, "route logs interleave with the text unless --verbose"
    drafted = generate("--draft-model", path)  # the same weights as the draft: every guess is accepted
    assert drafted.returncode == 0, drafted.stderr[-2000:]
    assert drafted.stdout == result.stdout


@pytest.mark.parametrize(
    "command", ["serve", "dht", "generate", "chat", "demo", "stage", "train", "btard", "api", "monitor"]
)
def test_every_command_has_help(command):
    result = subprocess.run(
        [sys.executable, "-m", "corolla.cli.main", command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "usage: corolla" in result.stdout
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.stdout).split())  # tyro draws boxes around the flags
    assert not re.search(r"\(default: [^()]*\) \(default:", text), "a default shown twice"
    assert "--" in text and "Traceback" not in result.stderr


def test_latency_measurements_feed_routing(swarm):
    """The client pings servers; servers publish their pings to the servers that follow them in a chain."""
    from corolla.local_swarm import wait_for

    path, s = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=s.initial_peers)
    try:
        view = model.remote_blocks.swarm
        assert set(view.rtt.rtts) == {p.to_base58() for p in view.servers}
        assert all(math.isfinite(rtt) and rtt > 0 for rtt in view.rtt.rtts.values())  # measured, not defaults

        def first_server_pinged_the_second() -> bool:
            view.refresh()
            by_start = {info.start_block: (peer.to_base58(), info) for peer, info in view.servers.items()}
            return by_start[4][0] in by_start[0][1].next_pings

        wait_for(first_server_pinged_the_second, timeout_s=60, what="a published ping to the next server", poll_s=1)
    finally:
        model.shutdown()


PING_DELAY_S = 1.0  # under the client's ping timeout (2 s), so the delayed pings are measured, not dropped


def test_measured_pings_change_the_route(tmp_path):
    """Two servers of all blocks: "fast" computes a step 50x faster than "slow", so with loopback pings the client
    routes through it. Once every call to "fast" is delayed (the client's ping RPC included, as a far-away server's
    would be) and the client has measured that, the same records give the other route, and a generation really
    runs through "slow" (tokens still exact)."""
    from corolla.net.faults import Delay, FaultPlan, FaultyTransport

    path = str(zoo_checkpoint("llama"))
    # per step: 6 blocks / 1000 rps = 0.006 s on "fast", 6 / 20 = 0.3 s on "slow"
    with LocalSwarm(model=path, log_dir=tmp_path / "logs") as s:
        s.start_server("fast", ["--blocks", "0:6", "--throughput", "1000"])
        s.start_server("slow", ["--blocks", "0:6", "--throughput", "20"])
        s.wait_until_served(min_servers=2)
        fast, slow = s.peer_ids["fast"], s.peer_ids["slow"]
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=s.initial_peers)
        try:
            view = model.remote_blocks.swarm
            assert {fast, slow} <= set(view.rtt.rtts)  # both measured at connect, without delays
            assert [hop.peer_id for hop in view.inference_route(0, 6)] == [fast]
            plan = FaultPlan(lambda call: Delay(PING_DELAY_S) if call.peer_id == fast else None)
            view.wrap_transport(lambda transport: FaultyTransport(transport, plan))
            for _ in range(3):  # the RTTs are moving averages: a few delayed measurements move "fast"'s enough
                view.refresh()
            assert sum(call.rpc == "info" for call, _ in plan.injected) == 3  # the pings were the delayed calls
            assert [hop.peer_id for hop in view.inference_route(0, 6)] == [slow]
            ids = torch.randint(4, 400, (1, 5), generator=torch.Generator().manual_seed(4))
            with model.inference_session(max_length=ids.shape[1] + 4) as session:
                out = model.generate(ids, session=session, max_new_tokens=4, min_new_tokens=4, do_sample=False)
                assert [hop.peer_id for hop in session.route] == [slow]
            local = AutoModelForCausalLM.from_pretrained(path).eval()
            expected = local.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert out.tolist() == expected.tolist()
        finally:
            model.shutdown()


def test_chat_command_keeps_one_session(swarm):
    path, s = swarm
    result = subprocess.run(
        [sys.executable, "-m", "corolla.cli.main", "chat", path, "--initial-peers", *s.initial_peers,
         "--max-new-tokens", "4", "--max-length", "256", "--verbose"],
        input="hello there\nand again\n\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("model> ") == 2
    assert result.stderr.count("Route:") == 1  # both turns ran in one session over one chain


def test_servers_announce_their_model_in_the_registry(swarm):
    """Every server announces the model it serves under the registry key, signed by itself: the monitor and the API
    find the swarm's models there."""
    from corolla.net.dht_records import fetch_models

    path, s = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=s.initial_peers)
    try:
        view = model.remote_blocks.swarm
        models = fetch_models(view.dht)
        assert list(models) == [path]
        announcers = {peer for peer, _ in models[path]}
        assert announcers == set(view.servers)  # each serving peer, and nobody else, announces it
        entry = models[path][0][1]
        assert (entry.num_blocks, entry.model_type, entry.dht_prefix) == (6, "llama", view.dht_prefix)
    finally:
        model.shutdown()
