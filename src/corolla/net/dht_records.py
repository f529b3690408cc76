"""The DHT records of each role, on the generic signed-record layer (``net.records``).

- Block servers: key ``"{dht_prefix}.{block}"`` per hosted block, value a ``ServerInfo``.
- SWARM stage peers: key ``"{experiment}.stage.{stage}"``, value a ``StagePeerInfo``.
- The model registry: one key, ``MODEL_REGISTRY_KEY``, value a ``ModelRegistryEntry`` for the model a server serves.

In every case the subkey is the writer's ``[owner:...]`` marker, so only that peer can write it (hivemind's
RSASignatureValidator on every DHT node checks the signature), and readers attribute a record to the peer id
derived from that marker.
"""

from __future__ import annotations

from collections.abc import Sequence

from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils import MPFuture

from corolla.log import get_logger
from corolla.net.records import fetch_records, fetch_records_async, parse_records, store_record
from corolla.protocol import server_info
from corolla.protocol.records import (
    MODEL_REGISTRY_KEY,
    BtardPeerInfo,
    ModelRegistryEntry,
    StagePeerInfo,
    StageProgress,
    btard_key,
    stage_key,
    stage_progress_key,
)
from corolla.protocol.server_info import ServerInfo, ServerState

logger = get_logger(__name__)

block_key = server_info.block_key  # re-exported: server/ and client/ import it from here


# --- block servers ---


def declare_blocks(
    dht: DHT, *, dht_prefix: str, blocks: Sequence[int], owner: bytes, info: ServerInfo, expiration_s: float
) -> MPFuture[bool]:
    """Store ``info`` under every block key, signed by the server; returns an MPFuture of success."""
    return store_record(dht, [block_key(dht_prefix, b) for b in blocks], info, owner=owner, expiration_s=expiration_s)


def fetch_block_records(
    dht: DHT,
    *,
    dht_prefix: str,
    num_blocks: int,
    latest: bool = True,
    timeout_s: float = 10.0,
    blocks: Sequence[int] | None = None,
) -> list[dict[PeerID, ServerInfo]]:
    """For each block (``blocks``, default all), the servers that announce it (malformed or unsigned records are
    skipped)."""
    keys = [block_key(dht_prefix, b) for b in (range(num_blocks) if blocks is None else blocks)]
    found = fetch_records(dht, keys, ServerInfo, latest=latest, timeout_s=timeout_s)
    return [found[key] for key in keys]


def _parse_block_value(value: object) -> dict[PeerID, ServerInfo]:
    """The server records of one block key (as hivemind returns its value)."""
    return parse_records(value, ServerInfo)


def collect_servers(
    per_block: list[dict[PeerID, ServerInfo]], *, include_joining: bool = False, any_state: bool = False
) -> dict[PeerID, ServerInfo]:
    """Each ONLINE server once, with the record it published (the one announced for its own blocks).

    ``include_joining`` also counts servers still loading their blocks: right for choosing where to serve (a
    server on its way to a hole fills it), wrong for routing (it cannot answer yet).
    """
    states = (ServerState.ONLINE, ServerState.JOINING) if include_joining else (ServerState.ONLINE,)
    states = tuple(ServerState) if any_state else states  # e.g. the monitor, which shows OFFLINE servers too
    servers: dict[PeerID, ServerInfo] = {}
    for block, records in enumerate(per_block):
        for peer_id, info in records.items():
            if info.state in states and info.start_block <= block < info.end_block:
                servers.setdefault(peer_id, info)
    return servers


def to_spans(servers: dict[PeerID, ServerInfo]) -> list:
    """The servers as pure ``ServerSpan`` records for the routing and block-selection algorithms."""
    from corolla.algorithms.spans import ServerSpan

    return [
        ServerSpan(
            peer_id=peer_id.to_base58(),
            start=info.start_block,
            end=info.end_block,
            throughput=info.throughput,
            inference_rps=info.inference_rps or info.throughput or 1.0,
            cache_tokens_left=info.cache_tokens_left,
            pings={k: v for k, v in info.next_pings.items()},
        )
        for peer_id, info in sorted(servers.items(), key=lambda item: item[0].to_base58())
    ]


# --- SWARM stage peers ---


def declare_stage_peer(dht: DHT, info: StagePeerInfo, *, owner: bytes, expiration_s: float) -> MPFuture[bool]:
    """Store a stage peer's ``info`` under its stage's key (``info.key()``), signed by the peer."""
    return store_record(dht, [info.key()], info, owner=owner, expiration_s=expiration_s)


def fetch_stage_peers(
    dht: DHT,
    *,
    experiment: str,
    num_stages: int,
    latest: bool = True,
    timeout_s: float = 10.0,
    stages: Sequence[int] | None = None,
) -> list[dict[PeerID, StagePeerInfo]]:
    """For each stage (``stages``, default all ``num_stages``), its peers in any state (callers filter by
    ``info.state``); records that are malformed, unsigned or about another stage are skipped."""
    stages = range(num_stages) if stages is None else stages
    keys = [stage_key(experiment, s) for s in stages]
    found = fetch_records(dht, keys, StagePeerInfo, latest=latest, timeout_s=timeout_s)
    return [only_stage(found[key], experiment=experiment, stage=s) for key, s in zip(keys, stages)]


def only_stage(peers: dict[PeerID, StagePeerInfo], *, experiment: str, stage: int) -> dict[PeerID, StagePeerInfo]:
    """The records of ``peers`` (read under ``stage_key(experiment, stage)``) that are about that very stage: a
    record naming another experiment or stage than the key it is stored under is skipped, never moved."""
    kept = {p: info for p, info in peers.items() if (info.experiment, info.stage) == (experiment, stage)}
    for peer_id in peers.keys() - kept.keys():
        other = peers[peer_id]
        logger.debug(
            "Skipping %s's record about %s stage %d under %s",
            peer_id,
            other.experiment,
            other.stage,
            stage_key(experiment, stage),
        )
    return kept


def declare_stage_progress(dht: DHT, progress: StageProgress, *, owner: bytes, expiration_s: float) -> MPFuture[bool]:
    """Store a stage peer's progress towards its stage's next averaging round, signed by the peer."""
    return store_record(dht, [progress.key()], progress, owner=owner, expiration_s=expiration_s)


async def fetch_stage_progress(
    dht: DHT, *, experiment: str, stage: int, timeout_s: float = 10.0
) -> dict[PeerID, StageProgress]:
    """The progress records of a stage's peers (records about another stage are skipped)."""
    key = stage_progress_key(experiment, stage)
    found = await fetch_records_async(dht, [key], StageProgress, timeout_s=timeout_s)
    return {p: r for p, r in found[key].items() if (r.experiment, r.stage) == (experiment, stage)}


async def fetch_stage_peers_async(
    dht: DHT, *, experiment: str, num_stages: int, timeout_s: float = 10.0
) -> list[dict[PeerID, StagePeerInfo]]:
    """``fetch_stage_peers`` for asyncio code."""
    keys = [stage_key(experiment, s) for s in range(num_stages)]
    found = await fetch_records_async(dht, keys, StagePeerInfo, timeout_s=timeout_s)
    return [only_stage(found[key], experiment=experiment, stage=s) for s, key in enumerate(keys)]


# --- the model registry ---


def declare_model(dht: DHT, entry: ModelRegistryEntry, *, owner: bytes, expiration_s: float) -> MPFuture[bool]:
    """Announce that this peer (``owner``) serves ``entry``'s model, under the registry key; one entry per peer, a
    new declaration replaces the previous one."""
    return store_record(dht, [MODEL_REGISTRY_KEY], entry, owner=owner, expiration_s=expiration_s)


def group_models(entries: dict[PeerID, ModelRegistryEntry]) -> dict[str, list[tuple[PeerID, ModelRegistryEntry]]]:
    """Registry entries (by announcing peer) grouped by model name; names and each list sorted (by peer id)."""
    models: dict[str, list[tuple[PeerID, ModelRegistryEntry]]] = {}
    for peer_id, entry in sorted(entries.items(), key=lambda item: item[0].to_base58()):
        models.setdefault(entry.model_name, []).append((peer_id, entry))
    return dict(sorted(models.items()))


def fetch_models(
    dht: DHT, *, latest: bool = True, timeout_s: float = 10.0
) -> dict[str, list[tuple[PeerID, ModelRegistryEntry]]]:
    """Every model announced in the registry, by name, with the peers that announce it (sorted by peer id)."""
    found = fetch_records(dht, [MODEL_REGISTRY_KEY], ModelRegistryEntry, latest=latest, timeout_s=timeout_s)
    return group_models(found[MODEL_REGISTRY_KEY])


# --- BTARD peers ---


def declare_btard_peer(dht: DHT, info: BtardPeerInfo, *, owner: bytes, expiration_s: float) -> MPFuture[bool]:
    """Store a BTARD peer's ``info`` (its message-signing key) under its run's key, signed by the peer."""
    return store_record(dht, [info.key()], info, owner=owner, expiration_s=expiration_s)


async def fetch_btard_peers_async(dht: DHT, *, run: str, timeout_s: float = 10.0) -> dict[PeerID, BtardPeerInfo]:
    """The BTARD peers announced under ``run``'s key, by peer id (records about another run are skipped)."""
    key = btard_key(run)
    found = await fetch_records_async(dht, [key], BtardPeerInfo, timeout_s=timeout_s)
    return {p: info for p, info in found[key].items() if info.run == run}
