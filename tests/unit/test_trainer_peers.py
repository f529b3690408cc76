"""The trainer's view of each stage's peers (``_Stages``): a DHT read that misses a record does not take the peer
away at once (the frozen-peer test on CI read both stages empty for ~9 s while a node near the keys was stopped)."""

import types

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


class _BusyOnce:
    """A transport whose every peer times out on its first call (busy averaging, as the survivor of the frozen-peer
    test was) and answers every later forward with its input."""

    def __init__(self):
        self.calls: list[str] = []

    async def call(self, peer_id, handle, request, response_type, *, timeout_s):
        from corolla.net.tensors import pack_response, unpack_tensors

        self.calls.append(peer_id)
        if self.calls.count(peer_id) == 1:
            raise TimeoutError
        return pack_response(unpack_tensors(request), {"compute_s": 0.01, "epoch": 0})


def _trainer(**overrides):
    from corolla.training.config import ExperimentConfig, TrainerConfig
    from corolla.training.trainer import Trainer

    fields = dict(run=ExperimentConfig(model="unused", num_stages=2), refresh_period_s=0.05, max_retries=2)
    trainer = Trainer(TrainerConfig(**(fields | overrides)))
    trainer._transport, trainer._stages = _BusyOnce(), stages()
    return trainer


async def _refreshing(view: _Stages, records, call, clock: list[float]):
    """Run ``call`` while the records are re-read every 10 ms of a clock that runs 1 s per read (bans end)."""
    import asyncio

    async def refresh():
        while True:
            clock[0] += 1.0
            view.update(records, now=clock[0], micro_batch_size=4)
            await asyncio.sleep(0.01)

    refresher = asyncio.create_task(refresh())
    try:
        return await asyncio.wait_for(call, 10)
    finally:
        refresher.cancel()


def test_a_call_whose_stage_has_no_callable_peer_waits_for_one_without_spending_its_retries(monkeypatch):
    """Both peers of stage 1 time out once and are banned for the call's timeout: with two retries, the call used to
    fail at once (its third attempt found 'no peer of the stage is available'); it now waits until a ban ends and
    the third attempt is answered."""
    import asyncio

    import torch

    from corolla.training import trainer as trainer_module

    clock = [0.0]
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    trainer = _trainer(forward_timeout_s=5.0)
    records = [{"a": info(0)}, {"b": info(1), "c": info(1)}]
    trainer._stages.update(records, now=0.0, micro_batch_size=4)
    x = torch.ones(4, 3, 2)
    call = trainer._call(1, "forward", "m:0:0", [x])
    outputs, reply = asyncio.run(_refreshing(trainer._stages, records, call, clock))
    torch.testing.assert_close(outputs[0], x)
    assert sorted(trainer._transport.calls[:2]) == ["b", "c"] and len(trainer._transport.calls) == 3
    assert clock[0] >= 5.0  # answered only once a ban had ended


def test_a_call_gives_up_when_its_stage_stays_without_a_peer_for_wait_for_peers_s(monkeypatch):
    import asyncio

    import pytest
    import torch

    from corolla.training import trainer as trainer_module

    clock = [0.0]
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    trainer = _trainer(wait_for_peers_s=20.0)
    records = [{"a": info(0)}, {}]
    trainer._stages.update(records, now=0.0, micro_batch_size=4)
    call = trainer._call(1, "forward", "m:0:0", [torch.ones(4, 3, 2)])
    with pytest.raises(trainer_module.MicrobatchFailed, match="no peer of the stage was available for 20 s"):
        asyncio.run(_refreshing(trainer._stages, records, call, clock))
    assert trainer._transport.calls == [] and 20.0 <= clock[0] <= 23.0
