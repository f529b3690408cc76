"""A fixed budget of attention-cache tokens shared by all inference sessions of a server."""

from __future__ import annotations

import asyncio
import contextlib

from corolla.errors import ServerBusyError


class CacheBudget:
    """Hands out reservations of cache tokens; a request that does not fit waits up to its timeout, then fails."""

    def __init__(self, total_tokens: int):
        if total_tokens <= 0:
            raise ValueError(f"total_tokens must be positive, got {total_tokens}")
        self.total_tokens = total_tokens
        self._used = 0
        self._changed: asyncio.Condition | None = None

    @property
    def tokens_left(self) -> int:
        return self.total_tokens - self._used

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    @contextlib.asynccontextmanager
    async def reserve(self, tokens: int, *, timeout_s: float):
        """Reserve ``tokens`` for the duration of the ``async with`` block (always released, also on errors)."""
        if tokens > self.total_tokens:
            raise ServerBusyError(
                f"a session needs {tokens} cache tokens but this server's whole budget is {self.total_tokens}; "
                f"use a shorter max_length or a smaller batch"
            )
        condition = self._condition()
        async with condition:
            try:
                await asyncio.wait_for(condition.wait_for(lambda: self.tokens_left >= tokens), timeout_s)
            except asyncio.TimeoutError:
                raise ServerBusyError(
                    f"server busy: no room for {tokens} cache tokens within {timeout_s:.1f} s "
                    f"({self.tokens_left} of {self.total_tokens} free); try another server or later"
                ) from None
            self._used += tokens
        try:
            yield
        finally:
            async with condition:
                self._used -= tokens
                condition.notify_all()
