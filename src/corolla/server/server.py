"""A corolla server: joins the swarm, hosts a span of blocks, announces itself, serves until told to stop.

Cold start: this module imports neither transformers nor what needs it (span, handler, throughput), so the DHT
process (a fork of this one) and its p2pd join the swarm while transformers' imports (~2.5 s on 2 CPU cores) run.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from hivemind.dht import DHT

from corolla.algorithms.spans import ServerSpan
from corolla.log import get_logger
from corolla.models.checkpoint import default_dht_prefix, resolve_checkpoint
from corolla.models.families import family_for
from corolla.net.announcer import Announcer
from corolla.net.dht_records import collect_servers, declare_blocks, declare_model, fetch_block_records
from corolla.net.peer import Peer
from corolla.net.ping import ping_many
from corolla.net.transport import HandlerWrapper, P2PTransport
from corolla.protocol.records import ModelRegistryEntry
from corolla.protocol.server_info import ServerInfo, ServerState
from corolla.server.compute import ComputeQueue
from corolla.server.config import ServerConfig
from corolla.server.memory_cache import CacheBudget
from corolla.server.rebalancer import Rebalancer
from corolla.server.serving_state import MAX_PUBLISHED_PINGS, ServingState

if TYPE_CHECKING:
    from corolla.models.span import SpanModel
    from corolla.server.throughput import SpeedReport

logger = get_logger(__name__)


def resolve_dtype(name: str, device: str, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``auto`` picks float32 on CPU (fastest correct there) and the checkpoint's dtype (or bfloat16) on GPU."""
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cpu":
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


class Server:
    """Owns one block server's lifetime on a ``Peer``. ``run()`` blocks until SIGINT/SIGTERM or ``stop()``."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        handler_wrapper: HandlerWrapper | None = None,
        on_span_loaded: Callable[[SpanModel], None] | None = None,
    ):
        """``handler_wrapper`` wraps every RPC handler (tests build misbehaving servers with
        ``corolla.net.faults.FaultPlan.wrap_handler``; everything else about such a server is real).
        ``on_span_loaded`` sees every span this server loads before it serves it (e.g. to add torch forward hooks:
        instrumentation, or a test that catches a server in the middle of a step's computation)."""
        self.config = config
        self.handler_wrapper = handler_wrapper
        self.on_span_loaded = on_span_loaded
        self._adapters: list = []  # resolved --adapters (corolla.models.lora.AdapterSource)
        self._peer: Peer | None = None
        self._stop_requested = False

    def run(self) -> None:
        asyncio.run(self._main())

    def stop(self) -> None:
        """Stop serving (from any thread): the server announces OFFLINE and ``run()`` returns."""
        self._stop_requested = True
        if self._peer is not None:
            self._peer.stop()

    async def _main(self) -> None:
        started = time.perf_counter()
        cfg = self.config
        torch.set_num_threads(cfg.span.num_threads)
        logger.info("Starting with %s", cfg)

        checkpoint = resolve_checkpoint(cfg.model)
        dht_prefix = cfg.announce.dht_prefix or default_dht_prefix(cfg.model)
        # the DHT process and p2pd start first: they join the swarm while transformers is imported below
        async with Peer(cfg.network, role="server") as peer:
            self._peer = peer
            if self._stop_requested:
                peer.stop()
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(checkpoint.folder)
            family = family_for(model_config.model_type)  # fail early on an unsupported architecture
            self._checkpoint, self._model_config = checkpoint, model_config
            self._adapters = self._resolve_adapters(family, model_config)  # fail early on a bad adapter
            # with an explicit span, read the weights while the DHT process and p2pd start up
            loop = asyncio.get_running_loop()
            early = None
            if cfg.span.blocks is not None:
                early = loop.run_in_executor(
                    None, self._load, checkpoint, model_config, self._explicit_span(model_config)
                )
            await peer.joined()
            logger.debug("DHT process and p2pd ready %.2f s after the start", time.perf_counter() - started)
            if early is not None:
                span = await early
            else:
                # a random delay keeps servers that start together from all choosing the same weakest span
                await asyncio.sleep(random.uniform(0, cfg.balance.join_jitter_s))
                blocks = self._auto_span(peer.dht, model_config, dht_prefix)
                await self._announce_arrival(peer, dht_prefix, blocks)
                span = await loop.run_in_executor(None, self._load, checkpoint, model_config, blocks)
            await self._serve(peer, span, dht_prefix, started)

    def _load(self, checkpoint, model_config, blocks: tuple[int, int]):
        from corolla.models.span import load_span

        cfg = self.config
        dtype = resolve_dtype(cfg.span.dtype, cfg.span.device, getattr(model_config, "dtype", None))
        span = load_span(checkpoint, *blocks, config=model_config, dtype=dtype, device=cfg.span.device)
        logger.info("Loaded blocks %d:%d (%s, %s)", *blocks, dtype, cfg.span.device)
        if cfg.span.quant != "none":
            from corolla.models.quantization import quantize_blocks

            backend = quantize_blocks(span, cfg.span.quant, device=cfg.span.device)
            logger.info("Quantized blocks %d:%d to %s with %s", *blocks, cfg.span.quant, backend)
        if self._adapters:
            from corolla.models.lora import attach_adapters

            attach_adapters(span, self._adapters, dtype=dtype)  # LoRA wraps float or quantized layers alike
        if self.on_span_loaded is not None:
            self.on_span_loaded(span)
        return span

    def _resolve_adapters(self, family, model_config) -> list:
        """The --adapters, found and checked against the model (AdapterError naming the problem)."""
        if not self.config.span.adapters:
            return []
        from corolla.models.lora import check_adapter, resolve_adapter

        adapters = [resolve_adapter(spec) for spec in self.config.span.adapters]
        for adapter in adapters:
            check_adapter(adapter, family, model_config.num_hidden_layers)
        logger.info("Adapters: %s", ", ".join(a.name for a in adapters))
        return adapters

    def _explicit_span(self, model_config) -> tuple[int, int]:
        start, end = self.config.span.parse_blocks()
        if end > model_config.num_hidden_layers:
            raise ValueError(
                f"--blocks {self.config.span.blocks}: the model has only {model_config.num_hidden_layers} blocks"
            )
        return start, end

    async def _announce_arrival(self, peer: Peer, dht_prefix: str, blocks: tuple[int, int]) -> None:
        """JOINING on the chosen blocks before loading them: servers that choose right after this one go elsewhere
        (without it, servers started together all chose the same weakest span and had to rebalance later)."""
        cfg = self.config
        info = ServerInfo(
            state=ServerState.JOINING,
            start_block=blocks[0],
            end_block=blocks[1],
            throughput=cfg.announce.nominal_throughput(),
            quant=cfg.span.quant,
            adapters=cfg.span.adapter_names(),
            public_name=cfg.announce.public_name,
            relayed=peer.relayed,
            relay_addrs=peer.relay_addrs(),
        )
        announcer = self._block_announcer(peer, dht_prefix, make_record=lambda state: info)
        try:
            await announcer.announce_now(timeout_s=10)
        except Exception as e:  # only an optimization: the server still joins
            logger.warning("Could not announce JOINING on blocks %d:%d: %s", *blocks, e)

    def _block_announcer(self, peer: Peer, dht_prefix: str, *, make_record, before_announce=None) -> Announcer:
        """Announces this server's ``ServerInfo`` under the keys of the blocks the record names."""

        def store(info: ServerInfo, expiration_s: float):
            blocks = range(info.start_block, info.end_block)
            return declare_blocks(
                peer.dht, dht_prefix=dht_prefix, blocks=blocks, owner=peer.owner, info=info, expiration_s=expiration_s
            )

        return Announcer(
            name="block server record",
            store=store,
            make_record=make_record,
            period_s=self.config.announce.update_period_s,
            before_announce=before_announce,
        )

    def _registry_announcer(self, peer: Peer, dht_prefix: str) -> Announcer:
        """Announces the model this server serves in the swarm's model registry (for clients, API and monitor)."""
        entry = ModelRegistryEntry(
            model_name=self.config.model,
            dht_prefix=dht_prefix,
            num_blocks=self._model_config.num_hidden_layers,
            model_type=self._model_config.model_type,
            repo_id=self._checkpoint.repo_id,
            revision=self._checkpoint.revision,
        )
        return Announcer(
            name="model registry entry",
            store=lambda record, expiration_s: declare_model(
                peer.dht, record, owner=peer.owner, expiration_s=expiration_s
            ),
            make_record=lambda state: entry,
            period_s=self.config.announce.update_period_s,
        )

    def _auto_span(self, dht: DHT, model_config, dht_prefix: str) -> tuple[int, int]:
        """The span of --num-blocks (default: all) blocks where the swarm is weakest now."""
        from corolla.algorithms.block_selection import choose_best_start
        from corolla.algorithms.spans import compute_coverage
        from corolla.net.dht_records import to_spans

        num_layers = model_config.num_hidden_layers
        num_blocks = min(self.config.span.num_blocks or num_layers, num_layers)
        records = fetch_block_records(dht, dht_prefix=dht_prefix, num_blocks=num_layers)
        coverage = compute_coverage(to_spans(collect_servers(records, include_joining=True)), num_layers)
        start = choose_best_start(coverage, num_blocks)
        logger.info("Chose blocks %d:%d, where the swarm is weakest", start, start + num_blocks)
        return start, start + num_blocks

    async def _serve(self, peer: Peer, span, dht_prefix: str, started: float) -> None:
        from corolla.protocol.answer_signing import AnswerSigner
        from corolla.server.handler import BlockServicer

        cfg = self.config
        serving = ServingState(
            config=cfg, span=span, budget=CacheBudget(cfg.limits.cache_tokens), relayed=peer.relayed,
            relay_addrs=peer.relay_addrs(),
        )  # fmt: skip
        loop = asyncio.get_running_loop()

        async def ping_next_servers() -> None:
            """RTTs to servers that start where this one ends: clients route through them after this one."""
            records = await asyncio.to_thread(
                fetch_block_records, peer.dht, dht_prefix=dht_prefix, num_blocks=self._model_config.num_hidden_layers
            )
            end = serving.span.end
            peers = [p for p, info in collect_servers(records).items() if info.start_block <= end < info.end_block]
            transport = P2PTransport(await peer.p2p())
            serving.next_rtts.update(await ping_many(transport, peers[: MAX_PUBLISHED_PINGS * 2], timeout_s=2.0))

        announcer = self._block_announcer(
            peer, dht_prefix, make_record=serving.record, before_announce=ping_next_servers
        )
        registry = self._registry_announcer(peer, dht_prefix)
        # JOINING is stored while the speed is looked up (or measured) and the handlers start; ONLINE follows it
        joining = asyncio.ensure_future(announcer.set_state(ServerState.JOINING))
        try:
            serving.speed, provisional = await loop.run_in_executor(None, self._speed, span)
            compute = ComputeQueue()
            peer.on_shutdown("stop the compute thread", compute.shutdown)
            signer = AnswerSigner(
                peer.key, dht_prefix=dht_prefix, dtype=str(next(span.parameters()).dtype).removeprefix("torch."),
                quant=cfg.span.quant,
            )  # fmt: skip
            servicer = BlockServicer(span=span, config=cfg, budget=serving.budget, compute=compute, signer=signer)
            await servicer.start(await peer.p2p(), wrap=self.handler_wrapper)
            peer.on_shutdown("stop serving RPCs", servicer.stop)
        except BaseException:
            joining.cancel()
            raise
        await joining
        # shutdown runs these in reverse: stop moving, stop announcing, then say OFFLINE while RPCs still answer
        peer.on_shutdown("announce OFFLINE", lambda: announcer.set_state(ServerState.OFFLINE, timeout_s=5))
        await announcer.set_state(ServerState.ONLINE)
        announcer.start()
        peer.on_shutdown("stop announcing", announcer.stop)
        try:
            await registry.announce_now(timeout_s=10)
        except Exception as e:  # clients find the blocks without it; the next period tries again
            logger.warning("Could not announce the model in the registry: %s", e)
        registry.start()
        peer.on_shutdown("stop announcing the model", registry.stop)
        rebalancer = self._rebalancer(peer, dht_prefix, serving, servicer, announcer)
        if rebalancer is not None:
            peer.on_shutdown("stop rebalancing", rebalancer.stop)
        if provisional:
            measuring = asyncio.create_task(self._measure_in_background(serving, compute, announcer))
            peer.on_shutdown("stop measuring the speed", lambda: _cancel(measuring))
        logger.info(
            "Serving blocks %d:%d of %s (%s, %s) as peer %s; ready in %.2f s",
            span.start,
            span.end,
            cfg.model,
            next(span.parameters()).dtype,
            cfg.span.device,
            peer.peer_id,
            time.perf_counter() - started,
        )
        try:
            await peer.wait_until_stopped()
        finally:
            logger.info("Shutting down: announcing OFFLINE")
            await peer.shutdown()
            logger.info("Stopped")

    def _rebalancer(self, peer: Peer, dht_prefix, serving: ServingState, servicer, announcer) -> Rebalancer | None:
        """Servers that chose their blocks themselves (no --blocks) keep checking whether to move."""
        cfg = self.config
        if cfg.span.blocks is not None or cfg.balance.balance_quality <= 0:
            return None
        checkpoint, model_config = self._checkpoint, self._model_config

        def own() -> ServerSpan:
            return ServerSpan(
                peer_id=peer.peer_id.to_base58(),
                start=serving.span.start,
                end=serving.span.end,
                throughput=serving.speed.throughput,
                inference_rps=serving.speed.inference_rps,
            )

        async def move(start: int, end: int) -> None:
            old = serving.span
            # Other servers' balance checks must see this one leave its blocks and head for the new ones at once,
            # or several of them fill the same hole together and open a new one (they count JOINING servers).
            serving.moving_to = (start, end)
            try:
                await announcer.announce_now(serving.record(ServerState.OFFLINE, span=old))
                await announcer.announce_now()  # JOINING on the new blocks
                loop = asyncio.get_running_loop()
                new = await loop.run_in_executor(None, self._load, checkpoint, model_config, (start, end))
            finally:
                serving.moving_to = None
            serving.span = new
            servicer.swap_span(new)  # sessions already open finish on the old span
            await announcer.announce_now()
            logger.info("Now serving blocks %d:%d", start, end)

        rebalancer = Rebalancer(
            dht=peer.dht,
            dht_prefix=dht_prefix,
            num_layers=model_config.num_hidden_layers,
            own=own,
            move=move,
            period_s=cfg.balance.balance_period_s,
            balance_quality=cfg.balance.balance_quality,
        )
        rebalancer.start()
        return rebalancer

    def _speed(self, span) -> tuple[SpeedReport, bool]:
        """The speed to announce, and whether it is provisional: a server's first start on this hardware (nothing
        cached, ``--throughput auto``) serves at once with a quick lower bound; the full measurement (minutes for a
        70B-shaped span on a slow 2-core machine) runs in the background (``_measure_in_background``)."""
        from corolla.server.throughput import SpeedReport, cached_speed, get_speed, provisional_speed

        cfg = self.config
        value = cfg.announce.fixed_throughput()
        if value is not None:
            return SpeedReport(inference_rps=value, forward_rps=value, network_rps=None), False
        if cfg.announce.throughput == "eval":
            return get_speed(span, quant=cfg.span.quant, force_eval=True), False
        cached = cached_speed(span, quant=cfg.span.quant)
        if cached is not None:
            return cached, False
        return provisional_speed(span), True

    async def _measure_in_background(self, serving: ServingState, compute, announcer: Announcer) -> None:
        """Measure the speed on the compute thread after every request (a request waits for at most one piece: one
        call of the span), cache it for the next start, and announce it."""
        from corolla.server.compute import PRIORITY_BACKGROUND
        from corolla.server.throughput import measure_speed_on, store_speed

        span = serving.span
        try:
            report = await measure_speed_on(compute, PRIORITY_BACKGROUND, span)
        except Exception as e:  # the provisional speed stays announced; the next start measures again
            error = f"{type(e).__name__}: {e}"
            logger.warning("Measuring this server's speed failed (%s); keeping the provisional one", error)
            return
        serving.speed = report  # per block: still right if the server moved to other blocks meanwhile
        try:
            await asyncio.to_thread(store_speed, span, report, quant=self.config.span.quant)
        except OSError as e:  # announced anyway; the next start measures again
            logger.warning("Could not cache the measured speed (%s: %s)", type(e).__name__, e)
        try:
            await announcer.announce_now(timeout_s=10)
        except Exception as e:  # the next periodic announcement carries it
            logger.debug("Could not announce the measured speed now: %s", e)


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
