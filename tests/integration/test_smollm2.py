"""The real bundled model, SmolLM2-135M-Instruct, on 3 servers x 10 blocks: same tokens as local transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla import AutoDistributedModelForCausalLM
from corolla.local_swarm import LocalSwarm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def smollm2_swarm(smollm2_path, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs-smollm2")
    with LocalSwarm(model="smollm2-135m", spans=["0:10", "10:20", "20:30"], log_dir=logs) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers)
        yield swarm, model
        model.shutdown()


def test_chat_prompt_matches_local(smollm2_path, smollm2_swarm):
    _, model = smollm2_swarm
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    local = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    messages = [{"role": "user", "content": "Name the largest planet of the solar system."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, local(ids).logits, atol=1e-3, rtol=1e-3)
    expected = local.generate(ids, max_new_tokens=24, do_sample=False)
    got = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert got.tolist() == expected.tolist()
    assert len(model.remote_blocks.swarm.servers) == 3


def test_missing_blocks_error_says_what_to_do(smollm2_swarm):
    swarm, _ = smollm2_swarm
    from corolla.errors import MissingBlocksError

    with pytest.raises(MissingBlocksError, match=r"blocks 0:30 .*corolla serve"):
        AutoDistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=swarm.initial_peers, dht_prefix="nobody-serves-this"
        ).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1)


def test_deep_prompt_tuning_gradients_match_local(smollm2_path, smollm2_swarm):
    """Fine-tuning exactness on the real model: gradients of both prompt kinds equal local transformers'."""
    from tests.fixtures.prompted import prompted_forward

    swarm, _ = smollm2_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=swarm.initial_peers, tuning_mode="deep_ptune", pre_seq_len=4
    )
    try:
        tuning = model.prompt_tuning
        with torch.no_grad():
            tuning.deep_prompts.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        local = AutoModelForCausalLM.from_pretrained(smollm2_path).eval().requires_grad_(False)
        prefix = tuning.prompt_embeddings.detach().clone().requires_grad_(True)
        deep = tuning.deep_prompts.detach().clone().requires_grad_(True)
        ids = torch.randint(100, 10000, (2, 12), generator=torch.Generator().manual_seed(1))

        def loss(logits):
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

        loss(model(input_ids=ids).logits).backward()
        loss(prompted_forward(local, ids, torch.ones_like(ids), prefix, deep).logits[:, 4:]).backward()
        torch.testing.assert_close(tuning.prompt_embeddings.grad, prefix.grad, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(tuning.deep_prompts.grad, deep.grad, atol=1e-4, rtol=1e-3)
    finally:
        model.shutdown()


def test_lora_gradients_match_local(smollm2_path, smollm2_swarm):
    """Client-side PEFT LoRA (on the local LM head) through the real model: LoRA and input-embedding gradients
    equal local transformers'."""
    from tests.fixtures.lora_pair import lora_pair

    swarm, _ = smollm2_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=swarm.initial_peers)
    try:
        local = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
        tuned, tuned_local = lora_pair(model, local)
        ids = torch.randint(100, 10000, (2, 12), generator=torch.Generator().manual_seed(2))
        embeds = local.get_input_embeddings()(ids).detach()
        e_remote, e_local = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)

        def loss(logits):
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

        loss(tuned(inputs_embeds=e_remote).logits).backward()
        loss(tuned_local(inputs_embeds=e_local).logits).backward()
        torch.testing.assert_close(e_remote.grad, e_local.grad, atol=1e-4, rtol=1e-3)
        remote = {n: p.grad for n, p in tuned.named_parameters() if p.requires_grad}
        expected = {n: p.grad for n, p in tuned_local.named_parameters() if p.requires_grad}
        assert remote.keys() == expected.keys() and len(remote) == 2  # lora_A and lora_B
        for name, grad in remote.items():
            torch.testing.assert_close(grad, expected[name], atol=1e-4, rtol=1e-3)
    finally:
        model.shutdown()


@pytest.fixture(scope="module")
def smollm2_local(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, AutoModelForCausalLM.from_pretrained(smollm2_path).eval()


def _padded_batch(tokenizer):
    prompts = ["The capital of France is", "Two plus two is", "Once upon a time, in a small village by the sea,"]
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(dim=1).tolist() == [True, True, False]  # two rows really padded
    return batch["input_ids"], batch["attention_mask"]


def test_padded_batch_greedy_matches_local(smollm2_swarm, smollm2_local):
    _, model = smollm2_swarm
    tokenizer, local = smollm2_local
    ids, mask = _padded_batch(tokenizer)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = local.generate(ids, **kwargs, pad_token_id=tokenizer.pad_token_id)
    got = model.generate(ids, **kwargs, pad_token_id=tokenizer.pad_token_id)
    assert got.tolist() == expected.tolist()


def test_seeded_sampling_matches_local(smollm2_swarm, smollm2_local):
    """Sampling draws the same tokens as local transformers from the same seed, for a padded batch; a different
    seed draws others (so the comparison is not one of two greedy runs)."""
    _, model = smollm2_swarm
    tokenizer, local = smollm2_local
    ids, mask = _padded_batch(tokenizer)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=0.9)
    kwargs |= dict(top_p=0.95, top_k=100, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(11)
    expected = local.generate(ids, **kwargs)
    torch.manual_seed(11)
    got = model.generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()
    torch.manual_seed(12)
    assert model.generate(ids, **kwargs).tolist() != got.tolist()
