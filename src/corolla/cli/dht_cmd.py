"""``corolla dht``: a lightweight bootstrap peer that prints the multiaddrs others pass as --initial-peers. It also
dials joining peers back (so they learn whether they are reachable), forwards calls to peers behind NAT that keep a
connection to it (``net.forwarding``) and, like every libp2p peer here, relays libp2p circuits to them."""

from __future__ import annotations

import asyncio
import dataclasses
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
    if config.reachability == "auto":  # a bootstrap peer is meant to be public: it relays for peers behind NAT
        config = dataclasses.replace(config, reachability="direct")
    asyncio.run(_serve(config))
    return 0


async def _serve(config: PeerConfig) -> None:
    """The same peer lifecycle as every role (``net.peer``), with no records and no RPCs of its own."""
    from corolla.log import get_logger
    from corolla.net.peer import Peer

    logger = get_logger("corolla.cli.dht")
    from corolla.net.forwarding import ForwardingService
    from corolla.net.reachability import DialBackService

    async with Peer(config, role="bootstrap peer") as peer:
        await peer.joined()
        await DialBackService(await peer.p2p()).start()  # tells joining peers whether they need relays
        await ForwardingService(await peer.p2p()).start()  # forwards calls to peers behind NAT connected to it
        maddrs = [str(m) for m in await asyncio.to_thread(peer.dht.get_visible_maddrs)]
        print("Bootstrap peer is running. Pass these to servers and clients:", flush=True)
        print("  --initial-peers " + " ".join(maddrs), flush=True)
        logger.info("DHT peer %s ready", peer.peer_id)
        await peer.wait_until_stopped()
