"""End to end: distributed generation equals the same checkpoint run locally with transformers, per family."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla import AutoDistributedModelForCausalLM
from corolla.local_swarm import LocalSwarm
from tests.fixtures.zoo import FAMILIES, SLIDING_FAMILIES, SLIDING_WINDOW, zoo_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", params=FAMILIES)
def family_swarm(request, tmp_path_factory):
    path = str(zoo_checkpoint(request.param))
    logs = tmp_path_factory.mktemp(f"logs-{request.param}")
    with LocalSwarm(model=path, spans=["0:3", "3:6"], server_args=["--throughput", "100"], log_dir=logs) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        yield request.param, path, model, local
        model.shutdown()


def test_logits_match_local(family_swarm):
    _, _, model, local = family_swarm
    ids = torch.randint(4, 400, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = local(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match_local(family_swarm):
    _, path, model, local = family_swarm
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("the quick brown fox jumps over", return_tensors="pt")["input_ids"]
    # min_new_tokens: an early EOS must not shorten (and so weaken) the comparison
    expected = local.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    got = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert got.tolist() == expected.tolist()


def test_padded_batch_matches_local(family_swarm):
    _, _, model, local = family_swarm
    ids = torch.randint(4, 400, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = local.generate(ids, **kwargs)
    got = model.generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()


def _greedy_with_logits(model, ids, mask, new_tokens: int, **kwargs):
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    return out.sequences, out.logits


def test_every_decode_step_matches_local(family_swarm):
    """The raw logits of every step (the prefill's last position, then each cached single-token step) equal
    transformers' with the same history, in a padded batch; the tokens agree at every step too."""
    _, _, model, local = family_swarm
    ids = torch.randint(4, 400, (2, 6), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    new_tokens = 16
    expected, expected_logits = _greedy_with_logits(local, ids, mask, new_tokens)
    got, got_logits = _greedy_with_logits(model, ids, mask, new_tokens)
    assert len(got_logits) == len(expected_logits) == new_tokens
    for step in range(new_tokens):
        # the histories are equal up to here (checked at the previous step), so the logits must be too
        torch.testing.assert_close(got_logits[step], expected_logits[step], atol=1e-4, rtol=1e-4, msg=f"step {step}")
        column = ids.shape[1] + step
        assert got[:, column].tolist() == expected[:, column].tolist(), f"tokens differ at step {step}"


def _draft_model(local, seed: int = 0):
    """A local draft model that agrees with ``local`` on most greedy tokens but not all: its weights, slightly
    perturbed (same tokenizer and vocabulary, as transformers' assisted generation requires)."""
    draft = copy.deepcopy(local)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05 * parameter.std().nan_to_num(0))
    return draft.eval()


@pytest.mark.parametrize("drafter", ["prompt lookup", "draft model"])
def test_speculative_greedy_equals_plain_greedy(family_swarm, drafter):
    """Guessed tokens (prompt lookup or a local draft model) are checked by the servers in one step each, and the
    rejected ones are dropped from the servers' caches (a step that starts before a cache's end rewinds it, push
    chain included). Tokens and every token's logits equal plain greedy decoding with transformers."""
    _, _, model, local = family_swarm
    pattern = torch.randint(4, 400, (1, 5), generator=torch.Generator().manual_seed(12))
    ids = torch.cat([pattern, pattern, pattern[:, :3]], dim=1)  # repeats, so prompt lookup finds n-grams at once
    new_tokens = 20
    mask = torch.ones_like(ids)
    expected, expected_logits = _greedy_with_logits(local, ids, mask, new_tokens)
    guesses = {
        "prompt lookup": dict(prompt_lookup_num_tokens=3),
        "draft model": dict(assistant_model=_draft_model(local)),
    }
    with model.inference_session(max_length=ids.shape[1] + new_tokens + 3) as session:
        got, got_logits = _greedy_with_logits(model, ids, mask, new_tokens, session=session, **guesses[drafter])
        assert session.steps < new_tokens, "no guess was accepted"
        if drafter == "prompt lookup":  # its guesses from the prompt are wrong at first in every family
            assert session.dropped_tokens > 0, "no guess was rejected: the rewind path was not exercised"
    assert got.tolist() == expected.tolist()
    assert len(got_logits) == new_tokens
    torch.testing.assert_close(torch.stack(got_logits), torch.stack(expected_logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lookup_tokens", [0, 3])
def test_async_token_generation_equals_greedy(family_swarm, lookup_tokens):
    """``generate_tokens`` (the API's asyncio path), plain and with prompt lookup, yields greedy decoding's tokens
    one by one; with lookup, steps carry guesses (the rejected ones are dropped)."""
    import asyncio

    from corolla.client.sampling import SamplingParams
    from corolla.client.text_generation import generate_tokens

    _, _, model, local = family_swarm
    pattern = torch.randint(4, 400, (1, 5), generator=torch.Generator().manual_seed(13))
    ids = torch.cat([pattern, pattern, pattern[:, :2]], dim=1)
    new_tokens = 16
    # greedy with a cache, without stopping at an end token (min_new_tokens would forbid it, changing the argmax)
    expected, cache, step_ids = [], None, ids
    with torch.no_grad():
        for _ in range(new_tokens):
            out = local(input_ids=step_ids, past_key_values=cache, use_cache=True)
            cache, step_ids = out.past_key_values, out.logits[:, -1:].argmax(dim=-1)
            expected.append(int(step_ids))
    sessions = []
    opened = model.inference_session

    def recording_session(**kwargs):
        sessions.append(opened(**kwargs))
        return sessions[-1]

    async def tokens():
        steps = generate_tokens(
            model, ids, max_new_tokens=new_tokens, params=SamplingParams(temperature=0), lookup_tokens=lookup_tokens
        )
        return [int(step.tokens[0]) async for step in steps]

    model.inference_session = recording_session
    try:
        got = asyncio.run(tokens())
    finally:
        del model.inference_session
    assert got == expected
    (session,) = sessions
    if lookup_tokens:  # guesses were sent: some accepted (fewer steps than tokens) or some dropped
        assert session.steps < new_tokens or session.dropped_tokens > 0
    else:
        assert session.steps == new_tokens and session.dropped_tokens == 0


class _Collector:
    """A transformers streamer that keeps every tensor ``generate`` hands it (the prompt first, then each token)."""

    def __init__(self):
        self.values: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        assert not self.ended
        self.values.append(value.detach().clone())

    def end(self) -> None:
        self.ended = True


def test_streamed_tokens_are_the_returned_tokens(family_swarm):
    _, _, model, local = family_swarm
    ids = torch.randint(4, 400, (1, 5), generator=torch.Generator().manual_seed(10))
    streamer = _Collector()
    got = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)
    assert streamer.ended
    prompt, *tokens = streamer.values
    assert prompt.tolist() == ids.tolist()
    assert len(tokens) == 10
    assert torch.cat([prompt.reshape(1, -1), *(t.reshape(1, -1) for t in tokens)], dim=1).tolist() == got.tolist()
    assert got.tolist() == local.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False).tolist()


def _without_window(path: str, local):
    """The same weights as ``local`` with the sliding window switched off (every layer attends to everything)."""
    config = copy.deepcopy(local.config)
    config.sliding_window = None
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = False
    return AutoModelForCausalLM.from_pretrained(path, config=config).eval()


def test_sliding_window_is_applied(family_swarm):
    """Prefill and cached decode run well past the window: the servers' results equal the windowed reference,
    which differs from the same weights without a window (so a server ignoring the window would fail here)."""
    family, path, model, local = family_swarm
    if family not in SLIDING_FAMILIES:
        pytest.skip(f"the zoo's {family} model has no sliding window")
    assert local.config.sliding_window == SLIDING_WINDOW
    unwindowed = _without_window(path, local)
    prompt_length, new_tokens = 2 * SLIDING_WINDOW, 2 * SLIDING_WINDOW
    ids = torch.randint(4, 400, (1, prompt_length), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected_prefill = local(input_ids=ids).logits
        unwindowed_prefill = unwindowed(input_ids=ids).logits
        got_prefill = model(input_ids=ids).logits
    # within the window the two references agree; past it the window changes the result
    torch.testing.assert_close(unwindowed_prefill[:, :SLIDING_WINDOW], expected_prefill[:, :SLIDING_WINDOW])
    assert (unwindowed_prefill[:, SLIDING_WINDOW:] - expected_prefill[:, SLIDING_WINDOW:]).abs().max() > 1e-2
    torch.testing.assert_close(got_prefill, expected_prefill, atol=1e-4, rtol=1e-4)

    expected, expected_logits = _greedy_with_logits(local, ids, mask, new_tokens)
    got, got_logits = _greedy_with_logits(model, ids, mask, new_tokens)
    assert got.tolist() == expected.tolist()
    torch.testing.assert_close(torch.stack(got_logits), torch.stack(expected_logits), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the same history without a window: the decode steps' logits would differ
        unwindowed_steps = unwindowed(input_ids=expected).logits[:, prompt_length - 1 : -1].transpose(0, 1)
    assert (unwindowed_steps - torch.stack(expected_logits)).abs().max() > 1e-2


def test_session_continues_without_resending_history(family_swarm):
    _, _, model, local = family_swarm
    turn1 = torch.randint(4, 400, (1, 6), generator=torch.Generator().manual_seed(3))
    turn2 = torch.randint(4, 400, (1, 4), generator=torch.Generator().manual_seed(4))
    with model.inference_session(max_length=64) as session:
        first = model.generate(turn1, max_new_tokens=6, session=session, do_sample=False)
        second = model.generate(turn2, max_new_tokens=6, session=session, do_sample=False)
        assert session.position == first.shape[1] + second.shape[1] - 1  # the last token is not fed yet
    history = torch.cat([first, turn2], dim=1)
    expected = local.generate(history, max_new_tokens=6, do_sample=False)
    assert second.tolist() == expected[:, first.shape[1] :].tolist()


def test_sampling_is_reproducible_with_a_seed(family_swarm):
    _, _, model, local = family_swarm
    ids = torch.randint(4, 400, (1, 5), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2)
    torch.manual_seed(7)
    expected = local.generate(ids, **kwargs)
    torch.manual_seed(7)
    got = model.generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()


def test_inputs_embeds_match_local(family_swarm):
    _, _, model, local = family_swarm
    ids = torch.randint(4, 400, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        embeds = local.get_input_embeddings()(ids)
        expected = local(inputs_embeds=embeds).logits
        got = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_servers_push_outputs_to_the_next_server(family_swarm):
    """With push on (the default) the second server computes steps from the first server's push; tokens stay exact."""
    from hivemind.proto import runtime_pb2
    from hivemind.utils.serializer import MSGPackSerializer

    from corolla.net.loop import run_sync
    from corolla.protocol.rpc import BLOCK_SERVER, RpcStub

    _, _, model, local = family_swarm
    view = model.remote_blocks.swarm

    async def pushed_steps() -> int:
        (second,) = [peer for peer, info in view.servers.items() if info.start_block == 3]
        stub = RpcStub(await view.transport(), second.to_base58(), BLOCK_SERVER)
        info = await stub.call("info", runtime_pb2.ExpertUID(), timeout_s=10)
        return MSGPackSerializer.loads(info.serialized_info)["steps_from_pushes"]

    before = run_sync(pushed_steps(), timeout_s=30)
    ids = torch.randint(4, 400, (1, 6), generator=torch.Generator().manual_seed(8))
    expected = local.generate(ids, max_new_tokens=12, do_sample=False)
    assert model.generate(ids, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()
    assert run_sync(pushed_steps(), timeout_s=30) > before


def test_prompt_lookup_keeps_penalized_greedy_tokens(family_swarm):
    """With frequency and presence penalties the distribution at each guess counts the guesses before it: greedy
    tokens with prompt lookup equal those without it."""
    import asyncio

    from corolla.client.sampling import SamplingParams
    from corolla.client.text_generation import generate_tokens

    family, _, model, _ = family_swarm
    if family != "llama":
        pytest.skip("one family is enough: the penalties are client-side")
    pattern = torch.randint(4, 400, (1, 5), generator=torch.Generator().manual_seed(13))
    ids = torch.cat([pattern, pattern, pattern[:, :2]], dim=1)
    params = SamplingParams(temperature=0, frequency_penalty=0.02, presence_penalty=0.01)

    async def tokens(lookup_tokens: int) -> list[int]:
        steps = generate_tokens(model, ids, max_new_tokens=32, params=params, lookup_tokens=lookup_tokens)
        return [int(step.tokens[0]) async for step in steps]

    assert asyncio.run(tokens(3)) == asyncio.run(tokens(0))
