"""The monitor's web side: a thread that re-reads the swarm every ``refresh_period_s``, and the routes that serve
the latest reading — the page (``/``), its JSON (``/api/v1/state`` and its schema) and Prometheus metrics
(``/metrics``). The routes never touch the network, so a slow swarm cannot slow the page."""

from __future__ import annotations

import threading
import time
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from corolla.log import get_logger
from corolla.monitor.collector import SwarmCollector
from corolla.monitor.state import SwarmState

logger = get_logger(__name__)

SERVER_STATES = ("JOINING", "ONLINE", "OFFLINE", "unreachable")


class MonitorService:
    """Keeps the latest ``SwarmState`` of the collector's swarm (``state``; None until the first reading)."""

    def __init__(self, collector: SwarmCollector):
        self.collector = collector
        self.state: SwarmState | None = None
        self.error: str | None = None  # why the last reading failed (the previous state is kept)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Metrics(self))

    def start(self) -> MonitorService:
        self._thread = threading.Thread(target=self._run, name="corolla-monitor", daemon=True)
        self._thread.start()
        return self

    def refresh(self) -> None:
        try:
            self.state, self.error = self.collector.collect(), None
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            logger.warning("Reading the swarm failed: %s", self.error)

    def _run(self) -> None:
        period = self.collector.config.refresh_period_s
        while not self._stop.is_set():
            started = time.monotonic()
            self.refresh()
            self._stop.wait(max(0.0, period - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.collector.config.dht_timeout_s + 10)
        self.collector.shutdown()


def add_monitor_routes(app: FastAPI, service: MonitorService, *, page_path: str = "/") -> None:
    """The page at ``page_path``, ``/api/v1/state`` (+ ``/schema``) and ``/metrics`` on ``app``."""
    page = resources.files("corolla.monitor").joinpath("page.html").read_text()

    @app.get(page_path, response_class=HTMLResponse, include_in_schema=False)
    async def health_page() -> str:
        return page

    @app.get("/api/v1/state")
    async def swarm_state():
        if service.state is None:
            message = service.error or "the monitor has not read the swarm yet; try again in a few seconds"
            return JSONResponse({"error": message}, status_code=503)
        body = service.state.model_dump(mode="json")
        body["last_error"] = service.error
        return body

    @app.get("/api/v1/state/schema")
    async def swarm_state_schema() -> dict:
        return SwarmState.model_json_schema()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)


class _Metrics:
    """Prometheus gauges computed from the service's latest state at each scrape."""

    def __init__(self, service: MonitorService):
        self.service = service

    def describe(self):
        return []

    def collect(self):
        state = self.service.state
        up = GaugeMetricFamily("corolla_monitor_up", "1 if the monitor's last reading of the swarm succeeded")
        up.add_metric([], 1.0 if state is not None and self.service.error is None else 0.0)
        yield up
        if state is None:
            return
        healthy = GaugeMetricFamily(
            "corolla_model_healthy", "1 if every block has an ONLINE, reachable server", labels=["model"]
        )
        blocks = GaugeMetricFamily("corolla_model_blocks", "blocks of the model", labels=["model"])
        covered = GaugeMetricFamily("corolla_model_blocks_covered", "blocks with a serving server", labels=["model"])
        minimum = GaugeMetricFamily(
            "corolla_model_min_coverage", "the fewest serving servers of any block", labels=["model"]
        )
        servers = GaugeMetricFamily("corolla_model_servers", "servers by state", labels=["model", "state"])
        throughput = GaugeMetricFamily(
            "corolla_server_throughput", "announced tokens/s per block", labels=["model", "peer_id", "name"]
        )
        ping = GaugeMetricFamily(
            "corolla_server_ping_seconds", "round trip of the info call", labels=["model", "peer_id", "name"]
        )
        cache = GaugeMetricFamily(
            "corolla_server_cache_tokens_left", "free attention-cache tokens", labels=["model", "peer_id", "name"]
        )
        bootstrap = GaugeMetricFamily("corolla_bootstrap_up", "1 if the bootstrap peer answers", labels=["address"])
        for model in state.models:
            healthy.add_metric([model.name], float(model.healthy))
            blocks.add_metric([model.name], model.num_blocks)
            covered.add_metric([model.name], sum(1 for count in model.coverage if count > 0))
            minimum.add_metric([model.name], min(model.coverage, default=0))
            for name in SERVER_STATES:
                servers.add_metric([model.name, name], sum(1 for s in model.servers if s.state == name))
            for s in model.servers:
                labels = [model.name, s.peer_id, s.public_name or ""]
                throughput.add_metric(labels, s.throughput)
                if s.ping_ms is not None:
                    ping.add_metric(labels, s.ping_ms / 1e3)
                if s.cache_tokens_left is not None:
                    cache.add_metric(labels, s.cache_tokens_left)
        for peer in state.bootstrap_peers:
            bootstrap.add_metric([peer.address], float(peer.answers))
        yield from (healthy, blocks, covered, minimum, servers, throughput, ping, cache, bootstrap)
