"""Keeps one signed record of a peer fresh in the DHT: announced at each lifecycle change and every period.

The announcer knows nothing of a role's schema or keys: ``make_record(state)`` builds the record for a lifecycle
state and ``store(record, expiration_s)`` writes it (e.g. ``net.dht_records.declare_blocks`` for a block server,
``declare_stage_peer`` for a SWARM stage peer). A record expires ``EXPIRATION_PERIODS`` periods after its last
announcement, so a peer that vanishes without saying OFFLINE drops out of the swarm soon after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hivemind.utils import MPFuture

from corolla.log import get_logger
from corolla.net.periodic import PeriodicTask
from corolla.protocol.records import PeerState, SignedRecord

logger = get_logger(__name__)

EXPIRATION_PERIODS = 2.5

Store = Callable[[SignedRecord, float], MPFuture]
"""Writes a record with an expiration (seconds from now); the MPFuture resolves to whether the DHT took it."""


class Announcer:
    """Announces ``make_record(self.state)`` now (``announce_now``, ``set_state``) and every ``period_s`` seconds
    once started."""

    def __init__(
        self,
        *,
        name: str,
        store: Store,
        make_record: Callable[[PeerState], SignedRecord],
        period_s: float,
        state: PeerState = PeerState.JOINING,
        before_announce: Callable[[], Awaitable[None]] | None = None,
    ):
        """``before_announce`` runs before each periodic announcement (e.g. refresh pings the record publishes);
        its failure is logged and the announcement goes ahead."""
        self.name, self.store, self.make_record, self.period_s = name, store, make_record, period_s
        self.state = state
        self.before_announce = before_announce
        self._periodic = PeriodicTask(f"Announcing the {name}", self._announce_periodically, lambda: self.period_s)

    @property
    def expiration_s(self) -> float:
        return EXPIRATION_PERIODS * self.period_s

    async def announce_now(self, record: SignedRecord | None = None, timeout_s: float = 30.0) -> bool:
        """Store ``record`` (default: the record of the current state); False if some DHT nodes refused it."""
        record = record or self.make_record(self.state)
        ok = await asyncio.wait_for(asyncio.wrap_future(self.store(record, self.expiration_s)), timeout_s)
        if not ok:
            logger.warning("Some DHT nodes did not accept the %s (%s)", self.name, getattr(record, "state", record))
        return ok

    async def set_state(self, state: PeerState, timeout_s: float = 30.0) -> bool:
        """Move to ``state`` (JOINING -> ONLINE -> OFFLINE) and announce it at once."""
        self.state = state
        return await self.announce_now(timeout_s=timeout_s)

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def _announce_periodically(self) -> None:
        if self.before_announce is not None:
            try:
                await self.before_announce()
            except Exception as e:  # stale extras must never stop the announcement itself
                logger.debug("Preparing the announcement of the %s failed: %s", self.name, e)
        await self.announce_now()
