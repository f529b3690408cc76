"""A server's backend merges the waiting inference steps of concurrent sessions into one forward (in-process).

The compute thread is held busy while the steps arrive, so that they wait together (as they do on a loaded server);
then each session's outputs must equal what the span computes for it alone, the batches must respect the caps, and
a step that cannot run must fail alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch

from corolla.models.checkpoint import resolve_checkpoint
from corolla.models.span import SpanInputs, load_span
from corolla.protocol.messages import InferenceOpen, InferenceStep
from corolla.server import step_batcher
from corolla.server.backend import ACTIVE_WINDOW_S, SpanBackend
from corolla.server.compute import PRIORITY_INFERENCE, ComputeQueue
from corolla.server.config import BatchingConfig, LimitsConfig, ServerConfig
from corolla.server.sessions import SessionTable
from tests.fixtures.zoo import zoo_checkpoint

START, END = 0, 4
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def span():
    return load_span(resolve_checkpoint(str(zoo_checkpoint("qwen2"))), START, END)


@contextlib.contextmanager
def _backend(span, **batching):
    compute = ComputeQueue()
    config = ServerConfig(
        model="tiny", new_swarm=True, limits=LimitsConfig(max_session_length=64), batching=BatchingConfig(**batching)
    )
    try:
        yield SpanBackend(span=span, config=config, compute=compute)
    finally:
        compute.shutdown()


def _hidden(span, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(1, tokens, span.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def _open(backend, table: SessionTable, stack: contextlib.ExitStack, count: int, prefix: str, *, max_length: int):
    """``count`` sessions over the whole span, open until ``stack`` closes."""
    sessions = []
    for i in range(count):
        opened = InferenceOpen(session_id=f"{prefix}{i}", max_length=max_length, start_block=START, end_block=END)
        session_span, cache = backend.new_cache(opened)
        sessions.append(stack.enter_context(table.open(opened, span=session_span, cache=cache)))
    return sessions


async def _hold_compute(backend: SpanBackend) -> threading.Event:
    """Occupy the compute thread until the returned event is set."""
    release, busy = threading.Event(), threading.Event()

    def hold():
        busy.set()
        release.wait(30)

    backend.compute.submit(PRIORITY_INFERENCE, hold)
    await asyncio.to_thread(busy.wait, 30)
    return release


async def _decode_together(backend, span, prompts: list[int], decode: int, *, stagger_s: float = 0.0):
    """Sessions with prompts of the given lengths; their prompts run alone, then ``decode`` rounds of one-token
    steps of every session are sent while the compute thread is held. Returns each session's outputs and inputs."""
    table = SessionTable()
    inputs = [_hidden(span, n + decode, seed=i) for i, n in enumerate(prompts)]
    outputs: list[list[torch.Tensor]] = [[] for _ in prompts]
    with contextlib.ExitStack() as stack:
        sessions = _open(backend, table, stack, len(prompts), "s", max_length=64)
        for i, (session, n) in enumerate(zip(sessions, prompts)):
            outputs[i].append(await backend.step(session, InferenceStep(step_id="p", position=0), [inputs[i][:, :n]]))
        for t in range(decode):
            release = await _hold_compute(backend)
            steps = []
            for i, (session, n) in enumerate(zip(sessions, prompts)):
                step = InferenceStep(step_id=f"d{t}", position=n + t)
                steps.append(asyncio.create_task(backend.step(session, step, [inputs[i][:, n + t : n + t + 1]])))
                await asyncio.sleep(stagger_s)
            await asyncio.sleep(0.05)  # every step is now waiting for the compute thread
            release.set()
            for i, out in enumerate(await asyncio.gather(*steps)):
                outputs[i].append(out)
    return outputs, inputs


def _expected(span, hidden: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return span(SpanInputs(hidden_states=hidden))


def test_waiting_steps_of_four_sessions_run_as_one_forward_and_equal_each_alone(span):
    with _backend(span, max_batch_sessions=8) as backend:
        outputs, inputs = asyncio.run(_decode_together(backend, span, prompts=[3, 8, 5, 1], decode=3))
        stats = backend.batcher.stats
    assert (stats.forwards - stats.alone, stats.steps_batched, stats.largest) == (3, 12, 4)
    for out, hidden in zip(outputs, inputs):
        torch.testing.assert_close(torch.cat(out, dim=1), _expected(span, hidden), atol=ATOL, rtol=RTOL)


def test_batches_are_capped_by_sessions(span):
    with _backend(span, max_batch_sessions=2) as backend:
        outputs, inputs = asyncio.run(_decode_together(backend, span, prompts=[2, 3, 4, 5, 6], decode=1))
        stats = backend.batcher.stats
    assert stats.largest == 2 and stats.steps_batched == 4  # 2 + 2 + 1 of the decode round
    for out, hidden in zip(outputs, inputs):
        torch.testing.assert_close(torch.cat(out, dim=1), _expected(span, hidden), atol=ATOL, rtol=RTOL)


def test_without_batching_every_step_runs_alone(span):
    with _backend(span, max_batch_sessions=1) as backend:
        outputs, inputs = asyncio.run(_decode_together(backend, span, prompts=[2, 4], decode=2))
        assert backend.batcher is None
    for out, hidden in zip(outputs, inputs):
        torch.testing.assert_close(torch.cat(out, dim=1), _expected(span, hidden), atol=ATOL, rtol=RTOL)


def test_a_step_waits_up_to_batch_wait_ms_for_the_other_generating_sessions(monkeypatch):
    """With the compute thread idle, steps of two generating sessions 30 ms apart merge only when the first may wait
    for the second; a session whose next step is not due within the wait, or that has been idle, is not waited for;
    no forward waits longer than half a recent forward's time (the tiny model's take about a millisecond)."""
    span = load_span(resolve_checkpoint(str(zoo_checkpoint("llama"))), START, END)

    async def two_sessions(backend):
        table = SessionTable()
        with contextlib.ExitStack() as stack:
            sessions = _open(backend, table, stack, 2, "w", max_length=8)
            backend.sessions = table
            for i, session in enumerate(sessions):
                await backend.step(session, InferenceStep(step_id="p", position=0), [_hidden(span, 2, i)])
            now = time.monotonic()
            for session in sessions:  # both generate, a step every 30 ms: the next one is due now
                session.last_step_at, session.step_gap_s = now - 0.03, 0.03
            assert [backend._active(s) for s in sessions] == [2, 2]
            sessions[1].step_gap_s = 0.9 * ACTIVE_WINDOW_S  # away (e.g. at other servers) for longer than any wait
            assert backend._active(sessions[0]) == 1
            sessions[1].last_step_at = sessions[0].last_step_at = time.monotonic()
            sessions[1].step_gap_s = 0.03
            first = asyncio.create_task(
                backend.step(sessions[0], InferenceStep(step_id="a", position=2), [_hidden(span, 1, 0)])
            )
            await asyncio.sleep(0.03)
            await backend.step(sessions[1], InferenceStep(step_id="a", position=2), [_hidden(span, 1, 1)])
            await first
            sessions[1].last_step_at -= ACTIVE_WINDOW_S  # idle since: not waited for, whatever its usual gap
            sessions[1].step_gap_s = 0.0
            assert backend._active(sessions[0]) == 1

    with _backend(span, max_batch_sessions=4, batch_wait_ms=500) as backend:
        asyncio.run(two_sessions(backend))
        assert backend.batcher.stats.largest == 1  # 30 ms is far more than half of this model's forward
    monkeypatch.setattr(step_batcher, "WAIT_SHARE", 1e6)  # as if forwards were slow
    with _backend(span, max_batch_sessions=4, batch_wait_ms=500) as backend:
        asyncio.run(two_sessions(backend))
        assert backend.batcher.stats.largest == 2
    with _backend(span, max_batch_sessions=4, batch_wait_ms=0) as backend:
        asyncio.run(two_sessions(backend))
        assert backend.batcher.stats.largest == 1


def test_a_step_that_cannot_run_fails_alone(span):
    """A session closed while its step waited (its cache is gone): that step fails, the batch's others succeed."""

    async def run(backend):
        table = SessionTable()
        hidden = [_hidden(span, 3, seed=i) for i in range(3)]
        with contextlib.ExitStack() as stack:
            sessions = _open(backend, table, stack, 3, "f", max_length=8)
            for i, session in enumerate(sessions):
                await backend.step(session, InferenceStep(step_id="p", position=0), [hidden[i][:, :2]])
            release = await _hold_compute(backend)
            steps = [
                asyncio.create_task(backend.step(s, InferenceStep(step_id="d", position=2), [hidden[i][:, 2:]]))
                for i, s in enumerate(sessions)
            ]
            await asyncio.sleep(0.05)
            sessions[1].cache = None  # as when its client disconnects while the step waits
            release.set()
            results = await asyncio.gather(*steps, return_exceptions=True)
        return results, hidden

    with _backend(span, max_batch_sessions=8) as backend:
        (first, broken, last), hidden = asyncio.run(run(backend))
    assert isinstance(broken, Exception)
    torch.testing.assert_close(first, _expected(span, hidden[0])[:, 2:], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(last, _expected(span, hidden[2])[:, 2:], atol=ATOL, rtol=RTOL)


def test_a_server_stops_waiting_when_waits_bring_nothing(monkeypatch):
    """A session that looks due but never sends (as one busy at another server of a pipeline): after a few waits
    that gained nothing the server stops waiting, except for an occasional probe."""
    span = load_span(resolve_checkpoint(str(zoo_checkpoint("llama"))), START, END)
    monkeypatch.setattr(step_batcher, "WAIT_SHARE", 1e6)  # as if forwards were slow

    async def scenario(backend):
        table = SessionTable()
        backend.sessions = table
        with contextlib.ExitStack() as stack:
            active, silent = _open(backend, table, stack, 2, "q", max_length=32)
            for t in range(16):
                silent.last_step_at, silent.step_gap_s = time.monotonic(), 0.001  # due now, every time
                await backend.step(active, InferenceStep(step_id=f"s{t}", position=t), [_hidden(span, 1, t)])

    with _backend(span, max_batch_sessions=4, batch_wait_ms=20) as backend:
        asyncio.run(scenario(backend))
        stats = backend.batcher.stats
    assert stats.waits_gained == 0 and stats.steps_batched == 0
    assert 4 <= stats.waits <= 4 + 16 // step_batcher.PROBE_EVERY, stats
