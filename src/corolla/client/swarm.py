"""The client's view of the swarm: which servers host which blocks, bans of failed servers, and routes.

Refreshed from the DHT periodically and right after a failure; the routing math itself is in
``corolla.algorithms.routing`` and sees only plain records.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey

from corolla.algorithms.routing import NoRouteError, RouteHop, find_inference_route, split_by_throughput
from corolla.client.config import ClientConfig
from corolla.client.failover import Failover
from corolla.client.lie_reports import LieReports
from corolla.client.verification import Verifier
from corolla.errors import MissingAdapterError, MissingBlocksError, SwarmConnectionError
from corolla.log import get_logger
from corolla.net.dht_process import client_dht
from corolla.net.dht_records import collect_servers, fetch_block_records, to_spans
from corolla.net.identity import owner_marker
from corolla.net.loop import run_sync
from corolla.net.ping import RttTracker, ping_many
from corolla.net.transport import P2PTransport
from corolla.protocol.rpc import Transport
from corolla.protocol.server_info import ServerInfo, ServerState
from corolla.protocol.versions import PROTOCOL_VERSION

logger = get_logger(__name__)

PING_TIMEOUT_S = 2.0


class SwarmView:
    """Servers of one model in one swarm, as this client currently knows them."""

    def __init__(
        self,
        *,
        config: ClientConfig,
        dht: DHT | None,
        num_blocks: int,
        model_name: str,
        dht_prefix: str,
        clock: Callable[[], float] = time.monotonic,
        records: Callable[[], list[dict[PeerID, ServerInfo]]] | None = None,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        owner: bytes | None = None,
        proof_checker=None,
    ):
        """``clock`` (seconds), ``records`` (the per-block server records; default: read from ``dht``) and
        ``transport`` (default: libp2p through ``dht``'s daemon) and ``rng`` (retry jitter) are the view's seams:
        tests pass their own. ``owner`` (this client's owner marker in the DHT) lets it publish proofs of the lies it
        catches; ``proof_checker`` (a ``ProofChecker`` of the model) lets it check the proofs others published."""
        self.config, self.dht, self.num_blocks, self.model_name = config, dht, num_blocks, model_name
        self.dht_prefix, self.clock = dht_prefix, clock
        self.rng = rng or random.Random(config.seed)
        self._records = records or self._records_from_dht
        self.servers: dict[PeerID, ServerInfo] = {}
        self._by_id: dict[str, ServerInfo] = {}  # the same records by base58 id
        self._bans: dict[str, tuple[float, int]] = {}  # peer id -> (banned until, failures)
        self._distrusted: dict[str, str] = {}  # peer id -> why: caught computing wrong values, never used again
        self._updated_at = -float("inf")
        self._lock = threading.Lock()
        self._p2p: P2P | None = None
        self._given_transport = transport
        self._transport: Transport | None = None  # the one in use (wrapped), made on first use
        self.transport_wrapper: Callable[[Transport], Transport] | None = None  # e.g. a FaultyTransport in tests
        self.rtt = RttTracker()  # this client's round trips to servers, for latency-aware routing
        self.verifier = Verifier(self)  # checks a share of the answers against other servers (config.verify)
        self.lie_reports = LieReports(
            dht=dht, dht_prefix=dht_prefix, owner=owner, checker=proof_checker if config.check_proofs else None,
            distrust=self.distrust, timeout_s=config.connect_timeout_s,
        )  # fmt: skip

    @classmethod
    def connect(
        cls, *, config: ClientConfig, num_blocks: int, model_name: str, dht_prefix: str, proof_checker=None
    ) -> SwarmView:
        """Join the DHT through ``config.initial_peers`` (client mode); SwarmConnectionError if none answers.
        ``proof_checker``: see ``__init__``."""
        key = RSAPrivateKey()  # this client's identity in the DHT (it signs the proofs of lies it publishes)
        try:
            dht = client_dht(
                config.initial_peers,
                key=key,
                startup_timeout=config.connect_timeout_s,
                bootstrap_timeout=config.connect_timeout_s,
            )
        except Exception as e:
            raise SwarmConnectionError(
                f"Could not join the swarm through {list(config.initial_peers)} within {config.connect_timeout_s} s "
                f"({type(e).__name__}: {e}). Check the addresses (copy them from `corolla dht` or a server's log) "
                f"and that those peers are running and reachable."
            ) from e
        view = cls(
            config=config, dht=dht, num_blocks=num_blocks, model_name=model_name, dht_prefix=dht_prefix,
            owner=owner_marker(key), proof_checker=proof_checker,
        )  # fmt: skip
        view.refresh()
        return view

    async def p2p(self) -> P2P:
        if self._p2p is None:
            self._p2p = await self.dht.replicate_p2p()
        return self._p2p

    async def transport(self) -> Transport:
        """How this client calls servers: libp2p, wrapped by ``transport_wrapper`` if one is set."""
        if self._transport is None:
            transport = self._given_transport or P2PTransport(await self.p2p(), relay_addrs=self._relay_addrs)
            self._transport = transport if self.transport_wrapper is None else self.transport_wrapper(transport)
        return self._transport

    def _relay_addrs(self, peer_id: str) -> tuple[str, ...]:
        """Where a server behind NAT announced relay slots (the transport dials it there)."""
        info = self.info(peer_id)
        return info.relay_addrs if info is not None and info.relayed else ()

    def wrap_transport(self, wrapper: Callable[[Transport], Transport]) -> None:
        """Route every later call through ``wrapper(the transport)`` (``corolla.net.faults.FaultyTransport``
        injects faults this way in tests)."""
        self.transport_wrapper, self._transport = wrapper, None

    def _records_from_dht(self) -> list[dict[PeerID, ServerInfo]]:
        return fetch_block_records(
            self.dht, dht_prefix=self.dht_prefix, num_blocks=self.num_blocks, timeout_s=self.config.connect_timeout_s
        )

    def refresh(self) -> None:
        """Re-read all block records (from the DHT) and ping the servers."""
        servers = collect_servers(self._records())
        allowed = self.config.allowed_servers
        servers = {
            p: info
            for p, info in servers.items()
            if p.to_base58() not in self.config.blocked_servers and (allowed is None or p.to_base58() in allowed)
        }
        with self._lock:
            self.servers = servers
            self._by_id = {peer.to_base58(): info for peer, info in servers.items()}
            self._updated_at = self.clock()
        try:  # proofs others published against these servers: a proven liar is never used
            distrusted = self.distrusted()
            self.lie_reports.read(p.to_base58() for p in servers if p.to_base58() not in distrusted)
        except Exception as e:
            logger.debug("Reading proofs of lies failed: %s", e)
        try:
            self.rtt.update(run_sync(self._ping(list(servers)), timeout_s=PING_TIMEOUT_S + 5))
        except Exception as e:  # routing falls back to default delays for peers without a measurement
            logger.debug("Pinging servers failed: %s", e)
        logger.debug("Swarm view: %d servers", len(servers))

    async def _ping(self, peers: list[PeerID]) -> dict[str, float]:
        return await ping_many(await self.transport(), peers, timeout_s=PING_TIMEOUT_S)

    def maybe_refresh(self) -> None:
        if self.clock() - self._updated_at > self.config.update_period_s:
            self.refresh()

    def ban(self, peer_id: str) -> None:
        """Avoid ``peer_id`` for a while; each repeated failure doubles the ban."""
        with self._lock:
            _, failures = self._bans.get(peer_id, (0.0, 0))
            duration = self.config.ban_timeout_s * 2**failures
            self._bans[peer_id] = (self.clock() + duration, failures + 1)
        logger.info("Banning server %s for %.0f s", peer_id, duration)

    def distrust(self, peer_id: str, reason: str) -> bool:
        """Never route to ``peer_id`` again: it was caught returning wrong values (not a transient failure).
        False if it was distrusted already."""
        with self._lock:
            if peer_id in self._distrusted:
                return False
            self._distrusted[peer_id] = reason
        logger.warning("Server %s returned wrong values (%s): it is banned for good", peer_id, reason)
        return True

    def report_lie(self, proof) -> None:
        """Publish a ``LieProof`` this client made (it caught the accused lying) for the other clients."""
        try:
            self.lie_reports.publish(proof)
        except Exception as e:  # publishing is a courtesy to others: it never fails this client's work
            logger.warning("Could not publish the proof against %s: %s", proof.accused, e)

    def distrusted(self) -> dict[str, str]:
        with self._lock:
            return dict(self._distrusted)

    def forgive(self, peer_id: str) -> None:
        """``peer_id`` answered a call: forget its past failures (the next one gets the shortest ban again)."""
        if peer_id in self._bans:
            with self._lock:
                self._bans.pop(peer_id, None)

    def failover(self, start: int, end: int) -> Failover:
        """A retry budget for one unit of work over blocks start..end-1 (bans go to this view)."""
        cfg = self.config
        return Failover(
            start=start, end=end, max_retries=cfg.max_retries, ban=self.ban, backoff_base_s=cfg.retry_backoff_s,
            backoff_max_s=cfg.retry_backoff_max_s, rng=self.rng,
        )  # fmt: skip

    def failures(self, peer_id: str) -> int:
        """Failures of ``peer_id`` since it last answered (each one doubled its ban)."""
        with self._lock:
            return self._bans.get(peer_id, (0.0, 0))[1]

    def banned(self) -> set[str]:
        """Servers routes avoid now: failed recently, or caught computing wrong values (for good)."""
        now = self.clock()
        with self._lock:
            return {peer for peer, (until, _) in self._bans.items() if until > now} | set(self._distrusted)

    def info(self, peer_id: str) -> ServerInfo | None:
        """The record of a server of this view, by its base58 id."""
        with self._lock:
            return self._by_id.get(peer_id)

    def announced(self, peer_id: str) -> tuple[str | None, str | None] | None:
        """The (dtype, quantization) a server announces (None if it is not in view)."""
        info = self.info(peer_id)
        return None if info is None else (info.dtype, info.quant)

    def servers_of(self, start: int, end: int, *, exclude: set[str] = frozenset()) -> list[RouteHop]:
        """Usable servers that host every block of start..end-1 (not banned, not in ``exclude``), fastest first:
        who can check a hop by computing it again."""
        banned = self.banned() | set(exclude)
        found = [
            (info.throughput, peer.to_base58())
            for peer, info in self.usable_servers().items()
            if info.state == ServerState.ONLINE
            and info.start_block <= start
            and end <= info.end_block
            and peer.to_base58() not in banned
        ]
        return [RouteHop(peer_id=peer, start=start, end=end) for _, peer in sorted(found, reverse=True)]

    def inference_route(self, start: int, end: int, *, cache_tokens: int = 0) -> list[RouteHop]:
        """The fastest chain over blocks start..end-1 (refreshing once if blocks seem missing)."""
        return self._route(
            lambda banned: find_inference_route(
                to_spans(self.usable_servers()),
                start_block=start,
                end_block=end,
                client_pings=self.rtt.snapshot(),
                required_cache_tokens=cache_tokens,
                banned=banned,
            )
        )

    def forward_route(self, start: int, end: int, rng) -> list[RouteHop]:
        """A chain over blocks start..end-1 with servers drawn in proportion to their throughput."""
        return self._route(
            lambda banned: split_by_throughput(
                to_spans(self.usable_servers()),
                start_block=start,
                end_block=end,
                num_items=1,
                rng=rng,
                banned=banned,
            )[0]
        )

    def _route(self, compute: Callable[[set[str]], list[RouteHop]]) -> list[RouteHop]:
        """Run a routing algorithm (given the banned peers) on the current view. If blocks seem missing, refresh
        once; if only banned servers hold them, use those rather than fail (a ban is a preference: the retry
        limits of the caller still bound the attempts); else give up with MissingBlocksError naming them."""
        self.maybe_refresh()
        try:
            return compute(self.banned())
        except NoRouteError:
            self.refresh()
        banned = self.banned()
        try:
            return compute(banned)
        except NoRouteError as e:
            if banned:
                try:
                    route = compute(set())
                except NoRouteError:
                    pass
                else:
                    logger.warning("Only banned servers hold blocks %s; trying them again", _ranges(e.missing))
                    return route

            adapter = self.config.active_adapter
            if adapter is None:
                raise MissingBlocksError(e.missing, self.model_name) from None
            available = sorted({name for info in self.servers.values() for name in info.adapters})
            raise MissingAdapterError(e.missing, self.model_name, adapter, available) from None

    def usable_servers(self) -> dict[PeerID, ServerInfo]:
        """The servers routes may use: those speaking this client's protocol version, not caught lying and, with an
        ``active_adapter``, announcing that adapter."""
        adapter = self.config.active_adapter
        with self._lock:
            servers, distrusted = self.servers, set(self._distrusted)
        usable = {
            peer: info
            for peer, info in servers.items()
            if info.protocol_version == PROTOCOL_VERSION
            and (adapter is None or adapter in info.adapters)
            and peer.to_base58() not in distrusted
        }
        if len(usable) < len(servers) and adapter is None:
            logger.debug("%d servers speak another protocol version", len(servers) - len(usable))
        return usable

    def shutdown(self) -> None:
        if self._p2p is not None:
            p2p, self._p2p, self._transport = self._p2p, None, None
            try:
                run_sync(p2p.shutdown(), timeout_s=5)
            except Exception:
                pass
        if self.dht is not None:
            self.dht.shutdown()


def _ranges(missing: list[tuple[int, int]]) -> str:
    return ", ".join(f"{start}:{end}" for start, end in missing)
