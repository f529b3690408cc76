"""Server-side LoRA adapters end to end: ``corolla serve --adapters`` and a client's ``active_adapter``.

Two servers (blocks 0:3 and 3:6) hold a random PEFT LoRA adapter; a third, faster server holds all blocks and no
adapter, so routing prefers it unless the adapter is selected. With the adapter, distributed generation and logits
equal PEFT's merged model run locally; without it, the base model.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.algorithms.routing import RouteHop
from corolla.client.span_calls import SpanCallInputs, call_forward
from corolla.errors import MissingAdapterError
from corolla.local_swarm import LocalSwarm
from corolla.net.loop import run_sync
from tests.fixtures.adapters import make_adapter, merged_model
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ADAPTER = "tiny-lora"  # the adapter folder's name, which servers announce


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(zoo_checkpoint("llama"))
    adapter = make_adapter(path, tmp_path_factory.mktemp("adapter") / ADAPTER, seed=11)
    logs = tmp_path_factory.mktemp("logs-adapters")
    with LocalSwarm(model=path, log_dir=logs) as swarm:
        adapters = ["--adapters", str(adapter), "--throughput", "100"]
        swarm.start_server("lora0", ["--blocks", "0:3", *adapters])
        swarm.start_server("lora1", ["--blocks", "3:6", *adapters])
        swarm.start_server("plain", ["--blocks", "0:6", "--throughput", "1000"])
        swarm.wait_until_served(min_servers=3)
        with_adapter = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, active_adapter=ADAPTER
        )
        base = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        locals_ = {
            "merged": merged_model(path, adapter),
            "base": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
        }
        yield swarm, with_adapter, base, locals_
        with_adapter.shutdown()
        base.shutdown()


def _ids(seed: int, shape=(1, 7)) -> torch.Tensor:
    return torch.randint(4, 400, shape, generator=torch.Generator().manual_seed(seed))


def test_generation_with_adapter_equals_merged_model(setup):
    _, model, _, local = setup
    ids = _ids(1)
    expected = local["merged"].generate(ids, max_new_tokens=16, do_sample=False)
    assert model.generate(ids, max_new_tokens=16, do_sample=False).tolist() == expected.tolist()
    base_tokens = local["base"].generate(ids, max_new_tokens=16, do_sample=False)
    assert expected.tolist() != base_tokens.tolist()  # the adapter does change the output


def test_logits_and_gradients_with_adapter_equal_merged_model(setup):
    _, model, _, local = setup
    ids = _ids(2, (2, 8))
    with torch.no_grad():
        expected = local["merged"](input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    embeds = local["merged"].get_input_embeddings()(ids).detach()
    grads = []
    for run in (local["merged"], model, local["base"]):
        x = embeds.clone().requires_grad_(True)
        run(inputs_embeds=x).logits[:, -1].log_softmax(-1)[:, :8].sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)  # backward passes use the adapter too
    assert (grads[2] - grads[0]).abs().max() > 1e-2


def test_without_adapter_equals_base_model(setup):
    _, _, base, local = setup
    ids = _ids(3)
    expected = local["base"].generate(ids, max_new_tokens=12, do_sample=False)
    assert base.generate(ids, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()
    with torch.no_grad():
        torch.testing.assert_close(
            base(input_ids=ids).logits, local["base"](input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_routes_use_only_servers_holding_the_adapter(setup):
    swarm, model, base, _ = setup
    holders = {swarm.peer_ids["lora0"], swarm.peer_ids["lora1"]}
    view = model.remote_blocks.swarm
    assert {hop.peer_id for hop in view.inference_route(0, 6)} == holders
    for _ in range(10):
        assert {hop.peer_id for hop in view.forward_route(0, 6, model.remote_blocks._rng)} <= holders
    # without the adapter, the faster server holding all blocks wins: the filter is what keeps it out
    assert [hop.peer_id for hop in base.remote_blocks.swarm.inference_route(0, 6)] == [swarm.peer_ids["plain"]]
    assert set(view.servers[p].adapters for p in view.servers if p.to_base58() in holders) == {(ADAPTER,)}


def test_unknown_adapter_fails_clearly(setup):
    swarm, model, _, _ = setup
    path = str(zoo_checkpoint("llama"))
    other = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=swarm.initial_peers, active_adapter="no-such-adapter"
    )
    try:
        with pytest.raises(MissingAdapterError, match=f"no-such-adapter.*{ADAPTER}.*--adapters"):
            other.generate(_ids(4), max_new_tokens=2)
        with pytest.raises(MissingAdapterError, match="no-such-adapter"):
            other(input_ids=_ids(4))
        # a server asked directly for an adapter it does not hold refuses, naming the ones it has
        hop = RouteHop(peer_id=swarm.peer_ids["lora0"], start=0, end=3)
        hidden = torch.zeros(1, 2, 64)
        with pytest.raises(Exception, match=f"does not hold adapter 'no-such-adapter'.*'{ADAPTER}'"):
            run_sync(call_forward(other.remote_blocks.swarm, hop, hidden, SpanCallInputs()), timeout_s=30)
    finally:
        other.shutdown()


def test_bad_adapter_stops_the_server_at_startup(tmp_path):
    path = str(zoo_checkpoint("llama"))
    folder = tmp_path / "dora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True})
    )
    (folder / "adapter_model.safetensors").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "corolla.cli.main", "serve", path, "--new-swarm", "--adapters", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "use_dora" in result.stderr and "Traceback" not in result.stderr
