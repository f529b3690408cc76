"""A corolla server: joins the swarm, hosts a span of blocks, announces itself, serves until told to stop."""

from __future__ import annotations

import asyncio
import signal
import time

import torch
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from transformers import AutoConfig

from corolla.log import get_logger
from corolla.models.checkpoint import default_dht_prefix, resolve_checkpoint
from corolla.models.families import family_for
from corolla.models.span import load_span
from corolla.net.dht_records import collect_servers, fetch_block_records
from corolla.net.identity import load_or_create_identity, owner_marker
from corolla.protocol.server_info import ServerInfo, ServerState
from corolla.server.announcer import Announcer
from corolla.server.compute import ComputeQueue
from corolla.server.config import ServerConfig
from corolla.server.handler import BlockServicer
from corolla.server.memory_cache import CacheBudget
from corolla.server.throughput import SpeedReport, get_speed

logger = get_logger(__name__)


def resolve_dtype(name: str, device: str, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``auto`` picks float32 on CPU (fastest correct there) and the checkpoint's dtype (or bfloat16) on GPU."""
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cpu":
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


class Server:
    """Owns one server's lifetime. ``run()`` blocks until SIGINT/SIGTERM or ``stop()``."""

    def __init__(self, config: ServerConfig):
        self.config = config
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
        torch.set_num_threads(cfg.num_threads)
        logger.info("Starting with %s", cfg)

        checkpoint = resolve_checkpoint(cfg.model)
        model_config = AutoConfig.from_pretrained(checkpoint.folder)
        family_for(model_config.model_type)  # fail early on an unsupported architecture
        dht_prefix = cfg.dht_prefix or default_dht_prefix(cfg.model)
        # the peer id and the records' signatures come from one key, so clients can tell who wrote a record
        identity_path, key = load_or_create_identity(cfg.identity)
        try:
            dht = self._start_dht(key, identity_path)
        finally:
            if cfg.identity is None:
                identity_path.unlink(missing_ok=True)  # a throw-away identity: the daemon has read it
        try:
            await self._serve(dht, key, checkpoint, model_config, dht_prefix, started)
        finally:
            dht.shutdown()

    def _start_dht(self, key, identity_path) -> DHT:
        cfg = self.config
        kwargs = dict(
            initial_peers=list(cfg.initial_peers),
            start=True,
            host_maddrs=list(cfg.host_maddrs),
            record_validators=[RSASignatureValidator(key)],
        )
        if cfg.announce_maddrs:
            kwargs["announce_maddrs"] = list(cfg.announce_maddrs)
        return DHT(**kwargs, identity_path=str(identity_path))

    def _choose_blocks(self, dht: DHT, num_layers: int, dht_prefix: str) -> tuple[int, int]:
        cfg = self.config
        if cfg.blocks is not None:
            start, end = cfg.parse_blocks()
            if end > num_layers:
                raise ValueError(f"--blocks {cfg.blocks}: the model has only {num_layers} blocks")
            return start, end
        num_blocks = min(cfg.num_blocks or num_layers, num_layers)
        from corolla.algorithms.block_selection import choose_best_start
        from corolla.algorithms.spans import compute_coverage
        from corolla.net.dht_records import to_spans

        records = fetch_block_records(dht, dht_prefix=dht_prefix, num_blocks=num_layers)
        coverage = compute_coverage(to_spans(collect_servers(records)), num_layers)
        start = choose_best_start(coverage, num_blocks)
        return start, start + num_blocks

    async def _serve(self, dht: DHT, key, checkpoint, model_config, dht_prefix: str, started: float) -> None:
        cfg = self.config
        start, end = self._choose_blocks(dht, model_config.num_hidden_layers, dht_prefix)
        dtype = resolve_dtype(cfg.dtype, cfg.device, getattr(model_config, "dtype", None))
        speed: SpeedReport | None = None
        budget = CacheBudget(cfg.cache_tokens)

        def make_info(state: ServerState = ServerState.ONLINE) -> ServerInfo:
            return ServerInfo(
                state=state,
                start_block=start,
                end_block=end,
                throughput=speed.throughput if speed else 0.0,
                inference_rps=speed.inference_rps if speed else None,
                forward_rps=speed.forward_rps if speed else None,
                network_rps=speed.network_rps if speed else None,
                cache_tokens_left=budget.tokens_left,
                dtype=str(dtype).removeprefix("torch."),
                quant=cfg.quant,
                public_name=cfg.public_name,
            )

        announcer = Announcer(
            dht=dht, dht_prefix=dht_prefix, owner=owner_marker(key), make_info=make_info, period_s=cfg.update_period
        )
        await announcer.announce_now(make_info(ServerState.JOINING))
        span = load_span(checkpoint, start, end, config=model_config, dtype=dtype, device=cfg.device)
        speed = self._speed(span)
        compute = ComputeQueue()
        servicer = BlockServicer(span=span, config=cfg, budget=budget, compute=compute)
        p2p = await dht.replicate_p2p()
        await servicer.add_p2p_handlers(p2p)
        await announcer.announce_now(make_info())
        announcer.start()
        logger.info(
            "Serving blocks %d:%d of %s (%s, %s) as peer %s; ready in %.2f s",
            start,
            end,
            cfg.model,
            dtype,
            cfg.device,
            dht.peer_id,
            time.perf_counter() - started,
        )
        try:
            await self._stop.wait()
        finally:
            logger.info("Shutting down: announcing OFFLINE")
            await announcer.stop()
            try:
                await announcer.announce_now(make_info(ServerState.OFFLINE), timeout_s=5)
            except Exception as e:
                logger.warning("Could not announce OFFLINE: %s", e)
            await servicer.remove_p2p_handlers(p2p)
            compute.shutdown()

    def _speed(self, span) -> SpeedReport:
        cfg = self.config
        if cfg.throughput not in ("auto", "eval"):
            value = float(cfg.throughput)
            return SpeedReport(inference_rps=value, forward_rps=value, network_rps=None)
        return get_speed(span, quant=cfg.quant, force_eval=cfg.throughput == "eval")
