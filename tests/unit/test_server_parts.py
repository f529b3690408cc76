"""Server building blocks tested without any network: cache budget, compute priority, records, validation."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from corolla.errors import InvalidRequestError, ServerBusyError
from corolla.protocol import input_checks as validation
from corolla.protocol.server_info import ServerInfo, ServerState
from corolla.server.compute import PRIORITY_FORWARD, PRIORITY_INFERENCE, ComputeQueue
from corolla.server.memory_cache import CacheBudget


def test_budget_reserves_and_always_releases():
    async def scenario():
        budget = CacheBudget(100)
        async with budget.reserve(60, timeout_s=1):
            assert budget.tokens_left == 40
            with pytest.raises(ServerBusyError, match="server busy"):
                async with budget.reserve(50, timeout_s=0.05):
                    pass
        assert budget.tokens_left == 100
        with pytest.raises(RuntimeError):
            async with budget.reserve(30, timeout_s=1):
                raise RuntimeError("request failed")
        assert budget.tokens_left == 100

    asyncio.run(scenario())


def test_budget_waiter_gets_room_when_freed():
    async def scenario():
        budget = CacheBudget(100)
        order = []
        release = asyncio.Event()

        async def holder():
            async with budget.reserve(80, timeout_s=1):
                order.append("held")
                await release.wait()

        async def waiter():
            async with budget.reserve(50, timeout_s=5):
                order.append("waiter")

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        assert order == ["held"]
        release.set()
        await asyncio.gather(task, waiting)
        assert order == ["held", "waiter"] and budget.tokens_left == 100

    asyncio.run(scenario())


def test_budget_refuses_more_than_the_whole_budget():
    async def scenario():
        with pytest.raises(ServerBusyError, match="whole budget"):
            async with CacheBudget(10).reserve(11, timeout_s=1):
                pass

    asyncio.run(scenario())


def test_compute_runs_inference_before_forward():
    async def scenario():
        queue = ComputeQueue()
        gate = threading.Event()
        done = []
        blocker = queue.submit(PRIORITY_FORWARD, gate.wait)
        await asyncio.sleep(0.05)  # the blocker is running; the next two wait in the queue
        forward = queue.submit(PRIORITY_FORWARD, lambda: done.append("forward"))
        inference = queue.submit(PRIORITY_INFERENCE, lambda: done.append("inference"))
        gate.set()
        await asyncio.gather(blocker, forward, inference)
        queue.shutdown()
        assert done == ["inference", "forward"]

    asyncio.run(scenario())


def test_compute_errors_reach_the_caller_and_the_queue_survives():
    async def scenario():
        queue = ComputeQueue()
        with pytest.raises(ZeroDivisionError):
            await queue.submit(PRIORITY_FORWARD, lambda: 1 / 0)
        assert await queue.submit(PRIORITY_FORWARD, lambda: 42) == 42
        queue.shutdown()

    asyncio.run(scenario())


def test_server_info_round_trip_ignores_unknown_fields():
    info = ServerInfo(state=ServerState.ONLINE, start_block=3, end_block=7, throughput=12.5, adapters=("a",))
    record = info.to_record() | {"field_from_the_future": [1, 2]}
    assert ServerInfo.from_record(record) == info
    with pytest.raises(ValueError):
        ServerInfo.from_record({"state": 2, "start_block": -1, "end_block": 1, "throughput": 1})
    with pytest.raises(ValueError):
        ServerInfo.from_record([1, 2, 3])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(1, 2, 8, dtype=torch.int64), "floating point"),
        (torch.zeros(2, 8), "shape"),
        (torch.zeros(1, 2, 9), "hidden size must be 8"),
        (torch.zeros(1, 0, 8), "empty"),
        (torch.full((1, 2, 8), float("nan")), "NaN"),
        (torch.zeros(1, 300, 8), "exceed"),
        (torch.zeros(3, 2, 8), "batch size 1"),
    ],
)
def test_hidden_states_validation(tensor, message):
    with pytest.raises(InvalidRequestError, match=message):
        validation.check_hidden_states(tensor, hidden_size=8, max_tokens=256, batch_size=1)


def test_mask_and_positions_validation():
    assert validation.check_attention_mask(torch.tensor([[0.0, 1.0]]), batch=1, length=2).dtype == torch.int64
    with pytest.raises(InvalidRequestError, match="only 0 and 1"):
        validation.check_attention_mask(torch.tensor([[2, 1]]), batch=1, length=2)
    with pytest.raises(InvalidRequestError, match=r"shape \[1, 3\]"):
        validation.check_attention_mask(torch.tensor([[1, 1]]), batch=1, length=3)
    with pytest.raises(InvalidRequestError, match="integers"):
        validation.check_position_ids(torch.tensor([[0.5]]), batch=1, tokens=1, limit=10)
    with pytest.raises(InvalidRequestError, match=r"\[0, 10\)"):
        validation.check_position_ids(torch.tensor([[-1]]), batch=1, tokens=1, limit=10)
    with pytest.raises(InvalidRequestError, match="not hosted"):
        validation.check_span(2, 9, served=(0, 6))


def test_collect_servers_counts_joining_servers_only_when_asked():
    """A server moving 0:2 -> 2:4 left OFFLINE records on its old blocks and JOINING ones on its new blocks: routing
    must not use it yet, block choice must count it where it is going (or others rush into the same hole)."""
    from hivemind.p2p import PeerID

    from corolla.net.dht_records import collect_servers

    mover, steady = PeerID(b"mover-peer-id"), PeerID(b"steady-peer-id")
    offline = ServerInfo(state=ServerState.OFFLINE, start_block=0, end_block=2, throughput=5.0)
    joining = ServerInfo(state=ServerState.JOINING, start_block=2, end_block=4, throughput=5.0)
    online = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=2, throughput=3.0)
    old_blocks, new_blocks = {mover: offline, steady: online}, {mover: joining}
    per_block = [old_blocks, old_blocks, new_blocks, new_blocks]
    assert collect_servers(per_block) == {steady: online}
    assert collect_servers(per_block, include_joining=True) == {steady: online, mover: joining}
