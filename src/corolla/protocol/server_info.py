"""The record a block server publishes in the DHT for every block it hosts, under ``block_key(prefix, block)``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from corolla import __version__
from corolla.protocol.records import PeerState, SignedRecord
from corolla.protocol.versions import PROTOCOL_VERSION

ServerState = PeerState
"""A block server's lifecycle: JOINING while loading, ONLINE while serving, OFFLINE after a graceful shutdown."""


def block_key(dht_prefix: str, block: int) -> str:
    """The DHT key of the servers hosting block ``block`` of the model whose block keys start with ``dht_prefix``."""
    return f"{dht_prefix}.{block}"


class ServerInfo(SignedRecord):
    """Versioned server-info record. Unknown fields are ignored, so old peers can read records of new ones.

    Records written before ``kind`` existed parse too (the field defaults to this kind).
    """

    kind: Literal["block_server"] = "block_server"
    state: ServerState
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    throughput: float = Field(ge=0, description="tokens/s the server can process per block, overall")
    inference_rps: float | None = Field(default=None, ge=0, description="one-token inference steps/s per block")
    forward_rps: float | None = Field(default=None, ge=0, description="forward-pass tokens/s per block")
    network_rps: float | None = Field(default=None, ge=0, description="tokens/s the server's network can carry")
    cache_tokens_left: int | None = Field(default=None, ge=0)
    dtype: str | None = None
    quant: str | None = None
    adapters: tuple[str, ...] = ()
    public_name: str | None = None
    relayed: bool | None = Field(default=None, description="reached only through relays (behind NAT)")
    relay_addrs: tuple[str, ...] = Field(default=(), max_length=8, description="where a relayed server holds slots")
    schema_version: int = Field(default=2, ge=1, description="2: relayed, relay_addrs")
    version: str = __version__
    protocol_version: int = PROTOCOL_VERSION
    next_pings: dict[str, float] = Field(default_factory=dict, description="RTT seconds to likely next servers")

    @model_validator(mode="after")
    def _span_is_not_empty(self) -> ServerInfo:
        if self.end_block <= self.start_block:
            raise ValueError(f"a server's span must not be empty, got blocks {self.start_block}:{self.end_block}")
        return self
