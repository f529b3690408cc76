"""The rules a stage peer applies to the swarm's records before rebalancing, without any network."""

from __future__ import annotations

from corolla.algorithms.stage_balance import StagePeer, choose_move
from corolla.protocol.records import PeerState, StagePeerInfo
from corolla.training.stage_peer import cooling_stages


def _info(stage: int, **fields) -> StagePeerInfo:
    return StagePeerInfo(experiment="e", stage=stage, state=PeerState.ONLINE, throughput_sps=1.0, **fields)


def test_a_stage_that_gave_a_peer_less_than_a_period_ago_gives_no_other():
    records = [
        [("p1", _info(0)), ("p2", _info(0))],
        [("p3", _info(1, moved_from=0, moved_at=100.0))],  # came from stage 0 at t=100
        [("p4", _info(2, moved_from=1, moved_at=10.0))],  # long ago
    ]
    assert cooling_stages(records, now=130.0, period_s=60.0) == {0}
    assert cooling_stages(records, now=161.0, period_s=60.0) == set()
    # stage 2 is the bottleneck, and only stage 0 could give a peer: not while it is cooling
    peers = [StagePeer("p1", 0, 5.0), StagePeer("p2", 0, 5.0), StagePeer("p3", 1, 9.0), StagePeer("p4", 2, 1.0)]
    assert choose_move(peers, 3, cooling={0}) is None
    assert choose_move(peers, 3).from_stage == 0


def test_stage_peer_settings_are_validated():
    import pytest

    from corolla.training.config import StageSwarmConfig

    for bad in (
        dict(update_period_s=0),
        dict(rebalance_period_s=-1),
        dict(num_threads=0),
        dict(rebalance_min_gain=-5),
    ):
        with pytest.raises(ValueError):
            StageSwarmConfig(**bad)
    assert StageSwarmConfig().movable and not StageSwarmConfig(stage=1).movable
    assert StageSwarmConfig(stage=1, rebalance="on").movable
