"""The server's balance check over a fixed view of the swarm (no DHT): it moves into a hole, and it does not follow
another server that is already moving into the same hole."""

from __future__ import annotations

import asyncio
import random

import pytest
from hivemind.p2p import PeerID

from corolla.algorithms.spans import ServerSpan
from corolla.protocol.server_info import ServerInfo, ServerState
from corolla.server.rebalancer import Rebalancer

NUM_LAYERS = 30
SELF, STEADY, MOVER, SPARE = (PeerID(f"{name}-peer-id".encode()) for name in ("self", "steady", "mover", "spare"))


def _records(*servers: tuple[PeerID, ServerState, int, int]) -> list[dict[PeerID, ServerInfo]]:
    per_block: list[dict[PeerID, ServerInfo]] = [{} for _ in range(NUM_LAYERS)]
    for peer, state, start, end in servers:
        info = ServerInfo(state=state, start_block=start, end_block=end, throughput=100.0)
        for block in range(start, end):
            per_block[block][peer] = info
    return per_block


def _check(records) -> list[tuple[int, int]]:
    moves: list[tuple[int, int]] = []

    async def move(start: int, end: int) -> None:
        moves.append((start, end))

    own = ServerSpan(peer_id=SELF.to_base58(), start=0, end=10, throughput=100.0, inference_rps=100.0)
    balance = Rebalancer(
        dht=None,
        dht_prefix="test",
        num_layers=NUM_LAYERS,
        own=lambda: own,
        move=move,
        period_s=1.0,
        balance_quality=0.75,
        rng=random.Random(0),
        records=lambda: records,
    )
    asyncio.run(balance.check_once())
    return moves


@pytest.mark.parametrize(
    "mover_state", [None, ServerState.JOINING, ServerState.ONLINE], ids=["hole", "mover-joining", "mover-online"]
)
def test_a_spare_fills_a_hole_unless_another_server_is_already_heading_there(mover_state):
    """This server and a spare share 0:10; 10:20 is empty unless the mover is (joining or online) there."""
    servers = [
        (SELF, ServerState.ONLINE, 0, 10),
        (SPARE, ServerState.ONLINE, 0, 10),
        (STEADY, ServerState.ONLINE, 20, 30),
    ]
    if mover_state is not None:  # the mover left 0:10 (OFFLINE there) and announced itself on 10:20
        servers.append((MOVER, mover_state, 10, 20))
    moves = _check(_records(*servers))
    assert moves == ([(10, 20)] if mover_state is None else []), moves
