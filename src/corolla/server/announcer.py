"""Keeps a server's records in the DHT fresh: republished every period, expiring soon after it vanishes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hivemind.dht import DHT

from corolla.log import get_logger
from corolla.net.dht_records import declare_blocks
from corolla.protocol.server_info import ServerInfo
from corolla.server.periodic import PeriodicTask

logger = get_logger(__name__)


class Announcer:
    """Announces ``make_info()`` for blocks start..end-1 now and then every ``period_s`` seconds."""

    def __init__(
        self,
        *,
        dht: DHT,
        dht_prefix: str,
        owner: bytes,
        make_info: Callable[[], ServerInfo],
        period_s: float,
        before_announce: Callable[[], Awaitable[None]] | None = None,
    ):
        self.dht, self.dht_prefix, self.owner = dht, dht_prefix, owner
        self.make_info, self.period_s = make_info, period_s
        self.before_announce = before_announce  # e.g. refresh the pings published in the record
        self._periodic = PeriodicTask("Announcing to the DHT", self._announce_periodically, lambda: self.period_s)

    @property
    def expiration_s(self) -> float:
        return 2.5 * self.period_s

    async def announce_now(self, info: ServerInfo | None = None, timeout_s: float = 30.0) -> bool:
        info = info or self.make_info()
        future = declare_blocks(
            self.dht,
            dht_prefix=self.dht_prefix,
            blocks=range(info.start_block, info.end_block),
            owner=self.owner,
            info=info,
            expiration_s=self.expiration_s,
        )
        ok = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        if not ok:
            logger.warning("Some DHT nodes did not accept our announcement (state %s)", info.state.name)
        return ok

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def _announce_periodically(self) -> None:
        if self.before_announce is not None:
            try:
                await self.before_announce()
            except Exception as e:  # stale pings must never stop the announcement itself
                logger.debug("Preparing the announcement failed: %s", e)
        await self.announce_now()
