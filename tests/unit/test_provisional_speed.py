"""A server's first start on new hardware: a quick provisional speed, then the full measurement on the compute
thread behind every request (one piece at a time), cached for the next start."""

from __future__ import annotations

import asyncio
import threading

import pytest

from corolla.models.checkpoint import resolve_checkpoint
from corolla.server import throughput
from corolla.server.compute import PRIORITY_BACKGROUND, PRIORITY_INFERENCE, ComputeQueue
from tests.fixtures.zoo import zoo_checkpoint


@pytest.fixture(scope="module")
def span():
    from corolla.models.span import load_span

    return load_span(resolve_checkpoint(str(zoo_checkpoint("llama"))), 0, 2)


def test_the_provisional_speed_is_a_quick_inference_only_lower_bound(span):
    report = throughput.provisional_speed(span)
    assert report.inference_rps > 0 and report.forward_rps == report.inference_rps
    assert report.throughput == min(report.inference_rps, report.network_rps or report.inference_rps)


class _Recording(ComputeQueue):
    """A compute queue that notes the priority of each task as it runs."""

    def __init__(self):
        super().__init__(name="test-compute")
        self.ran: list[int] = []

    def submit(self, priority, fn, *, grad=False):
        def noted():
            self.ran.append(priority)
            return fn()

        return super().submit(priority, noted, grad=grad)


def test_the_background_measurement_lets_every_request_go_first(span):
    """With the compute thread held, the measurement's first piece and two requests queue up: the requests run first,
    and a request that comes mid-measurement runs before the measurement's next piece."""

    async def scenario():
        compute, release = _Recording(), threading.Event()
        try:
            held = compute.submit(PRIORITY_INFERENCE, release.wait)
            measuring = asyncio.create_task(
                throughput.measure_speed_on(compute, PRIORITY_BACKGROUND, span, steps=3, forward_tokens=8)
            )
            await asyncio.sleep(0.05)  # the measurement's first piece is queued behind the held task
            requests = [compute.submit(PRIORITY_INFERENCE, lambda: "step") for _ in range(2)]
            release.set()
            await held
            assert await asyncio.gather(*requests) == ["step", "step"]
            while compute.ran.count(PRIORITY_BACKGROUND) < 2:  # the measurement is under way
                await asyncio.sleep(0.001)
            late = compute.submit(PRIORITY_INFERENCE, lambda: "late step")
            assert await late == "late step"
            report = await measuring
        finally:
            compute.shutdown()
        return compute.ran, report

    ran, report = asyncio.run(scenario())
    assert ran[:3] == [PRIORITY_INFERENCE] * 3  # the held task and both requests before any piece
    late_at = len(ran) - 1 - ran[::-1].index(PRIORITY_INFERENCE)
    assert ran[late_at - 1] == PRIORITY_BACKGROUND and PRIORITY_BACKGROUND in ran[late_at + 1 :]  # mid-measurement
    assert ran.count(PRIORITY_BACKGROUND) == 1 + 3 + 2  # warm-up, the steps, the forward's warm-up and its timing
    assert report.inference_rps > 0 and report.forward_rps > 0


def test_a_cached_speed_is_read_back_and_an_unreadable_cache_is_ignored(span, tmp_path):
    assert throughput.cached_speed(span, quant="none", cache_root=tmp_path) is None
    report = throughput.SpeedReport(inference_rps=12.5, forward_rps=400.0, network_rps=None)
    throughput.store_speed(span, report, quant="none", cache_root=tmp_path)
    assert throughput.cached_speed(span, quant="none", cache_root=tmp_path) == report
    assert throughput.cached_speed(span, quant="int8", cache_root=tmp_path) is None  # another format, another key
    (path,) = (tmp_path / "throughput").glob("*.json")
    path.write_text("{not json")
    assert throughput.cached_speed(span, quant="none", cache_root=tmp_path) is None


def test_a_task_that_raises_stop_iteration_fails_instead_of_hanging():
    """asyncio refuses StopIteration as a future's exception: without the compute thread's conversion the awaiting
    request (or a measurement piece) would never resume."""

    def stops():
        raise StopIteration("out of pieces")

    async def scenario():
        compute = ComputeQueue(name="test-compute")
        try:
            with pytest.raises(RuntimeError, match="StopIteration: out of pieces"):
                await asyncio.wait_for(compute.submit(PRIORITY_BACKGROUND, stops), 10)
        finally:
            compute.shutdown()

    asyncio.run(scenario())
