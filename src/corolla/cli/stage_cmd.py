"""``corolla stage MODEL``: serve a stage of a model being trained by a SWARM."""

from __future__ import annotations

from collections.abc import Sequence

from corolla.cli.flags import parse_flags
from corolla.training.config import StagePeerConfig


def parse(argv: Sequence[str]) -> StagePeerConfig:
    return parse_flags(StagePeerConfig, argv, prog="corolla stage")


def run(argv: Sequence[str], *, command: str = "stage", **hooks) -> int:
    """``hooks``: ``before_averaging`` of ``corolla.training.stage_peer.StagePeer`` (tests make rounds fail)."""
    from corolla.training.stage_peer import StagePeer

    StagePeer(parse(argv), **hooks).run()
    return 0
