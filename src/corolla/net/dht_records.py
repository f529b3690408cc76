"""Server records in the DHT: one key per block, one signed subkey per server that hosts it.

Key ``"{dht_prefix}.{block}"``; subkey: the server's ``[owner:...]`` marker (so only that server can write it, as
checked by hivemind's RSASignatureValidator on every DHT node); value: a ``ServerInfo`` record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from hivemind.dht import DHT, DHTNode
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from corolla.log import get_logger
from corolla.net.identity import peer_id_from_owner_marker
from corolla.protocol.server_info import ServerInfo, ServerState

logger = get_logger(__name__)


def block_key(dht_prefix: str, block: int) -> str:
    return f"{dht_prefix}.{block}"


@dataclass(frozen=True, kw_only=True)
class ServerRecord:
    """A server as seen in the DHT: its peer id (derived from its signing key) and its latest info."""

    peer_id: PeerID
    info: ServerInfo


async def _store_blocks(_dht: DHT, node: DHTNode, keys: list[str], subkey: bytes, value: dict, expiration: float):
    results = await node.store_many(keys, [value] * len(keys), expiration, subkeys=[subkey] * len(keys))
    return all(results.values())


def declare_blocks(
    dht: DHT, *, dht_prefix: str, blocks: Sequence[int], owner: bytes, info: ServerInfo, expiration_s: float
):
    """Store ``info`` under every block key, signed by the server; returns an MPFuture of success."""
    keys = [block_key(dht_prefix, b) for b in blocks]
    expiration = get_dht_time() + expiration_s
    return dht.run_coroutine(
        partial(_store_blocks, keys=keys, subkey=owner, value=info.to_record(), expiration=expiration),
        return_future=True,
    )


async def _get_blocks(_dht: DHT, node: DHTNode, keys: list[str], latest: bool):
    found = await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)
    return {key: (value.value if value is not None else None) for key, value in found.items()}


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
    future = dht.run_coroutine(partial(_get_blocks, keys=keys, latest=latest), return_future=True)
    raw = future.result(timeout=timeout_s)
    return [_parse_block_value(raw.get(key)) for key in keys]


def _parse_block_value(value) -> dict[PeerID, ServerInfo]:
    servers: dict[PeerID, ServerInfo] = {}
    if not isinstance(value, dict):
        return servers
    for subkey, entry in value.items():
        try:
            peer_id = peer_id_from_owner_marker(subkey if isinstance(subkey, bytes) else str(subkey).encode())
            servers[peer_id] = ServerInfo.from_record(entry.value)
        except Exception as e:  # a record we cannot read or verify is ignored, never trusted
            logger.debug("Skipping a malformed server record: %s", e)
    return servers


def collect_servers(
    per_block: list[dict[PeerID, ServerInfo]], *, include_joining: bool = False
) -> dict[PeerID, ServerInfo]:
    """Each ONLINE server once, with the record it published (the one announced for its own blocks).

    ``include_joining`` also counts servers still loading their blocks: right for choosing where to serve (a
    server on its way to a hole fills it), wrong for routing (it cannot answer yet).
    """
    states = (ServerState.ONLINE, ServerState.JOINING) if include_joining else (ServerState.ONLINE,)
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
