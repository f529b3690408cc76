"""What the client does when a server fails a call: ban it, back off, try again within a budget, or give up.

One ``Failover`` tracks one unit of work (a span's inference step, a chain being opened, a forward or backward hop).
Only failures that are the server's or the network's (an error reply, a closed or reset stream, a timeout, an
undecodable or malformed answer) count against the retry budget and ban the server. Anything else is a bug on the
client's side: it is raised at once instead of banning an honest server.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from google.protobuf.message import DecodeError
from hivemind.p2p import P2PDaemonError, P2PHandlerError

from corolla.errors import RemoteCallError
from corolla.log import get_logger

logger = get_logger(__name__)

REMOTE_FAILURES: tuple[type[BaseException], ...] = (
    RemoteCallError,  # a malformed or undecodable answer, or an error reply on an inference stream
    P2PHandlerError,  # the server's handler failed (an error reply)
    P2PDaemonError,  # the peer cannot be dialled or the stream broke inside p2pd
    ConnectionError,  # the stream was closed or reset (includes BrokenPipeError, ConnectionResetError)
    asyncio.TimeoutError,  # no answer in time (TimeoutError)
    asyncio.IncompleteReadError,  # the stream ended mid-message
    DecodeError,  # bytes that are not the protobuf message they should be
)


def is_remote_failure(error: BaseException) -> bool:
    """Whether ``error`` is the server's or the network's fault (else it is the client's)."""
    return isinstance(error, REMOTE_FAILURES)


def backoff_s(failures: int, *, base_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait before attempt ``failures + 1``: none after the first failure (another server usually
    takes over at once), then ``base_s`` doubling per failure up to ``max_s``, with jitter in [0.5, 1) of that so
    clients that failed together do not retry together."""
    if failures <= 1 or base_s <= 0:
        return 0.0
    return min(max_s, base_s * 2 ** (failures - 2)) * rng.uniform(0.5, 1.0)


class Failover:
    """The retry budget of one unit of work over blocks ``start..end-1``."""

    def __init__(
        self,
        *,
        start: int,
        end: int,
        max_retries: int,
        ban: Callable[[str], None],
        backoff_base_s: float = 0.0,
        backoff_max_s: float = 0.0,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.start, self.end, self.max_retries, self.ban = start, end, max_retries, ban
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.rng, self.sleep = rng or random.Random(), sleep
        self.failures = 0

    async def failed(
        self, peer_id: str | None, error: BaseException, *, blocks: tuple[int, int] | None = None
    ) -> None:
        """``peer_id`` (None: no server was reached yet) failed with ``error`` on ``blocks`` (default: the whole
        unit). Returns after the backoff when the caller should try again; raises RemoteCallError when the budget is
        spent, and ``error`` itself when it is not a remote failure."""
        if not is_remote_failure(error):
            raise error
        self.failures += 1
        blocks = "{}:{}".format(*(blocks or (self.start, self.end)))
        if self.failures > self.max_retries:
            raise RemoteCallError(
                f"blocks {blocks} could not be served after {self.failures} failures; last error"
                f"{'' if peer_id is None else f' (server {peer_id})'}: {describe(error)}"
            ) from error
        if peer_id is not None:
            logger.warning("Server %s failed on blocks %s (%s); recovering", peer_id, blocks, describe(error))
            self.ban(peer_id)
        delay = backoff_s(self.failures, base_s=self.backoff_base_s, max_s=self.backoff_max_s, rng=self.rng)
        if delay > 0:
            await self.sleep(delay)


def describe(error: BaseException) -> str:
    """One line about ``error`` for logs and messages."""
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]
