"""Forward passes kept for their backward (``corolla.server.activation_cache``): the budget drops the oldest, time
drops the unused, and a backward that reuses a kept graph returns the same gradients as one that recomputes the
forward pass, and as autograd through the span itself; anything that does not match recomputes. In-process."""

from __future__ import annotations

import asyncio
import weakref

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from corolla.cli.flags import parse_flags
from corolla.errors import InvalidRequestError
from corolla.models.checkpoint import resolve_checkpoint
from corolla.models.span import SpanInputs, load_span
from corolla.net.tensors import pack
from corolla.protocol.answer_signing import AnswerSigner
from corolla.protocol.messages import BackwardRequest, SpanRequest
from corolla.server.activation_cache import ActivationCache, KeptForward, SavedBytes
from corolla.server.backend import SpanBackend
from corolla.server.compute import ComputeQueue
from corolla.server.config import ActivationCacheConfig, LimitsConfig, ServerConfig
from corolla.server.handler import BlockServicer
from corolla.server.memory_cache import CacheBudget
from tests.fixtures.zoo import zoo_checkpoint

START, END = 1, 4
ID, OTHER_ID = "activation-1", "activation-2"


# ---- the cache alone -----------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _kept(size_bytes: int) -> KeptForward:
    return KeptForward(
        span=None, start_block=0, end_block=1, active_adapter=None, inputs=SpanInputs(hidden_states=torch.zeros(1)),
        prompts=None, chunks=[], size_bytes=size_bytes,
    )  # fmt: skip


def test_the_budget_drops_the_oldest_first_and_refuses_what_never_fits():
    cache = ActivationCache(budget_bytes=100, ttl_s=10, clock=Clock())
    assert cache.put("a", _kept(40)) and cache.put("b", _kept(40))
    assert cache.put("c", _kept(40))  # 120 > 100: "a" goes
    assert "a" not in cache and {"b", "c"} <= {k for k in ("a", "b", "c") if k in cache}
    assert cache.size_bytes == 80 and cache.stats.evictions == 1 and cache.stats.peak_bytes == 80
    assert not cache.put("huge", _kept(101))  # alone over budget: not kept, nothing else dropped
    assert len(cache) == 2 and cache.size_bytes == 80
    assert cache.put("b", _kept(10)) and cache.size_bytes == 50  # the same id again replaces its forward
    taken = cache.take("c")
    assert taken is not None and taken.size_bytes == 40 and cache.take("c") is None  # taken once
    assert cache.size_bytes == 10
    cache.clear()
    assert len(cache) == 0 and cache.size_bytes == 0


def test_kept_forwards_expire_after_their_time():
    clock = Clock()
    cache = ActivationCache(budget_bytes=100, ttl_s=10, clock=clock)
    cache.put("a", _kept(10))
    clock.now += 6
    cache.put("b", _kept(10))
    clock.now += 5  # "a" is 11 s old, "b" 5 s
    assert cache.take("a") is None and cache.take("b") is not None
    assert cache.stats.evictions == 1 and cache.size_bytes == 0
    cache.put("c", _kept(10))
    clock.now += 10
    assert cache.expire() == 1 and len(cache) == 0


def test_a_zero_budget_keeps_nothing():
    cache = ActivationCache(budget_bytes=0, ttl_s=1)
    assert not cache.enabled and not cache.put("a", _kept(1))


def test_the_flags_and_their_checks():
    argv = ["m", "--new-swarm", "--activation-cache-mb", "0.5", "--activation-ttl-s", "5"]
    settings = parse_flags(ServerConfig, argv, prog="corolla serve").activations
    assert settings == ActivationCacheConfig(activation_cache_mb=0.5, activation_ttl_s=5)
    assert settings.budget_bytes == 2**19
    with pytest.raises(ValueError, match="activation_cache_mb must be >= 0"):
        ActivationCacheConfig(activation_cache_mb=-1)
    with pytest.raises(ValueError, match="activation_ttl_s must be positive"):
        ActivationCacheConfig(activation_ttl_s=0)


def test_saved_bytes_count_activations_not_weights():
    weight = torch.randn(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    counter = SavedBytes(exclude=[weight])
    with torch.enable_grad(), counter.hooks():
        y = torch.tanh(x @ weight)  # the matmul saves the weight (all x's gradient needs), tanh its output
    assert counter.size_bytes == 8 * 64 * 4
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, (1 - torch.tanh(x @ weight) ** 2) @ weight.T)


# ---- the backend with kept forwards --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def span():
    return load_span(resolve_checkpoint(str(zoo_checkpoint("llama"))), START, END)


def _config(cache_mb: float = 64) -> ServerConfig:
    return ServerConfig(
        model="tiny",
        new_swarm=True,
        limits=LimitsConfig(compute_chunk_tokens=8),  # 3 rows x 4 tokens: chunks of 2 + 1 rows
        activations=ActivationCacheConfig(activation_cache_mb=cache_mb),
    )


@pytest.fixture
def compute():
    queue = ComputeQueue()
    yield queue
    queue.shutdown()


@pytest.fixture
def backend(span, compute):
    return SpanBackend(span=span, config=_config(), compute=compute)


def _tensor(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reference(span, hidden, grad_out, prompts=None):
    """Gradients of the span's own forward pass (hidden states, deep prompts) under autograd."""
    leaf = hidden.clone().requires_grad_(True)
    prompt_leaf = None if prompts is None else prompts.clone().requires_grad_(True)
    with torch.enable_grad():
        span(SpanInputs(hidden_states=leaf), prompts=prompt_leaf).backward(grad_out)
    return [leaf.grad] + ([] if prompts is None else [prompt_leaf.grad])


def _forward_then_backward(backend, forward_id, backward_id, hidden, grad_out, prompts=None, backward_hidden=None):
    flags = dict(start_block=START, end_block=END, has_prompts=prompts is not None)
    extra = [] if prompts is None else [prompts]
    backward_hidden = hidden if backward_hidden is None else backward_hidden

    async def calls():
        output = await backend.forward(SpanRequest(activation_id=forward_id, **flags), [hidden, *extra])
        kept = len(backend.activations)
        grads = await backend.backward(
            BackwardRequest(activation_id=backward_id, **flags), [backward_hidden, grad_out, *extra]
        )
        return output, kept, grads

    return asyncio.run(calls())


@pytest.mark.parametrize("prompt_rows", [None, 1, 3], ids=["no-prompts", "shared-prompts", "per-row-prompts"])
def test_a_kept_forward_gives_the_gradients_of_a_recomputed_one(backend, span, prompt_rows):
    hidden, grad_out = _tensor(3, 4, span.config.hidden_size, seed=1), _tensor(3, 4, span.config.hidden_size, seed=2)
    prompts = None if prompt_rows is None else _tensor(END - START, prompt_rows, 2, span.config.hidden_size, seed=3)
    expected = _reference(span, hidden, grad_out, prompts)

    output, kept, reused = _forward_then_backward(backend, ID, ID, hidden, grad_out, prompts)
    assert kept == 1 and len(backend.activations) == 0 and backend.activations.size_bytes == 0
    assert backend.activations.stats.hits == 1 and backend.activations.stats.misses == 0
    with torch.no_grad():
        torch.testing.assert_close(output, span(SpanInputs(hidden_states=hidden), prompts=prompts))
    _, _, recomputed = _forward_then_backward(backend, None, None, hidden, grad_out, prompts)
    for got, again, want in zip(reused, recomputed, expected, strict=True):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got, again, rtol=0, atol=0)  # the same computation, bit for bit
    assert all(p.grad is None for p in span.parameters())


def test_a_used_graph_is_freed(backend, span):
    """Nothing refers to a kept graph once its backward ran (no reference cycle through saved tensors)."""
    hidden, grad_out = _tensor(3, 4, span.config.hidden_size, seed=11), _tensor(3, 4, span.config.hidden_size, seed=12)
    flags = dict(start_block=START, end_block=END, activation_id=ID)

    async def calls():
        await backend.forward(SpanRequest(**flags), [hidden])
        kept = backend.activations.take(ID)
        refs = [weakref.ref(chunk.output) for chunk in kept.chunks] + [weakref.ref(kept.inputs.hidden_states)]
        backend.activations.put(ID, kept)
        del kept
        await backend.backward(BackwardRequest(**flags), [hidden, grad_out])
        return refs

    refs = asyncio.run(calls())
    assert backend.activations.stats.hits == 1 and [ref() is None for ref in refs] == [True] * len(refs)


def test_a_backward_that_does_not_match_its_kept_forward_recomputes(backend, span):
    hidden, grad_out = _tensor(3, 4, span.config.hidden_size, seed=4), _tensor(3, 4, span.config.hidden_size, seed=5)
    other = hidden.clone()
    other[2, 3, 0] += 1e-3  # one value differs: the kept graph is not for these inputs
    _, kept, (grad,) = _forward_then_backward(backend, ID, ID, hidden, grad_out, backward_hidden=other)
    assert kept == 1 and len(backend.activations) == 0  # dropped, not left behind
    torch.testing.assert_close(grad, _reference(span, other, grad_out)[0])
    _, _, (grad,) = _forward_then_backward(backend, ID, OTHER_ID, hidden, grad_out)  # an unknown id recomputes
    torch.testing.assert_close(grad, _reference(span, hidden, grad_out)[0])
    stats = backend.activations.stats
    assert (stats.hits, stats.misses) == (0, 2)


def test_a_swapped_span_drops_what_was_kept(backend, span):
    hidden = _tensor(2, 4, span.config.hidden_size, seed=6)
    asyncio.run(backend.forward(SpanRequest(start_block=START, end_block=END, activation_id=ID), [hidden]))
    assert len(backend.activations) == 1 and backend.activations.size_bytes > hidden.numel() * 4
    backend.swap_span(span)
    assert len(backend.activations) == 0 and backend.activations.size_bytes == 0


def test_a_server_with_no_budget_keeps_nothing_and_still_answers(span, compute):
    backend = SpanBackend(span=span, config=_config(cache_mb=0), compute=compute)
    hidden, grad_out = _tensor(3, 4, span.config.hidden_size, seed=7), _tensor(3, 4, span.config.hidden_size, seed=8)
    _, kept, (grad,) = _forward_then_backward(backend, ID, ID, hidden, grad_out)
    assert kept == 0
    torch.testing.assert_close(grad, _reference(span, hidden, grad_out)[0])


def test_a_forward_over_the_whole_budget_is_not_kept(span, compute):
    backend = SpanBackend(span=span, config=_config(cache_mb=0.05), compute=compute)  # 52 KB; this one needs ~100
    hidden, grad_out = _tensor(3, 4, span.config.hidden_size, seed=13), _tensor(3, 4, span.config.hidden_size, seed=14)
    output, kept, (grad,) = _forward_then_backward(backend, ID, ID, hidden, grad_out)
    assert kept == 0 and backend.activations.stats.peak_bytes == 0 and backend.activations.stats.misses == 1
    with torch.no_grad():
        torch.testing.assert_close(output, span(SpanInputs(hidden_states=hidden)))
    torch.testing.assert_close(grad, _reference(span, hidden, grad_out)[0])


def test_kept_forwards_expire_on_the_backend_clock(span, compute):
    clock = Clock()
    backend = SpanBackend(span=span, config=_config(), compute=compute, clock=clock)
    hidden = _tensor(1, 4, span.config.hidden_size, seed=9)
    asyncio.run(backend.forward(SpanRequest(start_block=START, end_block=END, activation_id=ID), [hidden]))
    clock.now += ActivationCacheConfig().activation_ttl_s
    assert backend.activations.take(ID) is None and backend.activations.stats.evictions == 1


@pytest.mark.parametrize("bad", ["short", "has space in it", "x" * 65, "émoji-or-not"])
def test_a_malformed_activation_id_is_refused_clearly(span, compute, bad):
    signer = AnswerSigner(RSAPrivateKey(), dht_prefix="test", dtype="float32", quant="none")
    servicer = BlockServicer(span=span, config=_config(), budget=CacheBudget(16), compute=compute, signer=signer)
    meta = SpanRequest.model_construct(start_block=START, end_block=END, activation_id=bad).model_dump()
    request = pack([_tensor(1, 4, span.config.hidden_size, seed=10)], meta)
    with pytest.raises(InvalidRequestError, match="activation_id must be 8 to 64 characters"):
        asyncio.run(servicer.rpc_forward(request, None))
