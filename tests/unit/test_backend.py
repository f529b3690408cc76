"""The compute backend of a block server, in-process (no P2P): forward in chunks, backward, inference steps with a
cache and rewinds, each equal to the span run directly; bad inputs are refused and leave a session unchanged."""

from __future__ import annotations

import asyncio

import pytest
import torch

from corolla.errors import InvalidRequestError
from corolla.models.checkpoint import resolve_checkpoint
from corolla.models.span import SpanInputs, load_span
from corolla.protocol.messages import BackwardRequest, InferenceOpen, InferenceStep, SpanRequest
from corolla.server.backend import SpanBackend
from corolla.server.compute import ComputeQueue
from corolla.server.config import LimitsConfig, ServerConfig
from corolla.server.sessions import SessionTable
from tests.fixtures.zoo import SLIDING_WINDOW, zoo_checkpoint

START, END = 1, 4


@pytest.fixture(scope="module")
def span():
    return load_span(resolve_checkpoint(str(zoo_checkpoint("llama"))), START, END)


@pytest.fixture
def backend(span):
    compute = ComputeQueue()
    config = ServerConfig(
        model="tiny", new_swarm=True, limits=LimitsConfig(compute_chunk_tokens=8, max_session_length=32)
    )
    yield SpanBackend(span=span, config=config, compute=compute)
    compute.shutdown()


def _hidden(span, batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, tokens, span.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def test_forward_in_chunks_equals_the_span(backend, span):
    hidden = _hidden(span, batch=5, tokens=4, seed=0)  # 20 tokens in chunks of 8: rows 2 + 2 + 1
    meta = SpanRequest(start_block=START + 1, end_block=END)
    got = asyncio.run(backend.forward(meta, [hidden]))
    with torch.no_grad():
        expected = span(SpanInputs(hidden_states=hidden), start=START + 1, end=END)
    torch.testing.assert_close(got, expected)


def test_backward_equals_autograd_through_the_span(backend, span):
    hidden, grad_out = _hidden(span, 3, 4, seed=1), _hidden(span, 3, 4, seed=2)
    meta = BackwardRequest(start_block=START, end_block=END)
    (grad_inputs,) = asyncio.run(backend.backward(meta, [hidden, grad_out]))
    leaf = hidden.clone().requires_grad_(True)
    with torch.enable_grad():
        span(SpanInputs(hidden_states=leaf)).backward(grad_out)
    torch.testing.assert_close(grad_inputs, leaf.grad)
    assert all(p.grad is None for p in span.parameters())  # frozen weights get no gradient


def test_inference_steps_and_a_rewind_equal_one_forward(backend, span):
    opened = InferenceOpen(session_id="s", max_length=12, start_block=START, end_block=END)
    hidden = _hidden(span, 1, 10, seed=3)
    with torch.no_grad():
        expected = span(SpanInputs(hidden_states=hidden))
    table = SessionTable()
    backend.check_open(opened)
    session_span, cache = backend.new_cache(opened)

    async def steps(session):
        outputs = [await backend.step(session, InferenceStep(step_id="a", position=0), [hidden[:, :6]])]
        await backend.step(session, InferenceStep(step_id="b", position=6), [hidden[:, 6:9]])
        # the client replays from position 6 (e.g. to a replacement): the cache is cropped, not appended to
        outputs.append(await backend.step(session, InferenceStep(step_id="c", position=6), [hidden[:, 6:]]))
        return outputs

    with table.open(opened, span=session_span, cache=cache) as session:
        outputs = asyncio.run(steps(session))
        assert session.length == 10
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_a_rewind_past_the_sliding_window_equals_one_forward():
    """A sliding-window model (the zoo's Mistral, window 8): steps that run past the window, then a rewind to a
    position past it (a replay), equal one forward pass, which applies the window through the attention mask."""
    span = load_span(resolve_checkpoint(str(zoo_checkpoint("mistral"))), 0, 3)
    assert span.config.sliding_window == SLIDING_WINDOW
    compute = ComputeQueue()
    config = ServerConfig(model="tiny", new_swarm=True, limits=LimitsConfig(max_session_length=32))
    backend = SpanBackend(span=span, config=config, compute=compute)
    opened = InferenceOpen(session_id="s", max_length=24, start_block=0, end_block=3)
    total, first, rewind_to = 3 * SLIDING_WINDOW, SLIDING_WINDOW + 4, 2 * SLIDING_WINDOW
    hidden = _hidden(span, 1, total, seed=4)
    with torch.no_grad():
        expected = span(SpanInputs(hidden_states=hidden))

    async def steps(session):
        outputs = [await backend.step(session, InferenceStep(step_id="a", position=0), [hidden[:, :first]])]
        outputs.append(await backend.step(session, InferenceStep(step_id="b", position=first), [hidden[:, first:]]))
        replayed = await backend.step(session, InferenceStep(step_id="c", position=rewind_to), [hidden[:, rewind_to:]])
        return outputs, replayed

    session_span, cache = backend.new_cache(opened)
    try:
        with SessionTable().open(opened, span=session_span, cache=cache) as session:
            outputs, replayed = asyncio.run(steps(session))
            assert session.length == total
    finally:
        compute.shutdown()
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(replayed, expected[:, rewind_to:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("step", "tensors", "error"),
    [
        (InferenceStep(step_id="x", position=5), lambda s: [_hidden(s, 1, 1, 0)], "would skip positions"),
        (InferenceStep(step_id="x", position=2), lambda s: [_hidden(s, 1, 11, 0)], "over the session's max_length"),
        (InferenceStep(step_id="x", position=2), lambda s: [torch.zeros(1, 1, 3)], "hidden"),
        (InferenceStep(step_id="x", position=2, has_attention_mask=True), lambda s: [_hidden(s, 1, 1, 0)], "tensors"),
    ],
    ids=["skips positions", "too long", "wrong hidden size", "missing mask"],
)
def test_bad_steps_are_refused_and_leave_the_session_unchanged(backend, span, step, tensors, error):
    opened = InferenceOpen(session_id="s", max_length=12, start_block=START, end_block=END)
    session_span, cache = backend.new_cache(opened)
    with SessionTable().open(opened, span=session_span, cache=cache) as session:
        asyncio.run(backend.step(session, InferenceStep(step_id="a", position=0), [_hidden(span, 1, 2, 0)]))
        with pytest.raises(InvalidRequestError, match=error):
            asyncio.run(backend.step(session, step, tensors(span)))
        assert session.length == 2 and cache.get_seq_length() == 2


def test_sessions_the_span_cannot_hold_are_refused_before_anything_is_reserved(backend):
    with pytest.raises(InvalidRequestError, match="not hosted"):
        backend.check_open(InferenceOpen(session_id="s", max_length=8, start_block=0, end_block=END))
    with pytest.raises(InvalidRequestError, match="max-session-length"):
        backend.check_open(InferenceOpen(session_id="s", max_length=64, start_block=START, end_block=END))
    with pytest.raises(InvalidRequestError, match="does not hold adapter 'lora'"):
        backend.check_open(
            InferenceOpen(session_id="s", max_length=8, start_block=START, end_block=END, active_adapter="lora")
        )
