"""A corolla server: joins the swarm, hosts a span of blocks, announces itself, serves until told to stop.

Cold start: this module imports neither transformers nor what needs it (span, handler, throughput), so the DHT
process (a fork of this one) and its p2pd join the swarm while transformers' imports (~2.5 s on 2 CPU cores) run.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from typing import TYPE_CHECKING

import torch
from hivemind.dht import DHT

from corolla.algorithms.spans import ServerSpan
from corolla.log import get_logger
from corolla.models.checkpoint import default_dht_prefix, resolve_checkpoint
from corolla.models.families import family_for
from corolla.net.dht_process import ParentBoundDHT
from corolla.net.dht_records import collect_servers, fetch_block_records
from corolla.net.identity import load_or_create_identity, owner_marker, swarm_validators
from corolla.net.ping import RttTracker, ping_many
from corolla.net.transport import HandlerWrapper, P2PTransport
from corolla.protocol.server_info import ServerInfo, ServerState
from corolla.server.announcer import Announcer
from corolla.server.compute import ComputeQueue
from corolla.server.config import ServerConfig
from corolla.server.memory_cache import CacheBudget
from corolla.server.rebalancer import Rebalancer

if TYPE_CHECKING:
    from corolla.server.throughput import SpeedReport

logger = get_logger(__name__)

MAX_PUBLISHED_PINGS = 5


def resolve_dtype(name: str, device: str, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``auto`` picks float32 on CPU (fastest correct there) and the checkpoint's dtype (or bfloat16) on GPU."""
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cpu":
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _quiet_lost_daemon(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """A background task that lost its connection (p2pd gone, a peer hung up) is logged in one line, not as a
    traceback; everything else goes to asyncio's default handler."""
    error = context.get("exception")
    if isinstance(error, (ConnectionError, FileNotFoundError)):
        logger.debug("%s: %s: %s", context.get("message", "background task failed"), type(error).__name__, error)
    else:
        loop.default_exception_handler(context)


class Server:
    """Owns one server's lifetime. ``run()`` blocks until SIGINT/SIGTERM or ``stop()``."""

    def __init__(self, config: ServerConfig, *, handler_wrapper: HandlerWrapper | None = None):
        """``handler_wrapper`` wraps every RPC handler (tests build misbehaving servers with
        ``corolla.net.faults.FaultPlan.wrap_handler``; everything else about such a server is real)."""
        self.config = config
        self.handler_wrapper = handler_wrapper
        self._adapters: list = []  # resolved --adapters (corolla.models.lora.AdapterSource)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _main(self) -> None:
        started = time.perf_counter()
        cfg = self.config
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(sig, self._stop.set)
        self._loop.set_exception_handler(_quiet_lost_daemon)
        torch.set_num_threads(cfg.num_threads)
        logger.info("Starting with %s", cfg)

        checkpoint = resolve_checkpoint(cfg.model)
        dht_prefix = cfg.dht_prefix or default_dht_prefix(cfg.model)
        # the peer id and the records' signatures come from one key, so clients can tell who wrote a record
        identity_path, key = load_or_create_identity(cfg.identity)
        # the DHT process and p2pd start first: they join the swarm while transformers is imported below
        dht = self._start_dht(key, identity_path)
        try:
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(checkpoint.folder)
            family = family_for(model_config.model_type)  # fail early on an unsupported architecture
            self._checkpoint, self._model_config = checkpoint, model_config
            self._adapters = self._resolve_adapters(family, model_config)  # fail early on a bad adapter
            # with an explicit span, read the weights while the DHT process and p2pd start up
            early = None
            if cfg.blocks is not None:
                early = self._loop.run_in_executor(
                    None, self._load, checkpoint, model_config, self._explicit_span(model_config)
                )
            try:
                await self._loop.run_in_executor(None, dht.wait_until_ready, 60.0)
            except Exception as e:
                from corolla.errors import SwarmConnectionError

                raise SwarmConnectionError(
                    f"Could not start this server's DHT peer with --initial-peers {list(cfg.initial_peers)} "
                    f"({type(e).__name__}: {e}). Check the addresses (copy them from `corolla dht` or a server's "
                    f"log) and that those peers are running and reachable."
                ) from e
            logger.debug("DHT process and p2pd ready %.2f s after the start", time.perf_counter() - started)
            if cfg.identity is None:
                identity_path.unlink(missing_ok=True)  # a throw-away identity: the daemon has read it
            if early is not None:
                span = await early
            else:
                # a random delay keeps servers that start together from all choosing the same weakest span
                await asyncio.sleep(random.uniform(0, cfg.join_jitter_s))
                blocks = self._auto_span(dht, model_config, dht_prefix)
                await self._announce_arrival(dht, key, dht_prefix, blocks)
                span = await self._loop.run_in_executor(None, self._load, checkpoint, model_config, blocks)
            await self._serve(dht, key, span, dht_prefix, started)
        finally:
            if cfg.identity is None:
                identity_path.unlink(missing_ok=True)
            dht.shutdown()

    def _start_dht(self, key, identity_path) -> DHT:
        cfg = self.config
        kwargs = dict(
            initial_peers=list(cfg.initial_peers),
            start=False,
            host_maddrs=list(cfg.host_maddrs),
            record_validators=swarm_validators(key),
            identity_path=str(identity_path),
            # a fresh random identity cannot be taken by anyone: skip the network check for it
            check_if_identity_free=cfg.identity is not None,
        )
        if cfg.announce_maddrs:
            kwargs["announce_maddrs"] = list(cfg.announce_maddrs)
        dht = ParentBoundDHT(**kwargs)
        dht.run_in_background(await_ready=False)
        return dht

    def _load(self, checkpoint, model_config, blocks: tuple[int, int]):
        from corolla.models.span import load_span

        cfg = self.config
        dtype = resolve_dtype(cfg.dtype, cfg.device, getattr(model_config, "dtype", None))
        span = load_span(checkpoint, *blocks, config=model_config, dtype=dtype, device=cfg.device)
        logger.info("Loaded blocks %d:%d (%s, %s)", *blocks, dtype, cfg.device)
        if cfg.quant != "none":
            from corolla.models.quantization import quantize_blocks

            backend = quantize_blocks(span, cfg.quant, device=cfg.device)
            logger.info("Quantized blocks %d:%d to %s with %s", *blocks, cfg.quant, backend)
        if self._adapters:
            from corolla.models.lora import attach_adapters

            attach_adapters(span, self._adapters, dtype=dtype)  # LoRA wraps float or quantized layers alike
        return span

    def _resolve_adapters(self, family, model_config) -> list:
        """The --adapters, found and checked against the model (AdapterError naming the problem)."""
        if not self.config.adapters:
            return []
        from corolla.models.lora import check_adapter, resolve_adapter

        adapters = [resolve_adapter(spec) for spec in self.config.adapters]
        for adapter in adapters:
            check_adapter(adapter, family, model_config.num_hidden_layers)
        logger.info("Adapters: %s", ", ".join(a.name for a in adapters))
        return adapters

    def _explicit_span(self, model_config) -> tuple[int, int]:
        start, end = self.config.parse_blocks()
        if end > model_config.num_hidden_layers:
            raise ValueError(
                f"--blocks {self.config.blocks}: the model has only {model_config.num_hidden_layers} blocks"
            )
        return start, end

    def _nominal_throughput(self) -> float:
        """The throughput a JOINING record announces before the server knows its speed: the configured value, or 1
        (enough for servers choosing their blocks meanwhile to count this one; clients never route to JOINING)."""
        fixed = self.config.fixed_throughput()
        return 1.0 if fixed is None else fixed

    async def _announce_arrival(self, dht: DHT, key, dht_prefix: str, blocks: tuple[int, int]) -> None:
        """JOINING on the chosen blocks before loading them: servers that choose right after this one go elsewhere
        (without it, servers started together all chose the same weakest span and had to rebalance later)."""
        cfg = self.config
        info = ServerInfo(
            state=ServerState.JOINING,
            start_block=blocks[0],
            end_block=blocks[1],
            throughput=self._nominal_throughput(),
            quant=cfg.quant,
            adapters=cfg.adapter_names(),
            public_name=cfg.public_name,
        )
        announcer = Announcer(
            dht=dht,
            dht_prefix=dht_prefix,
            owner=owner_marker(key),
            make_info=lambda: info,
            period_s=cfg.update_period_s,
        )
        try:
            await announcer.announce_now(info, timeout_s=10)
        except Exception as e:  # only an optimization: the server still joins
            logger.warning("Could not announce JOINING on blocks %d:%d: %s", *blocks, e)

    def _auto_span(self, dht: DHT, model_config, dht_prefix: str) -> tuple[int, int]:
        """The span of --num-blocks (default: all) blocks where the swarm is weakest now."""
        from corolla.algorithms.block_selection import choose_best_start
        from corolla.algorithms.spans import compute_coverage
        from corolla.net.dht_records import to_spans

        num_layers = model_config.num_hidden_layers
        num_blocks = min(self.config.num_blocks or num_layers, num_layers)
        records = fetch_block_records(dht, dht_prefix=dht_prefix, num_blocks=num_layers)
        coverage = compute_coverage(to_spans(collect_servers(records, include_joining=True)), num_layers)
        start = choose_best_start(coverage, num_blocks)
        logger.info("Chose blocks %d:%d, where the swarm is weakest", start, start + num_blocks)
        return start, start + num_blocks

    async def _serve(self, dht: DHT, key, span, dht_prefix: str, started: float) -> None:
        from corolla.server.handler import BlockServicer

        cfg = self.config
        budget = CacheBudget(cfg.cache_tokens)
        state = {"span": span, "speed": None}
        next_rtts = RttTracker()

        def make_info(state_now: ServerState = ServerState.ONLINE, span=None) -> ServerInfo:
            moving_to = state.get("moving_to") if span is None and state_now == ServerState.ONLINE else None
            span = span or state["span"]
            start, end = span.start, span.end
            if moving_to is not None:  # (see _rebalancer) every announcement, periodic ones too, says where it goes
                state_now, (start, end) = ServerState.JOINING, moving_to
            speed: SpeedReport | None = state["speed"]
            return ServerInfo(
                state=state_now,
                start_block=start,
                end_block=end,
                throughput=speed.throughput if speed else self._nominal_throughput(),
                inference_rps=speed.inference_rps if speed else None,
                forward_rps=speed.forward_rps if speed else None,
                network_rps=speed.network_rps if speed else None,
                cache_tokens_left=budget.tokens_left,
                dtype=str(next(span.parameters()).dtype).removeprefix("torch."),
                quant=cfg.quant,
                adapters=cfg.adapter_names(),
                public_name=cfg.public_name,
                next_pings=next_rtts.snapshot(limit=MAX_PUBLISHED_PINGS),
            )

        async def ping_next_servers() -> None:
            """RTTs to servers that start where this one ends: clients route through them after this one."""
            records = await asyncio.to_thread(
                fetch_block_records, dht, dht_prefix=dht_prefix, num_blocks=self._model_config.num_hidden_layers
            )
            end = state["span"].end
            peers = [p for p, info in collect_servers(records).items() if info.start_block <= end < info.end_block]
            next_rtts.update(await ping_many(P2PTransport(p2p), peers[: MAX_PUBLISHED_PINGS * 2], timeout_s=2.0))

        announcer = Announcer(
            dht=dht,
            dht_prefix=dht_prefix,
            owner=owner_marker(key),
            make_info=make_info,
            period_s=cfg.update_period_s,
            before_announce=ping_next_servers,
        )
        # JOINING is stored while the speed is looked up (or measured) and the handlers start; ONLINE follows it
        joining = asyncio.ensure_future(announcer.announce_now(make_info(ServerState.JOINING)))
        try:
            state["speed"] = await self._loop.run_in_executor(None, self._speed, span)
            compute = ComputeQueue()
            servicer = BlockServicer(span=span, config=cfg, budget=budget, compute=compute)
            p2p = await dht.replicate_p2p()
            await servicer.start(p2p, wrap=self.handler_wrapper)
        except BaseException:
            joining.cancel()
            raise
        await joining
        await announcer.announce_now(make_info())
        announcer.start()
        rebalancer = self._rebalancer(dht, dht_prefix, state, servicer, announcer, make_info)
        logger.info(
            "Serving blocks %d:%d of %s (%s, %s) as peer %s; ready in %.2f s",
            span.start,
            span.end,
            cfg.model,
            next(span.parameters()).dtype,
            cfg.device,
            dht.peer_id,
            time.perf_counter() - started,
        )
        try:
            await self._stop.wait()
        finally:
            logger.info("Shutting down: announcing OFFLINE")
            steps = [
                rebalancer.stop if rebalancer is not None else None,
                announcer.stop,
                lambda: announcer.announce_now(make_info(ServerState.OFFLINE), timeout_s=5),
                lambda: asyncio.wait_for(servicer.stop(), timeout=5),
            ]
            for step in filter(None, steps):  # each on its own: one failing (e.g. p2pd is gone) must not skip the rest
                try:
                    await step()
                except Exception as e:
                    logger.warning("Shutdown step failed (%s: %s); stopping anyway", type(e).__name__, e)
            compute.shutdown()
            logger.info("Stopped")

    def _rebalancer(self, dht, dht_prefix, state, servicer, announcer, make_info) -> Rebalancer | None:
        """Servers that chose their blocks themselves (no --blocks) keep checking whether to move."""
        cfg = self.config
        if cfg.blocks is not None or cfg.balance_quality <= 0:
            return None
        checkpoint, model_config = self._checkpoint, self._model_config

        def own() -> ServerSpan:
            speed, span = state["speed"], state["span"]
            return ServerSpan(
                peer_id=dht.peer_id.to_base58(),
                start=span.start,
                end=span.end,
                throughput=speed.throughput,
                inference_rps=speed.inference_rps,
            )

        async def move(start: int, end: int) -> None:
            old = state["span"]
            # Other servers' balance checks must see this one leave its blocks and head for the new ones at once,
            # or several of them fill the same hole together and open a new one (they count JOINING servers).
            state["moving_to"] = (start, end)
            try:
                await announcer.announce_now(make_info(ServerState.OFFLINE, span=old))
                await announcer.announce_now(make_info())  # JOINING on the new blocks
                new = await self._loop.run_in_executor(None, self._load, checkpoint, model_config, (start, end))
            finally:
                state["moving_to"] = None
            state["span"] = new
            servicer.swap_span(new)  # sessions already open finish on the old span
            await announcer.announce_now(make_info())
            logger.info("Now serving blocks %d:%d", start, end)

        rebalancer = Rebalancer(
            dht=dht,
            dht_prefix=dht_prefix,
            num_layers=model_config.num_hidden_layers,
            own=own,
            move=move,
            period_s=cfg.balance_period_s,
            balance_quality=cfg.balance_quality,
        )
        rebalancer.start()
        return rebalancer

    def _speed(self, span) -> SpeedReport:
        from corolla.server.throughput import SpeedReport, get_speed

        cfg = self.config
        value = cfg.fixed_throughput()
        if value is not None:
            return SpeedReport(inference_rps=value, forward_rps=value, network_rps=None)
        return get_speed(span, quant=cfg.quant, force_eval=cfg.throughput == "eval")
