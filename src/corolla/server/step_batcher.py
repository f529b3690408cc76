"""Continuous batching: inference steps of concurrent sessions that wait for the compute thread run as one forward.

A step that arrives while the compute thread is busy waits in a list; when the thread gets to it, it takes every
waiting step, groups the ones that can share a forward (same key: span, blocks, adapter, new tokens) into batches of
at most ``max_batch_sessions`` sessions and ``max_batch_tokens`` tokens, and runs each batch. A lone step runs alone
as before, so a server with one client pays nothing.

Left alone, concurrent sessions settle into groups that take turns on the compute thread (while one group's forward
runs, the other's steps arrive and wait; the first group's next steps arrive just after the second group started),
so each forward holds only part of them. ``batch_wait_ms`` breaks that up: when the compute thread gets to the
waiting steps and some sessions that are generating now are missing, it waits for their steps up to that long, and
never longer than half the time a forward takes (waiting longer would cost more than running the late ones apart).
Waiting only pays while the missing steps do arrive: in a pipeline the sessions missing at one server are often busy
at another, and their steps come later than any wait. So when recent waits mostly brought nothing, the server stops
waiting, trying again before one drain in ``PROBE_EVERY``.

Each step still gets its own answer or its own error: a batch that fails is retried step by step, so a step that
cannot run fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from corolla.log import get_logger
from corolla.server.compute import PRIORITY_INFERENCE, ComputeQueue, call_soon

logger = get_logger(__name__)

WAIT_SHARE = 0.5  # a forward waits for missing sessions at most this share of a recent forward's time
PROBE_EVERY = 8  # when waiting has stopped paying, still wait before one drain in this many, to notice a change


@dataclass(kw_only=True)
class BatchItem:
    """One step waiting for the compute thread."""

    key: Hashable  # steps with equal keys may share a forward
    tokens: int  # rows x new tokens
    payload: Any  # handed to the group runner
    expected: int  # sessions of this key generating when it arrived (this one's included)
    loop: asyncio.AbstractEventLoop = field(repr=False)
    arrived: float = field(default_factory=time.monotonic)
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    """What batching did since the server started."""

    steps: int = 0  # steps run
    forwards: int = 0  # forwards run for them (steps / forwards = mean batch size)
    alone: int = 0  # steps that had a forward of their own
    largest: int = 0  # most steps in one forward
    waits: int = 0  # times the compute thread waited for sessions that were due
    waits_gained: int = 0  # ... and another step arrived meanwhile

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
        self._changed = threading.Condition()  # guards _waiting and _drain_pending; notified on each arrival
        self._waiting: list[BatchItem] = []
        self._drain_pending = False  # a drain is queued on the compute thread and has not taken the steps yet
        self._forward_s = 0.0  # recent time of a forward (moving average): a wait for others is a share of it
        self._wait_gain = 1.0  # how often recent waits brought another step (moving average)
        self._drains = 0

    async def run(self, key: Hashable, payload: Any, *, tokens: int, expected: int = 1) -> Any:
        """The result of ``payload``'s step, computed alone or in a batch with other waiting steps of ``key``.

        ``expected``: how many sessions (this one included) are generating with this key now. When the compute
        thread gets to the waiting steps and fewer than that are there, it waits up to ``wait_s`` for the others
        (sessions whose previous step just finished send their next one a round trip later). A lone session never
        waits.
        """
        loop = asyncio.get_running_loop()
        item = BatchItem(
            key=key, tokens=tokens, payload=payload, expected=expected, loop=loop, future=loop.create_future()
        )
        with self._changed:
            self._waiting.append(item)
            submit, self._drain_pending = not self._drain_pending, True
            self._changed.notify()
        if submit:
            drained = self.compute.submit(PRIORITY_INFERENCE, self._drain)
            drained.add_done_callback(_log_failure)
        return await item.future

    def _drain(self) -> None:
        """On the compute thread: wait (at most ``wait_s``) for the sessions expected to join, then run every
        waiting step, in batches."""
        self._drains += 1
        worth_it = self._wait_gain >= 0.5 or self._drains % PROBE_EVERY == 0
        deadline = time.monotonic() + (self.wait_limit_s() if worth_it else 0.0)
        with self._changed:
            before = len(self._waiting)
            if not self._complete() and deadline > time.monotonic():
                self.stats.waits += 1
                while not self._complete() and (left := deadline - time.monotonic()) > 0:
                    self._changed.wait(left)
                gained = len(self._waiting) > before
                self.stats.waits_gained += gained
                self._wait_gain = 0.8 * self._wait_gain + 0.2 * gained
            waiting, self._waiting = self._waiting, []
            self._drain_pending = False
        for batch in self._batches([item for item in waiting if not item.future.cancelled()]):
            try:
                self._run_batch(batch)
            except BaseException as e:  # never leave a step unanswered: its session would wait for its timeout
                logger.error("Batched steps failed outside their computation: %s", e)
                for item in batch:
                    _resolve(item, error=e)

    def wait_limit_s(self) -> float:
        """How long a forward may wait for missing sessions now: ``wait_s``, at most a share of a recent forward."""
        return min(self.wait_s, WAIT_SHARE * self._forward_s)

    def _complete(self) -> bool:
        """Whether every key's waiting steps make a full batch or all the sessions expected for it."""
        counts: dict[Hashable, list[int]] = {}
        for item in self._waiting:
            entry = counts.setdefault(item.key, [0, 1])
            entry[0] += 1
            entry[1] = max(entry[1], item.expected)
        return all(count >= min(expected, self.max_sessions) for count, expected in counts.values())

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
        started = time.monotonic()
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
        took = time.monotonic() - started
        self._forward_s = took if self.stats.forwards == 0 else 0.8 * self._forward_s + 0.2 * took
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "Ran %d steps in one forward in %.1f ms; they waited %.1f-%.1f ms",
                len(batch), took * 1e3,
                (started - batch[-1].arrived) * 1e3, (started - batch[0].arrived) * 1e3,
            )  # fmt: skip
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
