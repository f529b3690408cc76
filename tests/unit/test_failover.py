"""The client's fail-over rule: remote and transport failures ban the server and are retried within a budget,
with backoff and jitter; a bug on the client's side raises at once and bans nobody."""

from __future__ import annotations

import asyncio
import random

import pytest
from hivemind.p2p import P2PDaemonError, P2PHandlerError

from corolla.client.failover import Failover, backoff_s, is_remote_failure
from corolla.errors import RemoteCallError


@pytest.mark.parametrize(
    "error",
    [
        RemoteCallError("malformed"),
        P2PHandlerError("error reply"),
        P2PDaemonError("cannot dial"),
        ConnectionResetError(),
        BrokenPipeError(),
        asyncio.TimeoutError(),
        asyncio.IncompleteReadError(b"", 4),
    ],  # fmt: skip
    ids=lambda e: type(e).__name__,
)
def test_remote_and_transport_failures_are_the_servers(error):
    assert is_remote_failure(error)


@pytest.mark.parametrize("error", [TypeError("bad call"), KeyError("x"), ValueError("shape"), AssertionError()])
def test_a_client_bug_raises_and_bans_nobody(error):
    banned = []
    failover = Failover(start=0, end=3, max_retries=5, ban=banned.append)
    with pytest.raises(type(error)):
        asyncio.run(failover.failed("honest-server", error))
    assert banned == [] and failover.failures == 0


def test_the_budget_bans_each_failed_server_then_gives_up_naming_the_blocks():
    banned, slept = [], []

    async def sleep(seconds):
        slept.append(seconds)

    failover = Failover(
        start=0, end=6, max_retries=3, ban=banned.append, backoff_base_s=1.0, backoff_max_s=3.0,
        rng=random.Random(0), sleep=sleep,
    )  # fmt: skip

    async def scenario():
        for peer in ("a", "b", "c"):
            await failover.failed(peer, ConnectionError("closed"), blocks=(0, 3))
        await failover.failed("d", P2PHandlerError("still failing"), blocks=(0, 3))

    with pytest.raises(RemoteCallError, match=r"blocks 0:3 could not be served after 4 failures.*server d.*still"):
        asyncio.run(scenario())
    assert banned == ["a", "b", "c"]  # the last one is not banned: the caller gives up
    assert len(slept) == 2 and 0.5 <= slept[0] < 1.0 and 1.0 <= slept[1] < 2.0  # none after the first failure


def test_backoff_doubles_is_capped_and_jittered():
    rng = random.Random(1)
    assert backoff_s(1, base_s=0.5, max_s=10, rng=rng) == 0.0
    delays = [backoff_s(n, base_s=0.5, max_s=10, rng=rng) for n in range(2, 10)]
    for n, delay in zip(range(2, 10), delays):
        ceiling = min(10, 0.5 * 2 ** (n - 2))
        assert ceiling / 2 <= delay < ceiling
    assert len(set(delays)) == len(delays)  # jittered: clients that failed together spread out
    assert backoff_s(5, base_s=0.0, max_s=10, rng=rng) == 0.0  # backoff off
