"""``corolla dht``: a lightweight bootstrap peer that prints the multiaddrs others pass as --initial-peers."""

from __future__ import annotations

import argparse
import asyncio

from corolla.cli.dataclass_args import add_dataclass_arguments, config_or_exit
from corolla.net.peer import PeerConfig


def register(commands) -> None:
    parser = commands.add_parser(
        "dht",
        help="start a bootstrap DHT peer",
        description="Start a DHT peer (no blocks) that new servers and clients can join through.",
    )
    add_dataclass_arguments(parser, PeerConfig)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    asyncio.run(_serve(config_or_exit(PeerConfig, args, "dht")))
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
