"""Fine-tuning through the swarm: gradients equal those of the same model trained locally with transformers.

Trainable parameters live on the client (prompts, LoRA on local layers, a classification head); the servers run
forward and backward through their frozen blocks. Two families with different block internals (llama: rotary +
GQA; bloom: ALiBi + an embedding layer norm) on two servers each. The first server keeps each forward's activations
for its backward (the default); the second keeps none (``--activation-cache-mb 0``) and recomputes the forward
pass in every backward, so each test checks both ways of computing a backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from corolla import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from corolla.local_swarm import LocalSwarm
from corolla.net.loop import run_sync
from corolla.net.ping import server_status
from tests.fixtures.lora_pair import lora_pair
from tests.fixtures.prompted import prompted_forward
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PRE_SEQ_LEN = 3
TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module", params=["llama", "bloom"])
def swarm(request, tmp_path_factory):
    path = str(zoo_checkpoint(request.param))
    logs = tmp_path_factory.mktemp(f"logs-train-{request.param}")
    with LocalSwarm(
        model=path, spans=["0:3", "3:6"], server_args=["--throughput", "100"], log_dir=logs,
        process_args=lambda name: ["--activation-cache-mb", "0"] if name == "server1" else [],
    ) as swarm:  # fmt: skip
        yield path, swarm


def _batch(seed: int, batch: int = 3, tokens: int = 10):
    ids = torch.randint(4, 400, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in one row
    return ids, mask


def _lm_loss(logits, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_gradients_match_local(swarm, mode):
    path, local_swarm = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=local_swarm.initial_peers, tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN
    )
    try:
        tuning = model.prompt_tuning
        if mode == "deep_ptune":  # start away from zero so that the deep prompts change the outputs
            with torch.no_grad():
                tuning.deep_prompts.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        assert {n for n, p in model.named_parameters() if p.requires_grad} >= {
            f"{model._family.base_model_attr}.prompt_tuning.prompt_embeddings"
        }
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("prompt_tuning" in name)
        local = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
        prefix = tuning.prompt_embeddings.detach().clone().requires_grad_(True)
        deep = None if tuning.deep_prompts is None else tuning.deep_prompts.detach().clone().requires_grad_(True)

        ids, mask = _batch(1)
        logits = model(input_ids=ids, attention_mask=mask).logits
        expected = prompted_forward(local, ids, mask, prefix, deep).logits[:, PRE_SEQ_LEN:]
        rows = mask.bool()
        torch.testing.assert_close(logits[rows], expected[rows], **TOL)

        _lm_loss(logits, ids, mask).backward()
        _lm_loss(expected, ids, mask).backward()
        torch.testing.assert_close(tuning.prompt_embeddings.grad, prefix.grad, **TOL)
        assert prefix.grad.abs().sum() > 0
        if deep is not None:
            torch.testing.assert_close(tuning.deep_prompts.grad, deep.grad, **TOL)
            assert deep.grad.abs().sum() > 0
    finally:
        model.shutdown()


def test_lora_and_input_gradients_match_local(swarm):
    """PEFT LoRA on the client's LM head, plus gradients w.r.t. inputs_embeds, as with the local model; the batch
    is split into one sub-batch per row, which run concurrently."""
    path, local_swarm = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=local_swarm.initial_peers, sub_batch_tokens=10
    )
    try:
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        tuned, tuned_local = lora_pair(model, local)

        ids, mask = _batch(2)
        embeds = local.get_input_embeddings()(ids).detach()
        e_remote, e_local = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
        logits = tuned(inputs_embeds=e_remote, attention_mask=mask).logits
        expected = tuned_local(inputs_embeds=e_local, attention_mask=mask).logits
        _lm_loss(logits, ids, mask).backward()
        _lm_loss(expected, ids, mask).backward()

        torch.testing.assert_close(e_remote.grad, e_local.grad, **TOL)
        remote_grads = {n: p.grad for n, p in tuned.named_parameters() if p.requires_grad}
        local_grads = {n: p.grad for n, p in tuned_local.named_parameters() if p.requires_grad}
        assert remote_grads.keys() == local_grads.keys() and len(remote_grads) == 2  # lora_A and lora_B
        for name, grad in remote_grads.items():
            torch.testing.assert_close(grad, local_grads[name], **TOL)
    finally:
        model.shutdown()


def test_sequence_classification_with_prompts_matches_local(swarm):
    path, local_swarm = swarm
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        path,
        initial_peers=local_swarm.initial_peers,
        tuning_mode="ptune",
        pre_seq_len=PRE_SEQ_LEN,
        config_kwargs=dict(num_labels=3),
    )
    try:
        local = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
        local.requires_grad_(False)
        local.score.load_state_dict(model.score.state_dict())
        local.score.requires_grad_(True)
        prefix = model.prompt_tuning.prompt_embeddings.detach().clone().requires_grad_(True)

        ids = torch.randint(4, 400, (4, 7), generator=torch.Generator().manual_seed(3))
        labels = torch.tensor([0, 1, 2, 1])
        logits = model(input_ids=ids).logits
        expected = prompted_forward(local, ids, torch.ones_like(ids), prefix).logits
        torch.testing.assert_close(logits, expected, **TOL)
        F.cross_entropy(logits, labels).backward()
        F.cross_entropy(expected, labels).backward()
        torch.testing.assert_close(model.prompt_tuning.prompt_embeddings.grad, prefix.grad, **TOL)
        torch.testing.assert_close(model.score.weight.grad, local.score.weight.grad, **TOL)
    finally:
        model.shutdown()


def test_tuned_prompt_generates_like_local(swarm):
    """Generation with a deep prompt goes through sessions (the prefix fills the servers' caches first)."""
    path, local_swarm = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=local_swarm.initial_peers, tuning_mode="deep_ptune", pre_seq_len=PRE_SEQ_LEN
    )
    try:
        with torch.no_grad():
            model.prompt_tuning.deep_prompts.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
            model.prompt_tuning.prompt_embeddings.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        prefix = model.prompt_tuning.prompt_embeddings.detach()
        deep = model.prompt_tuning.deep_prompts.detach()
        ids = torch.randint(4, 400, (1, 6), generator=torch.Generator().manual_seed(4))
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
        sequence = ids
        with torch.no_grad():
            for _ in range(8):  # greedy decoding of the local reference, recomputing the whole prefix each time
                logits = prompted_forward(local, sequence, torch.ones_like(sequence), prefix, deep).logits
                sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
        assert got.tolist() == sequence.tolist()
    finally:
        model.shutdown()


def test_one_server_reuses_kept_forwards_the_other_recomputes(swarm):
    """The gradients above came from both kinds of backward: server0 answered from the graphs it kept, server1
    (which keeps none) recomputed; and server0 holds nothing once the backward calls are done."""
    path, local_swarm = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=local_swarm.initial_peers, tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN
    )
    try:
        ids, mask = _batch(4)

        def statuses():
            async def call():
                transport = await model.remote_blocks.swarm.transport()
                names = ("server0", "server1")
                return [await server_status(transport, local_swarm.peer_ids[n], timeout_s=10) for n in names]

            return run_sync(call(), timeout_s=30)

        before = statuses()
        _lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask).backward()
        kept, recomputed = statuses()
        assert kept.activation_hits == before[0].activation_hits + 1 and kept.activation_misses == 0
        assert kept.activation_bytes == 0 and kept.activation_peak_bytes > 0
        assert recomputed.activation_hits == 0 and recomputed.activation_misses == before[1].activation_misses + 1
        assert recomputed.activation_peak_bytes == 0
    finally:
        model.shutdown()
