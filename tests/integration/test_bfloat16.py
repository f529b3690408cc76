"""bfloat16 end to end: servers started with ``--dtype bfloat16``, a bf16 client, against transformers in bf16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.local_swarm import LocalSwarm
from tests.fixtures.zoo import zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# The servers run transformers' own bf16 layers on the same kernels as the local bf16 reference, and bf16
# activations cross the wire unchanged (no compression), so the two should differ by bf16 rounding at most (on
# CPU they are measured bitwise equal). The tolerance is one bf16 rounding step (8 significant bits: a spacing of
# 2**-6 for values in [2, 4)) at the size of these tiny models' largest logits (|logit| < 4, checked below): enough
# for a kernel that rounds one value the other way (e.g. on a GPU, where batch shapes pick the kernel), far below
# what a wrong computation gives. It also tells bf16 from float32: the float32 logits of the same checkpoint lie
# further than one step from the bf16 ones (checked below), and the servers announce bfloat16 (checked too).
BF16_ATOL = 2**-6


@pytest.fixture(scope="module")
def bf16_swarm(tmp_path_factory):
    path = str(zoo_checkpoint("llama"))
    logs = tmp_path_factory.mktemp("logs-bf16")
    args = ["--throughput", "100", "--dtype", "bfloat16"]
    with LocalSwarm(model=path, spans=["0:3", "3:6"], server_args=args, log_dir=logs) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, dtype=torch.bfloat16
        )
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        yield path, model, local
        model.shutdown()


def test_bf16_logits_and_tokens_match_local_bf16(bf16_swarm):
    path, model, local = bf16_swarm
    assert {info.dtype for info in model.remote_blocks.swarm.servers.values()} == {"bfloat16"}
    ids = torch.randint(4, 400, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = local(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        fp32 = AutoModelForCausalLM.from_pretrained(path).eval()(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    assert expected.abs().max() < 4
    torch.testing.assert_close(got[0], expected[0], atol=BF16_ATOL, rtol=0)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], atol=BF16_ATOL, rtol=0)
    assert not torch.allclose(fp32, expected.float(), atol=BF16_ATOL, rtol=0)  # bf16 really computes otherwise

    new_tokens = 16
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    kwargs |= dict(output_logits=True, return_dict_in_generate=True)
    expected_out = local.generate(ids[:1], **kwargs)
    got_out = model.generate(ids[:1], **kwargs)
    assert got_out.sequences.tolist() == expected_out.sequences.tolist()
    torch.testing.assert_close(torch.stack(got_out.logits), torch.stack(expected_out.logits), atol=BF16_ATOL, rtol=0)
