"""Moves a server to other blocks when that clearly improves the swarm's bottleneck throughput.

Every period (uniformly random in [0.5, 1.5] x the mean, so servers do not move in lockstep) the server reads the
swarm from the DHT and asks the pure policy ``should_choose_other_blocks`` (simulate the swarm with this server
moved, let the others settle, compare bottlenecks). If the answer is yes it moves to ``choose_best_span``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from hivemind.dht import DHT

from corolla.algorithms.block_selection import choose_best_span, should_choose_other_blocks
from corolla.algorithms.spans import ServerSpan
from corolla.log import get_logger
from corolla.net.dht_records import collect_servers, fetch_block_records, to_spans
from corolla.net.periodic import PeriodicTask

logger = get_logger(__name__)


class Rebalancer:
    """Periodic balance check of one server. ``own()`` describes the server now; ``move(start, end)`` moves it."""

    def __init__(
        self,
        *,
        dht: DHT,
        dht_prefix: str,
        num_layers: int,
        own: Callable[[], ServerSpan],
        move: Callable[[int, int], Awaitable[None]],
        period_s: float,
        balance_quality: float,
        rng: random.Random | None = None,
        records: Callable[[], list] | None = None,
    ):
        """``rng`` draws the periods; ``records`` returns the per-block server records (default: read from
        ``dht``). Both are seams for tests."""
        self.dht, self.dht_prefix, self.num_layers = dht, dht_prefix, num_layers
        self.records = records or self._records_from_dht
        self.own, self.move = own, move
        self.period_s, self.balance_quality = period_s, balance_quality
        self.rng = rng or random.Random()
        # a random period around the mean, so that servers do not all move at once
        self._periodic = PeriodicTask(
            "Balance check", self.check_once, lambda: self.period_s * self.rng.uniform(0.5, 1.5)
        )

    def _records_from_dht(self) -> list:
        return fetch_block_records(self.dht, dht_prefix=self.dht_prefix, num_blocks=self.num_layers)

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def check_once(self) -> bool:
        """Look at the swarm now and move if worthwhile; returns whether the server moved."""
        records = await asyncio.to_thread(self.records)  # DHT reads block: off the event loop
        own = self.own()
        servers = collect_servers(records, include_joining=True)  # a server already moving into a hole fills it
        swarm = [s for s in to_spans(servers) if s.peer_id != own.peer_id]
        if not should_choose_other_blocks(own, [*swarm, own], self.num_layers, balance_quality=self.balance_quality):
            logger.debug("Balance check: staying on blocks %d:%d", own.start, own.end)
            return False
        start, end = choose_best_span(swarm, self.num_layers, own.end - own.start, own.throughput)
        if (start, end) == (own.start, own.end):
            return False
        logger.info("Rebalancing: moving from blocks %d:%d to %d:%d", own.start, own.end, start, end)
        await self.move(start, end)
        return True
