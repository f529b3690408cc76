"""How fast this server is: measured once per (model shape, device, dtype, quantization) and cached on disk.

Speeds are per block, so servers of different span lengths compare: ``inference_rps`` is one-token inference
steps per second through one block, ``forward_rps`` is tokens per second of a batched forward pass through one block.
The network estimate uses the local link speed (``/sys/class/net``), not any external website.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from corolla.env import cache_dir
from corolla.log import get_logger
from corolla.models.span import SpanInputs, SpanModel

logger = get_logger(__name__)

_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class SpeedReport:
    inference_rps: float
    forward_rps: float
    network_rps: float | None

    @property
    def throughput(self) -> float:
        """The server's overall tokens/s per block: the slower of compute and network."""
        compute = min(self.inference_rps, self.forward_rps)
        return compute if self.network_rps is None else min(compute, self.network_rps)


def get_speed(span: SpanModel, *, quant: str, force_eval: bool = False, cache_root: Path | None = None) -> SpeedReport:
    """The cached measurement for this span's shape and device, or a fresh one (then cached)."""
    path = (cache_root or cache_dir()) / "throughput" / f"{_cache_key(span, quant)}.json"
    if not force_eval and path.exists():
        try:
            return SpeedReport(**json.loads(path.read_text())["speed"])
        except (ValueError, KeyError, TypeError):
            logger.warning("Ignoring an unreadable throughput cache at %s", path)
    report = measure_speed(span)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{time.monotonic_ns()}")
    tmp.write_text(json.dumps({"format": _FORMAT, "speed": asdict(report)}))
    tmp.replace(path)
    return report


def measure_speed(span: SpanModel, *, steps: int = 8, forward_tokens: int = 128) -> SpeedReport:
    """Time one-token steps with a cache and one batched forward pass through the span."""
    param = next(span.parameters())
    hidden = span.config.hidden_size
    num_blocks = span.end - span.start
    with torch.inference_mode():
        cache = span.new_cache()
        x = torch.randn(1, 1, hidden, device=param.device, dtype=param.dtype)
        span(SpanInputs(hidden_states=x), cache)  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            span(SpanInputs(hidden_states=x), cache)
        step_s = (time.perf_counter() - started) / steps
        x = torch.randn(1, forward_tokens, hidden, device=param.device, dtype=param.dtype)
        span(SpanInputs(hidden_states=x))
        started = time.perf_counter()
        span(SpanInputs(hidden_states=x))
        forward_s = time.perf_counter() - started
    report = SpeedReport(
        inference_rps=num_blocks / step_s,
        forward_rps=forward_tokens * num_blocks / forward_s,
        network_rps=_network_rps(hidden),
    )
    logger.info(
        "Measured speed per block: %.1f inference steps/s, %.0f forward tokens/s",
        report.inference_rps,
        report.forward_rps,
    )
    return report


def _network_rps(hidden_size: int) -> float | None:
    """Tokens/s the fastest local link can carry (activations in and out, 16-bit), or None if unknown."""
    speeds = []
    for speed_file in Path("/sys/class/net").glob("*/speed"):
        if speed_file.parent.name == "lo":
            continue
        try:
            speeds.append(int(speed_file.read_text().strip()))
        except (OSError, ValueError):
            continue
    speeds = [s for s in speeds if s > 0]
    if not speeds:
        return None
    bits_per_token = hidden_size * 16 * 2
    return max(speeds) * 1e6 / bits_per_token


def _cache_key(span: SpanModel, quant: str) -> str:
    param = next(span.parameters())
    cfg = span.config
    description = json.dumps(
        [
            cfg.model_type,
            cfg.hidden_size,
            getattr(cfg, "intermediate_size", None),
            str(param.dtype),
            str(param.device),
            quant,
            torch.get_num_threads(),
            torch.__version__,
        ],
    )
    return hashlib.sha256(description.encode()).hexdigest()[:16]
