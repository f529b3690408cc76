"""A stage peer's worker and RPC handlers without any network: at-most-once accumulation, state download round
trip, and requests that fail alone with a message saying what was wrong."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import torch

from corolla.errors import InvalidRequestError
from corolla.models.stages import StageLayout, load_training_model, split_stage
from corolla.net.tensors import pack, unpack_metadata, unpack_tensors
from corolla.protocol.stage_messages import StageBackward, StageForward, StagePeerStatus
from corolla.training.stage_handler import StageHandler
from corolla.training.stage_worker import StageWorker
from tests.fixtures.zoo import zoo_checkpoint


@pytest.fixture(scope="module")
def model():
    return load_training_model(str(zoo_checkpoint("llama")), random_init=True, seed=0)


def _worker(model, stage: int, num_stages: int = 2) -> StageWorker:
    layout = StageLayout.even(model.config.num_hidden_layers, num_stages)
    return StageWorker(split_stage(model, stage, layout), lr=1e-3, weight_decay=0.0)


def _grads(worker: StageWorker) -> list[torch.Tensor]:
    return [p.grad.clone() for p in worker.params]


def test_a_retried_backward_returns_the_gradient_but_is_accumulated_once(model):
    worker = _worker(model, 1)
    hidden = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    first = worker.backward("mb-1", hidden, labels)
    accumulated = _grads(worker)
    again = worker.backward("mb-1", hidden, labels)
    assert first.accumulated and not again.accumulated
    torch.testing.assert_close(again.grad_inputs, first.grad_inputs)
    assert again.loss == pytest.approx(first.loss)
    for before, after in zip(accumulated, _grads(worker)):
        assert torch.equal(before, after)
    assert worker.samples == 2
    worker.backward("mb-2", hidden, labels)
    assert worker.samples == 4
    for before, after in zip(accumulated, _grads(worker)):
        torch.testing.assert_close(after, 2 * before)


def test_the_step_uses_the_sample_weighted_mean_gradient(model):
    worker, reference = _worker(model, 1), _worker(model, 1)
    hidden = torch.randn(3, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 16, (3, 8), generator=torch.Generator().manual_seed(3))
    worker.backward("a", hidden[:1], labels[:1])
    worker.backward("b", hidden[1:], labels[1:])
    worker.apply_step(worker.mean_gradients())
    optimizer = torch.optim.AdamW(reference.params, lr=1e-3, weight_decay=0.0)
    reference.stage(hidden, labels=labels).backward()  # the mean over all 3 samples' tokens (same lengths)
    optimizer.step()
    for p, q in zip(worker.params, reference.params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # Adam moves every weight by ~lr = 1e-3
    assert worker.epoch == 1 and worker.samples == 0


def test_a_downloaded_state_continues_training_exactly(model):
    donor, joiner = _worker(model, 0), _worker(model, 0)
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(4))
    grad = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    for step in range(2):
        donor.backward(f"s{step}", ids, grad)
        donor.apply_step(donor.mean_gradients())
    with torch.no_grad():
        for p in joiner.params:
            p.add_(1.0)  # anything else
    joiner.load_state(donor.state())
    assert joiner.epoch == donor.epoch == 2 and joiner.parameters_digest() == donor.parameters_digest()
    for worker in (donor, joiner):
        worker.backward("next", ids, grad)
        worker.apply_step(worker.mean_gradients())
    assert joiner.parameters_digest() == donor.parameters_digest()  # Adam's moments came along too
    with pytest.raises(ValueError, match="does not fit"):
        _worker(model, 1).load_state(donor.state())


def _handler(worker: StageWorker, **kwargs) -> StageHandler:
    status = StagePeerStatus(
        experiment="exp",
        stage=0,
        epoch=0,
        samples_accumulated=0,
        queue_length=0,
        throughput_sps=0.0,
        parameters_digest="",
        version="test",
    )
    return StageHandler(
        experiment="exp",
        current=lambda: worker,
        executor=concurrent.futures.ThreadPoolExecutor(max_workers=1),
        max_request_samples=kwargs.pop("max_request_samples", 8),
        status=lambda: status,
    )


def _call(handler: StageHandler, rpc: str, tensors, **meta):
    schema = StageBackward if rpc == "backward" else StageForward
    fields = dict(experiment="exp", stage=0, microbatch_id="mb") | meta
    request = pack(tensors, schema.model_construct(**fields).model_dump())  # not validated: the peer must
    return asyncio.run(getattr(handler, f"rpc_{rpc}")(request, None))


def test_a_forward_request_is_answered_with_outputs_and_compute_time(model):
    handler = _handler(_worker(model, 0))
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(6))
    response = _call(handler, "forward", [ids])
    (outputs,) = unpack_tensors(response)
    assert outputs.shape == (2, 8, model.config.hidden_size)
    assert unpack_metadata(response)["compute_s"] >= 0


@pytest.mark.parametrize(
    ("rpc", "tensors", "meta", "message"),
    [
        ("forward", [torch.full((2, 8), 10_000)], {}, "token ids outside 0..511"),
        ("forward", [torch.zeros(2, 8, 64)], {}, "integer token ids"),
        ("forward", [torch.zeros(9, 8, dtype=torch.long)], {}, "over this peer's limit of 8"),
        ("forward", [torch.zeros(2, 8, dtype=torch.long)], {"stage": 1}, "serves stage 0 of experiment 'exp'"),
        ("forward", [torch.zeros(2, 8, dtype=torch.long)], {"experiment": "other"}, "not stage 0 of 'other'"),
        ("forward", [torch.zeros(2, 8, dtype=torch.long)], {"output_compression": "ZIP"}, "unknown compression"),
        ("backward", [torch.zeros(2, 8, dtype=torch.long)], {}, "carries 2 tensors"),
        ("backward", [torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 7, 64)], {}, "grad_outputs must be"),
        ("backward", [torch.zeros(2, 8, dtype=torch.long), torch.full((2, 8, 64), float("nan"))], {}, "NaN"),
    ],
    ids=[
        "ids-out-of-range",
        "floats-for-ids",
        "oversized",
        "wrong-stage",
        "wrong-experiment",
        "bad-codec",
        "missing-tensor",
        "bad-grad-shape",
        "nan-grads",
    ],
)
def test_bad_requests_fail_alone_with_a_message(model, rpc, tensors, meta, message):
    worker = _worker(model, 0)
    handler = _handler(worker)
    with pytest.raises(InvalidRequestError, match=message):
        _call(handler, rpc, tensors, **meta)
    assert worker.samples == 0 and not worker.ledger.accumulated
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(7))
    assert unpack_tensors(_call(handler, "forward", [ids]))  # and the next request is served


def _chunks(request):
    from hivemind.proto import runtime_pb2
    from hivemind.utils.streaming import split_for_streaming

    async def messages():
        yield runtime_pb2.ExpertRequest(metadata=request.metadata)
        for tensor in request.tensors:
            for chunk in split_for_streaming(tensor, 4096):
                yield runtime_pb2.ExpertRequest(tensors=[chunk])

    return messages()


def test_a_streamed_request_is_answered_like_a_unary_one_and_refused_past_the_limit(model):
    from hivemind.proto import runtime_pb2

    from corolla.net.tensors import combine_chunks

    worker = _worker(model, 1)
    handler = _handler(worker)
    hidden = torch.randn(4, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(8))
    labels = torch.randint(0, 16, (4, 16), generator=torch.Generator().manual_seed(9))
    meta = StageBackward(experiment="exp", stage=1, microbatch_id="big").model_dump()
    request = pack([hidden, labels], meta)

    replies = asyncio.run(_drain(handler, request))
    assert replies and replies[0].metadata  # the metadata leads the (chunked) answer
    parts = [t for reply in replies for t in reply.tensors]
    answer = runtime_pb2.ExpertResponse(metadata=replies[0].metadata, tensors=combine_chunks(parts))
    assert unpack_metadata(answer)["accumulated"] is True
    retried = _call(handler, "backward", [hidden, labels], stage=1, microbatch_id="big")  # the same id, unary
    torch.testing.assert_close(unpack_tensors(answer)[0], unpack_tensors(retried)[0])
    assert worker.samples == 4

    small = StageHandler(
        experiment="exp", current=lambda: worker, executor=handler.executor, max_request_samples=8,
        status=handler.status, max_request_bytes=10_000,
    )  # fmt: skip
    with pytest.raises(InvalidRequestError, match="over this peer's limit of"):
        asyncio.run(_drain(small, request))


async def _drain(handler: StageHandler, request):
    return [m async for m in handler.rpc_backward_stream(_chunks(request), None)]
