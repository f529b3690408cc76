"""One background asyncio loop per client process, so synchronous APIs (generate, forward) can await RPCs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The process-wide loop running in a daemon thread (started on first use)."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="corolla-client-loop", daemon=True).start()
            _loop = loop
        return _loop


def run_sync(coro: Coroutine, timeout_s: float | None = None) -> Any:
    """Run ``coro`` on the background loop and wait for its result (TimeoutError after ``timeout_s``)."""
    future = asyncio.run_coroutine_threadsafe(coro, background_loop())
    try:
        return future.result(timeout_s)
    except TimeoutError:
        future.cancel()
        raise
