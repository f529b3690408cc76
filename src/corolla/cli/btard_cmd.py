"""``corolla btard``: one peer of a BTARD-SGD run (Byzantine-tolerant data-parallel training)."""

from __future__ import annotations

from collections.abc import Sequence

from corolla.cli.flags import parse_flags
from corolla.secure.config import BtardPeerConfig


def parse(argv: Sequence[str]) -> BtardPeerConfig:
    return parse_flags(BtardPeerConfig, argv, prog="corolla btard")


def run(argv: Sequence[str], *, command: str = "btard") -> int:
    from corolla.secure.btard_peer import BtardPeer

    BtardPeer(parse(argv)).run()
    return 0
