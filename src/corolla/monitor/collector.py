"""Reads a swarm's state for the monitor: the model registry and each model's block records from the DHT, then
asks every server for its status (the info RPC, with a timeout; a server that does not answer is reported as
unreachable, never dropped) and pings the bootstrap peers."""

from __future__ import annotations

import asyncio
import functools
import time

from hivemind.dht import DHT
from hivemind.p2p import PeerID

from corolla.algorithms.spans import ServerSpan, count_hosts, uncovered_ranges
from corolla.log import get_logger
from corolla.monitor.config import MonitorConfig
from corolla.monitor.state import BootstrapReport, ModelReport, ServerReport, SwarmState
from corolla.net.dht_records import collect_servers, fetch_block_records, fetch_models
from corolla.net.loop import run_sync
from corolla.net.ping import server_status
from corolla.net.transport import P2PTransport
from corolla.protocol.records import ModelRegistryEntry
from corolla.protocol.server_info import ServerInfo, ServerState

logger = get_logger(__name__)


class SwarmCollector:
    """Owns a client DHT peer of the swarm; ``collect()`` returns a fresh ``SwarmState`` (blocking: run it in a
    thread)."""

    def __init__(self, dht: DHT, *, initial_peers: tuple[str, ...], config: MonitorConfig):
        self.dht, self.initial_peers, self.config = dht, tuple(initial_peers), config
        self._transport: P2PTransport | None = None
        self._relay_addrs: dict[str, tuple[str, ...]] = {}  # relayed servers' relay addresses, from their records

    @classmethod
    def connect(cls, initial_peers: tuple[str, ...], config: MonitorConfig) -> SwarmCollector:
        from corolla.net.dht_process import client_dht

        dht = client_dht(initial_peers, startup_timeout=config.dht_timeout_s, bootstrap_timeout=config.dht_timeout_s)
        return cls(dht, initial_peers=initial_peers, config=config)

    def collect(self) -> SwarmState:
        started = time.time()
        timeout = self.config.dht_timeout_s
        models = fetch_models(self.dht, timeout_s=timeout)
        records = {
            name: fetch_block_records(
                self.dht, dht_prefix=entries[0][1].dht_prefix, num_blocks=entries[0][1].num_blocks, timeout_s=timeout
            )
            for name, entries in models.items()
        }
        servers = {name: collect_servers(per_block, any_state=True) for name, per_block in records.items()}
        peers = {peer for found in servers.values() for peer in found}
        self._relay_addrs = {
            peer.to_base58(): info.relay_addrs for found in servers.values() for peer, info in found.items()
            if info.relayed
        }  # fmt: skip
        answers = run_sync(self._statuses(peers), timeout_s=self.config.call_timeout_s + 10)
        reports = [_model_report(entries[0][1], servers[name], answers) for name, entries in sorted(models.items())]
        return SwarmState(
            updated_at=started,
            refresh_period_s=self.config.refresh_period_s,
            bootstrap_peers=self._bootstrap_reports(),
            models=reports,
        )

    async def _statuses(self, peers) -> dict[PeerID, tuple[object, float] | None]:
        """(status, seconds) of each server's info call, or None if it failed or timed out."""
        if self._transport is None:
            self._transport = P2PTransport(
                await self.dht.replicate_p2p(), relay_addrs=lambda peer: self._relay_addrs.get(peer, ())
            )

        async def one(peer: PeerID):
            started = time.perf_counter()
            try:
                status = await server_status(self._transport, peer, timeout_s=self.config.call_timeout_s)
            except Exception as e:
                logger.debug("Server %s did not answer the info call: %s", peer, e)
                return None
            return status, time.perf_counter() - started

        peers = list(peers)
        return dict(zip(peers, await asyncio.gather(*(one(peer) for peer in peers))))

    def _bootstrap_reports(self) -> list[BootstrapReport]:
        reports = []
        for address in self.initial_peers:
            peer_id = address.rsplit("/p2p/", 1)[1] if "/p2p/" in address else None
            rtt = None
            if peer_id is not None:
                try:
                    rtt = self.dht.run_coroutine(functools.partial(_ping_in_dht, peer_id, self.config.call_timeout_s))
                except Exception as e:
                    logger.debug("Pinging bootstrap peer %s failed: %s", address, e)
            reports.append(
                BootstrapReport(
                    address=address, peer_id=peer_id, answers=rtt is not None,
                    ping_ms=None if rtt is None else rtt * 1e3,
                )
            )  # fmt: skip
        return reports

    def shutdown(self) -> None:
        self.dht.shutdown()


async def _ping_in_dht(peer_id: str, timeout_s: float, dht, node) -> float | None:
    """Runs inside the DHT process: seconds for a DHT ping of ``peer_id``, None if it does not answer."""
    started = time.perf_counter()
    try:
        answer = await asyncio.wait_for(node.protocol.call_ping(PeerID.from_base58(peer_id)), timeout_s)
    except Exception:
        return None
    return None if answer is None else time.perf_counter() - started


def _model_report(entry: ModelRegistryEntry, servers: dict[PeerID, ServerInfo], answers: dict) -> ModelReport:
    reports = []
    for peer_id, info in sorted(servers.items(), key=lambda item: (item[1].start_block, item[0].to_base58())):
        answer = answers.get(peer_id)
        status, seconds = answer if answer is not None else (None, None)
        reports.append(
            ServerReport(
                peer_id=peer_id.to_base58(),
                public_name=info.public_name,
                start_block=info.start_block,
                end_block=info.end_block,
                state=ServerState(info.state).name if status is not None else "unreachable",
                reachable=status is not None,
                relayed=info.relayed,
                ping_ms=None if seconds is None else seconds * 1e3,
                throughput=info.throughput,
                inference_rps=info.inference_rps,
                cache_tokens_left=status.cache_tokens_left if status else info.cache_tokens_left,
                cache_tokens_total=status.cache_tokens_total if status else None,
                active_sessions=status.active_sessions if status else None,
                dtype=status.dtype if status else info.dtype,
                quant=status.quant if status else info.quant,
                adapters=list(info.adapters),
                version=info.version,
            )
        )
    serving = [
        ServerSpan(
            peer_id=r.peer_id,
            start=r.start_block,
            end=r.end_block,
            throughput=r.throughput,
            inference_rps=r.inference_rps or 0.0,
        )  # fmt: skip
        for r in reports
        if r.state == "ONLINE"
    ]
    hosts = count_hosts(serving, entry.num_blocks)
    missing = uncovered_ranges([count > 0 for count in hosts])
    return ModelReport(
        name=entry.model_name,
        dht_prefix=entry.dht_prefix,
        num_blocks=entry.num_blocks,
        model_type=entry.model_type,
        healthy=not missing,
        missing=missing,
        coverage=hosts,
        servers=reports,
    )
