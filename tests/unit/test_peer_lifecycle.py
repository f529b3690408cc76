"""The lifecycle every role shares (``net.peer``), and what a block server announces (``server.serving_state``)."""

from __future__ import annotations

import asyncio
import logging

import torch

from corolla.net.announcer import Announcer
from corolla.net.peer import Peer, PeerConfig
from corolla.protocol.server_info import ServerState
from corolla.server.config import AnnounceConfig, ServerConfig
from corolla.server.memory_cache import CacheBudget
from corolla.server.serving_state import ServingState


def test_shutdown_runs_steps_last_registered_first_and_survives_failures(caplog):
    done = []

    async def stop_serving():
        done.append("rpcs")

    async def hang():
        await asyncio.sleep(60)

    def broken():
        raise ConnectionError("p2pd is gone")

    async def scenario():
        peer = Peer(PeerConfig(shutdown_step_timeout_s=0.1), handle_signals=False)
        peer.on_shutdown("stop the compute thread", lambda: done.append("compute"))
        peer.on_shutdown("stop serving RPCs", stop_serving)
        peer.on_shutdown("announce OFFLINE", hang)
        peer.on_shutdown("stop announcing", broken)
        await peer.shutdown()
        await peer.shutdown()  # a second shutdown has nothing left to do

    with caplog.at_level(logging.WARNING, logger="corolla.net.peer"):
        asyncio.run(scenario())
    assert done == ["rpcs", "compute"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Shutdown step 'stop announcing' failed (ConnectionError: p2pd is gone); stopping anyway",
        "Shutdown step 'announce OFFLINE' failed (no answer in 0.1 s); stopping anyway",
    ]


def test_a_peer_stopped_from_another_thread_returns_from_waiting():
    async def scenario():
        peer = Peer(PeerConfig(), handle_signals=False)
        peer._loop, peer._stopping = asyncio.get_running_loop(), asyncio.Event()
        waiting = asyncio.create_task(peer.wait_until_stopped())
        await asyncio.to_thread(peer.stop)
        await asyncio.wait_for(waiting, 5)

    asyncio.run(scenario())


class _Span(torch.nn.Module):
    def __init__(self, start: int, end: int, dtype=torch.float32):
        super().__init__()
        self.start, self.end = start, end
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))


def test_a_moving_server_announces_joining_on_its_new_blocks_and_offline_on_the_old():
    config = ServerConfig(model="m", new_swarm=True, announce=AnnounceConfig(throughput="7"))
    serving = ServingState(config=config, span=_Span(0, 3, torch.bfloat16), budget=CacheBudget(100))
    online = serving.record()
    assert (online.state, online.start_block, online.end_block, online.throughput) == (ServerState.ONLINE, 0, 3, 7)
    assert online.dtype == "bfloat16" and online.cache_tokens_left == 100
    old = serving.span
    serving.moving_to = (3, 6)
    heading = serving.record()  # periodic announcements while moving say where the server is going
    assert (heading.state, heading.start_block, heading.end_block) == (ServerState.JOINING, 3, 6)
    leaving = serving.record(ServerState.OFFLINE, span=old)
    assert (leaving.state, leaving.start_block, leaving.end_block) == (ServerState.OFFLINE, 0, 3)


def test_the_announcer_stores_the_record_of_its_current_state():
    from concurrent.futures import Future

    stored = []

    def store(record, expiration_s):
        stored.append((record, expiration_s))
        future = Future()
        future.set_result(True)
        return future

    async def scenario():
        announcer = Announcer(name="test record", store=store, make_record=lambda state: state, period_s=2)
        await announcer.announce_now()
        await announcer.set_state(ServerState.ONLINE)
        await announcer.set_state(ServerState.OFFLINE)

    asyncio.run(scenario())
    assert stored == [(ServerState.JOINING, 5.0), (ServerState.ONLINE, 5.0), (ServerState.OFFLINE, 5.0)]
