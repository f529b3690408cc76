"""Continuous batching: inference steps of concurrent sessions that wait for the compute thread run as one forward.

A step that arrives while the compute thread is busy waits in a list; when the thread gets to it, it takes every
waiting step, groups the ones that can share a forward (same key: span, blocks, adapter, new tokens) into batches of
at most ``max_batch_sessions`` sessions and ``max_batch_tokens`` tokens, and runs each batch. A lone step runs alone
as before, so a server with one client pays nothing. ``batch_wait_ms`` lets a step wait that long for others to join
when fewer than a full batch are waiting (0 by default: batches form only from steps that queue up anyway).

Each step still gets its own answer or its own error: a batch that fails is retried step by step, so a step that
cannot run fails alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from corolla.log import get_logger
from corolla.server.compute import PRIORITY_INFERENCE, ComputeQueue, call_soon

logger = get_logger(__name__)


@dataclass(kw_only=True)
class BatchItem:
    """One step waiting for the compute thread."""

    key: Hashable  # steps with equal keys may share a forward
    tokens: int  # rows x new tokens
    payload: Any  # handed to the group runner
    loop: asyncio.AbstractEventLoop = field(repr=False)
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    """What batching did since the server started."""

    steps: int = 0  # steps run
    forwards: int = 0  # forwards run for them (steps / forwards = mean batch size)
    alone: int = 0  # steps that had a forward of their own
    largest: int = 0  # most steps in one forward

    @property
    def steps_batched(self) -> int:
        """Steps that shared their forward with another session's."""
        return self.steps - self.alone


RunGroup = Callable[[list[Any]], list[Any]]  # payloads of one key -> their results (on the compute thread)


class StepBatcher:
    """Merges waiting steps into batches on the compute thread; ``run_group`` computes one batch."""

    def __init__(
        self, compute: ComputeQueue, run_group: RunGroup, *, max_sessions: int, max_tokens: int, wait_s: float = 0.0
    ):
        self.compute, self.run_group = compute, run_group
        self.max_sessions, self.max_tokens, self.wait_s = max_sessions, max_tokens, wait_s
        self.stats = BatchStats()
        self._lock = threading.Lock()
        self._waiting: list[BatchItem] = []
        self._drain_pending = False  # a drain is queued (or about to be) on the compute thread
        self._timer: asyncio.TimerHandle | None = None  # a drain delayed by wait_s

    async def run(self, key: Hashable, payload: Any, *, tokens: int) -> Any:
        """The result of ``payload``'s step, computed alone or in a batch with other waiting steps of ``key``."""
        loop = asyncio.get_running_loop()
        item = BatchItem(key=key, tokens=tokens, payload=payload, loop=loop, future=loop.create_future())
        with self._lock:
            self._waiting.append(item)
            first, full = not self._drain_pending, len(self._waiting) >= self.max_sessions
            self._drain_pending = True
        if first and self.wait_s > 0 and not full:
            self._timer = loop.call_later(self.wait_s, self._submit_drain)
        elif first or (full and self._timer is not None):
            self._submit_drain()
        return await item.future

    def _submit_drain(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        drained = self.compute.submit(PRIORITY_INFERENCE, self._drain)
        drained.add_done_callback(_log_failure)

    def _drain(self) -> None:
        """On the compute thread: run every waiting step, in batches."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
            self._drain_pending = False
        for batch in self._batches([item for item in waiting if not item.future.cancelled()]):
            self._run_batch(batch)

    def _batches(self, items: list[BatchItem]) -> list[list[BatchItem]]:
        """Items grouped by key (in order of arrival), each group cut to the session and token caps."""
        groups: dict[Hashable, list[list[BatchItem]]] = {}
        for item in items:
            batches = groups.setdefault(item.key, [[]])
            batch = batches[-1]
            if batch and (
                len(batch) >= self.max_sessions or sum(i.tokens for i in batch) + item.tokens > self.max_tokens
            ):
                batch = []
                batches.append(batch)
            batch.append(item)
        return [batch for batches in groups.values() for batch in batches]

    def _run_batch(self, batch: list[BatchItem]) -> None:
        try:
            results = self.run_group([item.payload for item in batch])
        except BaseException as e:
            if len(batch) == 1:
                _resolve(batch[0], error=e)
                return
            logger.warning("A batch of %d steps failed (%s); running them one by one", len(batch), e)
            for item in batch:
                self._run_batch([item])
            return
        self.stats.steps += len(batch)
        self.stats.forwards += 1
        self.stats.largest = max(self.stats.largest, len(batch))
        self.stats.alone += len(batch) == 1
        for item, result in zip(batch, results):
            _resolve(item, result=result)


def _resolve(item: BatchItem, *, result: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if item.future.done():
            return
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)

    call_soon(item.loop, settle)


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("Batched steps failed outside any step: %s", future.exception())
