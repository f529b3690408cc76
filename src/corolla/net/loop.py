"""One background asyncio loop per client process, so synchronous APIs (generate, forward) can await RPCs."""

from __future__ import annotations

import asyncio
import atexit
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
            atexit.register(_stop, loop)
        return _loop


def run_sync(coro: Coroutine, timeout_s: float | None = None) -> Any:
    """Run ``coro`` on the background loop and wait for its result (TimeoutError after ``timeout_s``)."""
    future = asyncio.run_coroutine_threadsafe(coro, background_loop())
    try:
        return future.result(timeout_s)
    except TimeoutError:
        future.cancel()
        raise


def _stop(loop: asyncio.AbstractEventLoop, timeout_s: float = 2.0) -> None:
    """At exit: cancel what still runs on the loop (e.g. hivemind's connection readers), then stop it quietly."""

    async def cancel_all() -> None:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    if loop.is_closed() or not loop.is_running():
        return
    try:
        asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout_s)
    except Exception:  # exiting anyway: never turn a clean exit into a traceback
        pass
    loop.call_soon_threadsafe(loop.stop)
