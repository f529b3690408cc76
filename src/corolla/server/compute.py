"""One compute thread per server, running inference steps before forward/backward work.

Tasks run under ``torch.inference_mode`` except backward tasks (``grad=True``), which need autograd. Block
weights never require gradients, so a backward pass only ever computes gradients of the request's own tensors.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from corolla.log import get_logger

logger = get_logger(__name__)

PRIORITY_INFERENCE = 0
PRIORITY_FORWARD = 1  # forward and backward passes of training
PRIORITY_BACKGROUND = 2  # the server's own work (measuring its speed): after every request


class ComputeQueue:
    """Runs submitted functions on one thread in priority order (lower first, FIFO within a priority)."""

    def __init__(self, name: str = "corolla-compute"):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._counter = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[[], Any], *, grad: bool = False) -> asyncio.Future:
        """Schedule ``fn`` and return an asyncio future (of the running loop) with its result.

        ``grad``: run with autograd enabled (backward passes) instead of in inference mode.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((priority, next(self._counter), fn, grad, loop, future))
        return future

    def shutdown(self) -> None:
        self._queue.put((-1, -1, None, False, None, None))
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            _, _, fn, grad, loop, future = self._queue.get()
            if fn is None:
                return
            if future.cancelled():
                continue
            setter, value = _outcome(fn, grad)
            # hold nothing of a finished task (e.g. a backward's kept graph) once its awaiter can resume
            del fn
            call_soon(loop, setter, future, value)
            del setter, value, future


def _outcome(fn: Callable[[], Any], grad: bool) -> tuple[Callable, Any]:
    """Run ``fn``: (the future's setter, its result or error)."""
    try:
        with torch.enable_grad() if grad else torch.inference_mode():
            return _set_result, fn()
    except StopIteration as e:  # a future cannot hold StopIteration (asyncio refuses it): it would never resolve
        return _set_exception, RuntimeError(f"the task raised StopIteration: {e}")
    except BaseException as e:  # handed to the awaiting request, which reports it
        return _set_exception, e


def call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run ``callback`` on ``loop``; nothing if the loop has closed meanwhile (its awaiter is gone): the compute
    thread must outlive any one event loop that submitted work."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _set_result(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
