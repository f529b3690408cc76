"""How fast this server is: measured once per (model shape, device, dtype, quantization) and cached on disk.

Speeds are per block, so servers of different span lengths compare: ``inference_rps`` is one-token inference
steps per second through one block, ``forward_rps`` is tokens per second of a batched forward pass through one block.
The network estimate uses the local link speed (``/sys/class/net``), not any external website.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Generator
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


def cached_speed(span: SpanModel, *, quant: str, cache_root: Path | None = None) -> SpeedReport | None:
    """The measurement cached for this span's shape and device, or None."""
    path = _cache_path(span, quant, cache_root)
    if not path.exists():
        return None
    try:
        return SpeedReport(**json.loads(path.read_text())["speed"])
    except (ValueError, KeyError, TypeError):
        logger.warning("Ignoring an unreadable throughput cache at %s", path)
        return None


def store_speed(span: SpanModel, report: SpeedReport, *, quant: str, cache_root: Path | None = None) -> None:
    path = _cache_path(span, quant, cache_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{time.monotonic_ns()}")
    tmp.write_text(json.dumps({"format": _FORMAT, "speed": asdict(report)}))
    tmp.replace(path)


def get_speed(span: SpanModel, *, quant: str, force_eval: bool = False, cache_root: Path | None = None) -> SpeedReport:
    """The cached measurement for this span's shape and device, or a fresh one (then cached)."""
    report = None if force_eval else cached_speed(span, quant=quant, cache_root=cache_root)
    if report is None:
        report = measure_speed(span)
        store_speed(span, report, quant=quant, cache_root=cache_root)
    return report


Piece = Callable[[], float]  # runs one timed part of a measurement, returns its seconds


def measurement(span: SpanModel, *, steps: int = 8, forward_tokens: int = 128) -> Generator[Piece, float, SpeedReport]:
    """A measurement as a sequence of short pieces (each one call of the span): the driver runs each piece it is
    handed (in inference mode) and sends back its seconds; the report is the generator's return value.
    One-token steps with a cache (after a warm-up step), then, unless ``forward_tokens`` is 0, a batched forward
    (after a warm-up forward); without it ``forward_rps`` is taken as ``inference_rps`` (a lower bound: a batched
    forward costs less per token than a step)."""
    param = next(span.parameters())
    hidden = span.config.hidden_size
    num_blocks = span.end - span.start
    state: dict = {}

    def warm_up() -> float:
        state["cache"] = span.new_cache()
        state["x"] = torch.randn(1, 1, hidden, device=param.device, dtype=param.dtype)
        return _timed(lambda: span(SpanInputs(hidden_states=state["x"]), state["cache"]), param.device)

    def step() -> float:
        return _timed(lambda: span(SpanInputs(hidden_states=state["x"]), state["cache"]), param.device)

    def forward() -> float:
        x = torch.randn(1, forward_tokens, hidden, device=param.device, dtype=param.dtype)
        return _timed(lambda: span(SpanInputs(hidden_states=x)), param.device)

    yield warm_up
    # the fastest of the timed calls: a background measurement shares the machine with the server's requests (their
    # network and event-loop work, other processes), which can only slow a call down
    step_s = math.inf
    for _ in range(steps):
        step_s = min(step_s, (yield step))
    state.clear()
    inference_rps = num_blocks / step_s
    forward_rps = inference_rps
    if forward_tokens:
        forward_s = min((yield forward), (yield forward))  # the first includes its warm-up
        forward_rps = forward_tokens * num_blocks / forward_s
    return SpeedReport(inference_rps=inference_rps, forward_rps=forward_rps, network_rps=_network_rps(hidden))


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``fn()``, including the GPU work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure_speed(
    span: SpanModel, *, steps: int = 8, forward_tokens: int = 128, log_as: str = "Measured"
) -> SpeedReport:
    """Time one-token steps with a cache and one batched forward pass through the span, here and now."""
    pieces = measurement(span, steps=steps, forward_tokens=forward_tokens)
    with torch.inference_mode():
        try:
            piece = next(pieces)
            while True:
                piece = pieces.send(piece())
        except StopIteration as done:
            report = done.value
    _log(report, log_as)
    return report


async def measure_speed_on(compute, priority: int, span: SpanModel, **kwargs) -> SpeedReport:
    """``measure_speed`` with each piece queued on the server's compute thread at ``priority``: with a priority
    below every request's, a request that arrives meanwhile waits for at most the piece in progress (the longest is
    one ``forward_tokens``-token forward through the span)."""
    pieces = measurement(span, **kwargs)
    try:
        piece = next(pieces)
        while True:
            piece = pieces.send(await compute.submit(priority, piece))
    except StopIteration as done:
        report = done.value
    _log(report, "Measured")
    return report


def provisional_speed(span: SpanModel) -> SpeedReport:
    """A quick lower bound for a server's first start (a warm-up and two one-token steps, no batched forward), so it
    can serve at once; the full measurement follows in the background."""
    return measure_speed(span, steps=2, forward_tokens=0, log_as="Provisional")


def _log(report: SpeedReport, what: str) -> None:
    logger.info(
        "%s speed per block: %.1f inference steps/s, %.0f forward tokens/s",
        what,
        report.inference_rps,
        report.forward_rps,
    )


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


def _cache_path(span: SpanModel, quant: str, cache_root: Path | None) -> Path:
    return (cache_root or cache_dir()) / "throughput" / f"{_cache_key(span, quant)}.json"


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
