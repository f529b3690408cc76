"""What a block server is serving now, and the record it announces about it.

One object, mutated only by the server's event loop: the span it serves (swapped when it rebalances), where it is
moving to meanwhile, its measured speed, its cache budget and its pings to the servers after it. ``record(state)``
turns that into the ``ServerInfo`` every announcement (periodic or at a lifecycle change) publishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corolla.net.ping import RttTracker
from corolla.protocol.server_info import ServerInfo, ServerState
from corolla.server.config import ServerConfig
from corolla.server.memory_cache import CacheBudget

if TYPE_CHECKING:
    from corolla.server.throughput import SpeedReport

MAX_PUBLISHED_PINGS = 5


@dataclass
class ServingState:
    config: ServerConfig
    span: object  # the loaded span (corolla.models.span), with .start, .end and parameters
    budget: CacheBudget
    speed: SpeedReport | None = None
    moving_to: tuple[int, int] | None = None  # blocks being loaded while the old span still serves
    next_rtts: RttTracker = field(default_factory=RttTracker)
    relayed: bool = False  # this server is reached through relays
    relay_addrs: tuple[str, ...] = ()  # ... at these addresses

    def record(self, state: ServerState = ServerState.ONLINE, *, span=None) -> ServerInfo:
        """The announcement for ``state``: about ``span`` if given (e.g. OFFLINE on the blocks being left), else
        about the blocks served now; while moving, an ONLINE announcement says JOINING on the new blocks, so that
        periodic announcements also tell others where this server is heading."""
        cfg, speed = self.config, self.speed
        start, end = (span or self.span).start, (span or self.span).end
        if span is None and state == ServerState.ONLINE and self.moving_to is not None:
            state, (start, end) = ServerState.JOINING, self.moving_to
        return ServerInfo(
            state=state,
            start_block=start,
            end_block=end,
            throughput=speed.throughput if speed else cfg.announce.nominal_throughput(),
            inference_rps=speed.inference_rps if speed else None,
            forward_rps=speed.forward_rps if speed else None,
            network_rps=speed.network_rps if speed else None,
            cache_tokens_left=self.budget.tokens_left,
            dtype=str(next((span or self.span).parameters()).dtype).removeprefix("torch."),
            quant=cfg.span.quant,
            adapters=cfg.span.adapter_names(),
            public_name=cfg.announce.public_name,
            relayed=self.relayed,
            relay_addrs=self.relay_addrs,
            next_pings=self.next_rtts.snapshot(limit=MAX_PUBLISHED_PINGS),
        )
