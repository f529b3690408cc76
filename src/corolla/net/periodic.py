"""A background asyncio task that runs a coroutine every period, logging (never raising) its failures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from corolla.log import get_logger

logger = get_logger(__name__)


class PeriodicTask:
    """Calls ``work()`` after each ``next_delay_s()`` seconds until stopped."""

    def __init__(self, name: str, work: Callable[[], Awaitable[object]], next_delay_s: Callable[[], float]):
        self.name, self.work, self.next_delay_s = name, work, next_delay_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.next_delay_s())
            try:
                await self.work()
            except Exception as e:  # a background loop logs and keeps going
                logger.warning("%s failed: %s", self.name, e, exc_info=logger.isEnabledFor(10))
