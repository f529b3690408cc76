"""The lifecycle every corolla peer shares, whatever its role (block server, SWARM stage peer, averaging peer).

A ``Peer`` owns: the peer's identity (one RSA key for its peer id and its record signatures), its DHT process and
p2pd, SIGINT/SIGTERM handling, the periodic tasks of the role, and a graceful shutdown that runs the role's
shutdown steps in reverse order of registration, each on its own with a timeout (one failing, e.g. because p2pd is
gone, must not skip the rest), and then stops the DHT process. The role builds its records and RPCs on top::

    async with Peer(config) as peer:           # identity, DHT process started (joining runs in the background)
        ...                                     # load weights meanwhile
        await peer.joined()                     # SwarmConnectionError if the initial peers cannot be reached
        peer.on_shutdown("stop serving", servicer.stop)
        await peer.wait_until_stopped()         # Ctrl-C, SIGTERM or peer.stop()
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import Awaitable, Callable

from hivemind.dht import DHT
from hivemind.p2p import P2P

from corolla.errors import SwarmConnectionError
from corolla.log import get_logger
from corolla.net.dht_process import ParentBoundDHT
from corolla.net.identity import load_or_create_identity, owner_marker, swarm_validators
from corolla.net.peer_config import PeerConfig

logger = get_logger(__name__)

RELAY_CHECK_S = 10.0  # how often a peer behind NAT checks its connections to its relays

__all__ = ["Peer", "PeerConfig", "quiet_lost_daemon"]


ShutdownStep = Callable[[], Awaitable[object] | None]


def quiet_lost_daemon(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """A background task that lost its connection (p2pd gone, a peer hung up) is logged in one line, not as a
    traceback; everything else goes to asyncio's default handler."""
    error = context.get("exception")
    if isinstance(error, (ConnectionError, FileNotFoundError)):
        logger.debug("%s: %s: %s", context.get("message", "background task failed"), type(error).__name__, error)
    else:
        loop.default_exception_handler(context)


class Peer:
    """One peer's identity, DHT process, signals and shutdown; an async context manager inside a running loop."""

    def __init__(self, config: PeerConfig, *, role: str = "peer", handle_signals: bool = True):
        """``role`` names the peer in messages ("server", "stage peer", ...)."""
        self.config, self.role, self.handle_signals = config, role, handle_signals
        self.dht: DHT | None = None
        self.key = None
        self._identity_path = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._shutdown_steps: list[tuple[str, ShutdownStep]] = []
        self._p2p: P2P | None = None
        self.relayed = config.reachability == "relay"  # reached through relays (decided in ``joined`` for "auto")

    # ---- start ----------------------------------------------------------------------------------------------
    async def __aenter__(self) -> Peer:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        if self.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stopping.set)
        self._loop.set_exception_handler(quiet_lost_daemon)
        # the peer id and the records' signatures come from one key, so others can tell who wrote a record
        self._identity_path, self.key = load_or_create_identity(self.config.identity)
        try:
            self.dht = self._start_dht()
        except BaseException:
            self._forget_throwaway_identity()
            raise
        return self

    def _start_dht(self, *, check_identity: bool = True) -> DHT:
        cfg = self.config
        kwargs = dict(
            initial_peers=list(cfg.initial_peers),
            start=False,
            host_maddrs=list(cfg.host_maddrs),
            record_validators=swarm_validators(self.key),
            identity_path=str(self._identity_path),
            # a fresh random identity cannot be taken by anyone: skip the network check for it
            check_if_identity_free=check_identity and cfg.identity is not None,
            use_relay=True,  # reach peers behind NAT through their relays
        )
        if cfg.announce_maddrs:
            kwargs["announce_maddrs"] = list(cfg.announce_maddrs)
        if cfg.reachability == "direct":  # serve as a relay for peers behind NAT (libp2p does only when public)
            kwargs["force_reachability"] = "public"
        if self.relayed:  # reserve slots at relays; nobody can dial in, so serve no DHT requests either
            relays = list(cfg.relays or cfg.initial_peers)
            kwargs.update(use_auto_relay=True, trusted_relays=relays, force_reachability="private", client_mode=True)
        dht = ParentBoundDHT(**kwargs)
        dht.run_in_background(await_ready=False)  # joins while the role loads what it needs
        return dht

    async def joined(self) -> None:
        """Wait until the DHT process and p2pd are up and joined (SwarmConnectionError naming the peers if not)."""
        try:
            await self._loop.run_in_executor(None, self.dht.wait_until_ready, self.config.join_timeout_s)
        except Exception as e:
            raise SwarmConnectionError(
                f"Could not start this {self.role}'s DHT peer with --initial-peers {list(self.config.initial_peers)} "
                f"({type(e).__name__}: {e}). Check the addresses (copy them from `corolla dht` or a server's log) "
                f"and that those peers are running and reachable."
            ) from e
        if self.config.reachability == "auto" and self._may_be_behind_nat():
            await self._settle_reachability()
        self._forget_throwaway_identity()  # the daemon has read it
        if self.relayed:
            self._keep_relays_connected()

    def _keep_relays_connected(self) -> None:
        """Others reach a peer behind NAT through the connections it keeps to its relays (they forward calls over
        them, ``net.forwarding``): re-dial a relay whose connection dropped, every ``RELAY_CHECK_S``."""
        from corolla.net.periodic import PeriodicTask
        from corolla.net.reachability import connect_through_relays, relay_of

        relays = [relay for relay in map(relay_of, self.config.relays or self.config.initial_peers) if relay]

        async def check() -> None:
            p2p = await self.p2p()
            connected = {info.peer_id for info in await p2p.list_peers()}
            for relay, direct in relays:
                if relay not in connected:
                    try:
                        await asyncio.wait_for(connect_through_relays(p2p, relay, [direct]), RELAY_CHECK_S)
                        logger.info("Reconnected to relay %s", relay)
                    except Exception as e:
                        logger.debug("Relay %s is unreachable: %s", relay, e)

        keeper = PeriodicTask("keeping relays connected", check, lambda: RELAY_CHECK_S)
        keeper.start()
        self.on_shutdown("stop keeping relays connected", keeper.stop)

    def _may_be_behind_nat(self) -> bool:
        """A peer that joins others and listens beyond loopback (a loopback swarm is always reachable)."""
        loopback = ("/ip4/127.", "/ip6/::1/")
        return bool(self.config.initial_peers) and not all(m.startswith(loopback) for m in self.config.host_maddrs)

    async def _settle_reachability(self) -> None:
        """Ask the initial peers to dial this peer back; if they cannot, restart the DHT peer reached through
        relays (before the role uses it)."""
        from corolla.net.reachability import check_reachable, listen_addrs

        helpers = self._initial_peer_ids()
        addrs = listen_addrs(await self._loop.run_in_executor(None, self.dht.get_visible_maddrs))
        reachable = await check_reachable(await self.p2p(), helpers[:2], addrs, timeout_s=30)
        if reachable is None:
            logger.warning("No initial peer could check whether this %s is reachable; assuming it is", self.role)
            return
        if reachable:
            logger.info("This %s is directly reachable at %s", self.role, ", ".join(addrs))
            return
        logger.warning(
            "This %s cannot be reached directly (NAT or firewall): it will be reached through relays", self.role
        )
        old, old_p2p, self._p2p, self.relayed = self.dht, self._p2p, None, True
        if old_p2p is not None:
            await old_p2p.shutdown()
        await self._loop.run_in_executor(None, old.shutdown)
        self.dht = self._start_dht(check_identity=False)  # the identity is ours: its old daemon just stopped
        try:
            await self._loop.run_in_executor(None, self.dht.wait_until_ready, self.config.join_timeout_s)
        except Exception as e:
            raise SwarmConnectionError(f"Could not rejoin the swarm through relays ({type(e).__name__}: {e})") from e
        await self._wait_for_relay_slot()

    def _initial_peer_ids(self) -> list:
        """The peer ids of the initial peers (the helpers of reachability checks)."""
        from hivemind.p2p import PeerID

        return [PeerID.from_base58(a.rsplit("/p2p/", 1)[1]) for a in self.config.initial_peers if "/p2p/" in a]

    def relay_addrs(self) -> tuple[str, ...]:
        """Where others dial this peer through relays (``.../p2p/RELAY/p2p-circuit`` for each relay it may hold a
        slot at); empty when it is not relayed."""
        from corolla.net.reachability import circuit_addrs

        return tuple(circuit_addrs(self.config.relays or self.config.initial_peers)[:8]) if self.relayed else ()

    async def _wait_for_relay_slot(self) -> None:
        """Until a helper can dial this peer through a relay (libp2p reserves a slot at once with 4 or more relay
        candidates, else after about 3 minutes)."""
        from corolla.net.reachability import check_reachable

        helpers = self._initial_peer_ids()
        addrs = list(self.relay_addrs())
        deadline = self._loop.time() + self.config.relay_wait_s
        logger.info("Waiting until relays let others dial this %s (up to %.0f s)", self.role, self.config.relay_wait_s)
        while addrs and self._loop.time() < deadline:
            if await check_reachable(await self.p2p(), helpers[:1], addrs, timeout_s=30):
                logger.info("Reachable through relays: %s", ", ".join(addrs))
                return
            await asyncio.sleep(2.0)
        logger.warning(
            "Not reachable through relays after %.0f s; going on (more --initial-peers or --relays help: libp2p "
            "reserves a relay slot at once given 4 relay candidates)",
            self.config.relay_wait_s,
        )

    def _forget_throwaway_identity(self) -> None:
        if self.config.identity is None and self._identity_path is not None:
            self._identity_path.unlink(missing_ok=True)

    @property
    def owner(self) -> bytes:
        """This peer's ``[owner:...]`` marker: the subkey only it can write its records under."""
        return owner_marker(self.key)

    @property
    def peer_id(self):
        return self.dht.peer_id

    async def p2p(self) -> P2P:
        """This process's handle on the DHT process's p2pd (for serving and calling RPCs)."""
        if self._p2p is None:
            self._p2p = await self.dht.replicate_p2p()
        return self._p2p

    # ---- run and stop ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the peer to stop (from any thread); ``wait_until_stopped`` returns."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def wait_until_stopped(self) -> None:
        await self._stopping.wait()

    def on_shutdown(self, name: str, step: ShutdownStep) -> None:
        """Run ``step`` (a coroutine function or a plain function) at shutdown; steps run in reverse order of
        registration, like the exits of nested ``with`` blocks."""
        self._shutdown_steps.append((name, step))

    async def shutdown(self) -> None:
        """The role's shutdown steps (last registered first), then the DHT process. Never raises for a step."""
        while self._shutdown_steps:
            name, step = self._shutdown_steps.pop()
            try:
                result = step()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, self.config.shutdown_step_timeout_s)
            except TimeoutError:
                timeout_s = self.config.shutdown_step_timeout_s
                logger.warning("Shutdown step '%s' failed (no answer in %g s); stopping anyway", name, timeout_s)
            except Exception as e:
                logger.warning("Shutdown step '%s' failed (%s: %s); stopping anyway", name, type(e).__name__, e)
        if self.dht is not None:
            dht, self.dht = self.dht, None
            await asyncio.to_thread(dht.shutdown)
        self._forget_throwaway_identity()

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()
