"""Quantized vs float blocks of the real bundled model (SmolLM2-135M-Instruct), in process, without network.

A float ``AutoModelForCausalLM`` and deep copies of it whose 30 decoder layers are quantized with
:func:`quantize_blocks` (what ``corolla serve --quant`` does to the served blocks) answer the same 8 chat prompts,
batched with left padding. Reported per mode:

* logit error: mean and max |quantized - float| over every real (non-padding) position of the prompt and of the
  float model's greedy continuation;
* greedy next-token agreement: share of the 16 continuation positions where both models, fed the float model's
  continuation, predict the same greedy token (teacher forced: one early disagreement does not spoil the rest);
* free-running share: share of the 16 positions where the two greedy generations hold the same token.

Measured here (CPU, 1 thread), mean / max logit error, next-token agreement, free-running share: int8 0.27 / 1.9,
0.97, 0.87; nf4 3.3 / 26, 0.70, 0.20 (float logits: std 8, range ~40 per position). SmolLM2-135M is small and its
float weights are themselves dequantized from a 4-bit GGUF (Q4_1), so re-quantizing them to NF4 costs it much more
than it costs larger models. The bounds leave about 2x margin on the errors and 0.1-0.2 on the shares.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.models.quantization import quantize_blocks, quantized_layers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPTS = [
    "What is the capital of France?",
    "Name the largest planet of the solar system.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer in one sentence.",
]
NEW_TOKENS = 16
#: mode -> (mean |logit error| <, max |logit error| <, greedy next-token agreement >=, free-running share >=)
BOUNDS = {"int8": (0.6, 5.0, 0.9, 0.7), "nf4": (6.0, 50.0, 0.5, 0.08)}


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """(float model, prompts batch, float greedy sequences [batch, prompt + NEW_TOKENS], their attention mask)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    batch = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
    )
    sequences = generate(model, batch)
    mask = torch.cat([batch["attention_mask"], torch.ones(len(PROMPTS), NEW_TOKENS, dtype=torch.long)], dim=1)
    return model, batch, sequences, mask


def generate(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2
        )


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_blocks_stay_close_to_float(reference, mode):
    model, batch, sequences, mask = reference
    started = time.perf_counter()
    quantized = copy.deepcopy(model)
    backend = quantize_blocks(quantized.model.layers, mode, device="cpu")
    assert len(quantized_layers(quantized.model.layers)) == 30 * 7 and "CPU" in backend

    with torch.no_grad():
        expected = model(input_ids=sequences, attention_mask=mask).logits
        got = quantized(input_ids=sequences, attention_mask=mask).logits
    real = mask.bool()
    errors = (got - expected).abs()[real]
    mean_error, max_error = errors.mean().item(), errors.max().item()
    continuation = slice(-NEW_TOKENS - 1, -1)  # the predictions of the NEW_TOKENS generated tokens
    agreement = (got[:, continuation].argmax(-1) == expected[:, continuation].argmax(-1)).float().mean().item()
    free_running = (generate(quantized, batch)[:, -NEW_TOKENS:] == sequences[:, -NEW_TOKENS:]).float().mean().item()
    print(  # noqa: T201
        f"\n{mode} ({backend}): logit error mean {mean_error:.3f} max {max_error:.2f}; greedy next-token agreement "
        f"{agreement:.3f}; free-running identical tokens {free_running:.3f} "
        f"({len(PROMPTS)} prompts x {NEW_TOKENS} tokens, {time.perf_counter() - started:.1f} s)"
    )

    mean_bound, max_bound, min_agreement, min_free_running = BOUNDS[mode]
    assert mean_error < mean_bound and max_error < max_bound
    assert agreement >= min_agreement
    assert free_running >= min_free_running
    assert mean_error > 1e-3  # really quantized


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_server_serves_quantized_blocks(mode, tmp_path):
    """``corolla serve --quant MODE`` serves quantized blocks that equal the same quantization done in process."""
    from corolla import AutoDistributedModelForCausalLM
    from corolla.local_swarm import LocalSwarm
    from corolla.models.checkpoint import resolve_checkpoint
    from corolla.models.span import SpanInputs, load_span
    from tests.fixtures.zoo import zoo_checkpoint

    path = str(zoo_checkpoint("llama"))
    reference = load_span(resolve_checkpoint(path), 0, 6)
    quantize_blocks(reference, mode, device="cpu")
    args = ["--throughput", "100", "--quant", mode]
    with LocalSwarm(model=path, spans=["0:6"], server_args=args, log_dir=tmp_path) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        try:
            (info,) = model.remote_blocks.swarm.servers.values()
            assert info.quant == mode
            hidden = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                got = model.remote_blocks(hidden)
                expected = reference(SpanInputs(hidden_states=hidden))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
        finally:
            model.shutdown()
    assert f"to {mode} with corolla-" in (tmp_path / "server0.log").read_text()
