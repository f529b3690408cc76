"""``corolla dht``: a lightweight bootstrap peer that prints the multiaddrs others pass as --initial-peers."""

from __future__ import annotations

import argparse
import signal
import threading


def register(commands) -> None:
    parser = commands.add_parser(
        "dht",
        help="start a bootstrap DHT peer",
        description="Start a DHT peer (no blocks) that new servers and clients can join through.",
    )
    parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of an existing swarm to join")
    parser.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], help="multiaddrs to listen on")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], help="public multiaddrs to announce")
    parser.add_argument("--identity", default=None, help="file with a persistent peer identity (created if missing)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from corolla.log import get_logger
    from corolla.net.dht_process import ParentBoundDHT
    from corolla.net.identity import load_or_create_identity, swarm_validators

    logger = get_logger("corolla.cli.dht")
    identity_path, key = load_or_create_identity(args.identity)
    kwargs = dict(host_maddrs=args.host_maddrs, identity_path=str(identity_path))
    if args.announce_maddrs:
        kwargs["announce_maddrs"] = args.announce_maddrs
    dht = ParentBoundDHT(
        initial_peers=args.initial_peers, start=True, record_validators=swarm_validators(key), **kwargs
    )
    if args.identity is None:
        identity_path.unlink(missing_ok=True)
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    print("Bootstrap peer is running. Pass these to servers and clients:", flush=True)
    print("  --initial-peers " + " ".join(maddrs), flush=True)
    logger.info("DHT peer %s ready", dht.peer_id)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    dht.shutdown()
    return 0
