"""``corolla dht``: a lightweight bootstrap peer that prints the multiaddrs others pass as --initial-peers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from corolla.cli.flags import parse_flags
from corolla.net.peer_config import PeerConfig


def run(argv: Sequence[str], *, command: str = "dht") -> int:
    config = parse_flags(
        PeerConfig,
        argv,
        prog="corolla dht",
        description="Start a DHT peer (no blocks) that new servers and clients can join through.",
    )
    asyncio.run(_serve(config))
    return 0


async def _serve(config: PeerConfig) -> None:
    """The same peer lifecycle as every role (``net.peer``), with no records and no RPCs of its own."""
    from corolla.log import get_logger
    from corolla.net.peer import Peer

    logger = get_logger("corolla.cli.dht")
    async with Peer(config, role="bootstrap peer") as peer:
        await peer.joined()
        maddrs = [str(m) for m in await asyncio.to_thread(peer.dht.get_visible_maddrs)]
        print("Bootstrap peer is running. Pass these to servers and clients:", flush=True)
        print("  --initial-peers " + " ".join(maddrs), flush=True)
        logger.info("DHT peer %s ready", peer.peer_id)
        await peer.wait_until_stopped()
