"""The trainer's view of each stage's peers (``_Stages``): a DHT read that misses a record does not take the peer
away at once (the frozen-peer test on CI read both stages empty for ~9 s while a node near the keys was stopped)."""

from corolla.protocol.records import PeerState, StagePeerInfo
from corolla.training.trainer import _Stages


def info(stage: int, state: PeerState = PeerState.ONLINE, throughput: float = 10.0) -> StagePeerInfo:
    return StagePeerInfo(experiment="x", stage=stage, state=state, throughput_sps=throughput)


def stages(grace_s: float = 30.0) -> _Stages:
    return _Stages(2, seed=0, missing_grace_s=grace_s)


def test_a_read_that_misses_a_peer_keeps_it_for_the_grace_period():
    view = stages(grace_s=30.0)
    view.update([{"a": info(0)}, {"b": info(1), "c": info(1)}], now=0.0, micro_batch_size=4)
    assert set(view.wirings[0].peers) == {"a"} and set(view.wirings[1].peers) == {"b", "c"}
    view.update([{}, {"c": info(1)}], now=10.0, micro_batch_size=4)  # a partial read: a and b missing
    assert set(view.wirings[0].peers) == {"a"} and set(view.wirings[1].peers) == {"b", "c"}
    view.update([{"a": info(0)}, {"c": info(1)}], now=30.5, micro_batch_size=4)  # b unseen for 30.5 s
    assert set(view.wirings[0].peers) == {"a"} and set(view.wirings[1].peers) == {"c"}
    view.update([{}, {}], now=61.0, micro_batch_size=4)
    assert not set(view.wirings[0].peers)
    assert not set(view.wirings[1].peers)


def test_a_peer_read_as_leaving_or_offline_goes_at_once():
    view = stages()
    view.update([{"a": info(0)}, {"b": info(1), "c": info(1)}], now=0.0, micro_batch_size=4)
    view.update([{"a": info(0)}, {"b": info(1, PeerState.OFFLINE)}], now=1.0, micro_batch_size=4)
    assert set(view.wirings[1].peers) == {"c"}
    view.update([{"a": info(0, PeerState.JOINING)}, {"c": info(1)}], now=2.0, micro_batch_size=4)
    assert not set(view.wirings[0].peers)


def test_a_banned_peer_is_not_called_until_its_ban_ends_even_if_read_online():
    view = stages()
    view.update([{"a": info(0)}, {"b": info(1), "c": info(1)}], now=0.0, micro_batch_size=4)
    view.ban(1, "b", now=0.0, duration_s=5.0)
    view.update([{"a": info(0)}, {"b": info(1), "c": info(1)}], now=3.0, micro_batch_size=4)
    assert set(view.wirings[1].peers) == {"c"}
    view.update([{"a": info(0)}, {"b": info(1), "c": info(1)}], now=6.0, micro_batch_size=4)
    assert set(view.wirings[1].peers) == {"b", "c"}


def test_each_update_signals_a_refresh():
    view = stages()
    assert not view.refreshed.is_set()
    view.update([{}, {}], now=0.0, micro_batch_size=4)
    assert view.refreshed.is_set()
