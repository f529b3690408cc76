"""The record a server publishes in the DHT for every block it hosts."""

from __future__ import annotations

from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field

from corolla import __version__
from corolla.protocol.versions import PROTOCOL_VERSION


class ServerState(IntEnum):
    """Lifecycle of a server: JOINING while loading, ONLINE while serving, OFFLINE after a graceful shutdown."""

    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


class ServerInfo(BaseModel):
    """Versioned server-info record. Unknown fields are ignored, so old peers can read records of new ones."""

    model_config = ConfigDict(extra="ignore", frozen=True)

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
    version: str = __version__
    protocol_version: int = PROTOCOL_VERSION
    next_pings: dict[str, float] = Field(default_factory=dict, description="RTT seconds to likely next servers")

    def to_record(self) -> dict:
        """A msgpack-friendly dict for the DHT."""
        return self.model_dump(mode="json")

    @classmethod
    def from_record(cls, record: object) -> ServerInfo:
        """Parse a DHT value; raises ValueError (pydantic) on a malformed record."""
        if not isinstance(record, dict):
            raise ValueError(f"a server-info record must be a dict, got {type(record).__name__}")
        return cls.model_validate(record)
