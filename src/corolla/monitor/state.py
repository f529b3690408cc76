"""What the monitor reports: the schema of ``GET /api/v1/state`` (its JSON Schema is served at
``/api/v1/state/schema``). Version 1; fields are only ever added."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

ServerHealth = Literal["JOINING", "ONLINE", "OFFLINE", "unreachable"]


class ServerReport(BaseModel):
    """One block server, as its DHT record announces it and as it answered the monitor's info call."""

    peer_id: str
    public_name: str | None = None
    start_block: int
    end_block: int
    state: ServerHealth = Field(description="the announced state, or 'unreachable' if the info call failed")
    reachable: bool
    relayed: bool | None = Field(default=None, description="reached through a relay (None: not known)")
    ping_ms: float | None = Field(default=None, description="round trip of the monitor's info call")
    throughput: float = Field(description="announced tokens/s per block")
    inference_rps: float | None = None
    cache_tokens_left: int | None = None
    cache_tokens_total: int | None = None
    active_sessions: int | None = None
    dtype: str | None = None
    quant: str | None = None
    adapters: list[str] = []
    version: str | None = None


class ModelReport(BaseModel):
    """One model of the registry and the servers of its blocks."""

    name: str
    dht_prefix: str
    num_blocks: int
    model_type: str
    healthy: bool = Field(description="every block is held by at least one ONLINE server that answers")
    missing: list[tuple[int, int]] = Field(description="half-open block ranges no such server holds")
    coverage: list[int] = Field(description="per block: how many ONLINE, reachable servers hold it")
    servers: list[ServerReport]


class BootstrapReport(BaseModel):
    address: str
    peer_id: str | None
    answers: bool
    ping_ms: float | None = None


class SwarmState(BaseModel):
    schema_version: int = 1
    updated_at: float = Field(description="Unix time of this reading")
    refresh_period_s: float
    bootstrap_peers: list[BootstrapReport]
    models: list[ModelReport]
