"""Forward passes kept for their backward: a training client's forward call may ask the server to keep its autograd
graph (the activations its backward needs) under a random ``activation_id``, so that the matching backward call only
runs the backward pass instead of recomputing the forward pass first.

What is kept is bounded: at most ``budget_bytes`` of activations at once (the oldest kept forward is dropped first)
and each for at most ``ttl_s`` seconds. Losing one costs only time: a backward whose kept forward is gone (dropped,
expired, held by another server, lost in a restart) recomputes the forward pass, as every backward did before.
Everything here runs on the server's event loop thread, except ``SavedBytes``, which counts on the compute thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from corolla.log import get_logger
from corolla.models.span import SpanInputs

logger = get_logger(__name__)


@dataclass(frozen=True)
class GraphChunk:
    """One chunk of rows of a kept forward: its output (still attached to the graph) and the graph's leaves (the
    hidden states, then the deep prompts if any)."""

    rows: slice
    output: torch.Tensor
    leaves: tuple[torch.Tensor, ...]


@dataclass(kw_only=True)
class KeptForward:
    """A forward call's autograd graph, with everything a backward call must match to use it."""

    span: object  # the span object it ran on: a server that swapped its span recomputes
    start_block: int
    end_block: int
    active_adapter: str | None
    inputs: SpanInputs  # detached copies of what the forward received
    prompts: torch.Tensor | None
    chunks: list[GraphChunk]
    size_bytes: int  # activations held by the graph (see SavedBytes)

    def matches(self, *, span, meta, inputs: SpanInputs, prompts: torch.Tensor | None) -> bool:
        """Whether a backward call of ``meta`` with these inputs is the backward of this forward: the same span,
        blocks and adapter, and identical tensors. Anything else recomputes: a kept graph never answers a backward
        of other inputs. Compares tensors, so it runs on the compute thread."""
        same_call = (self.span, self.start_block, self.end_block, self.active_adapter) == (
            span, meta.start_block, meta.end_block, meta.active_adapter
        )  # fmt: skip
        pairs = (
            (self.inputs.hidden_states, inputs.hidden_states),
            (self.inputs.attention_mask, inputs.attention_mask),
            (self.inputs.position_ids, inputs.position_ids),
            (self.prompts, prompts),
        )
        return same_call and all(_same(kept, given) for kept, given in pairs)


def _same(kept: torch.Tensor | None, given: torch.Tensor | None) -> bool:
    if kept is None or given is None:
        return kept is None and given is None
    return kept.dtype == given.dtype and torch.equal(kept, given)


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves for backward while ``hooks()`` is active, except
    those of ``exclude`` (the block weights, which exist anyway). Saved tensors are stored detached: keeping the
    tensor itself would tie an output to its own graph node in a reference cycle that nothing frees."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.size_bytes = 0

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def count(self, tensor: torch.Tensor) -> None:
        """Count a tensor held besides the saved ones (a graph's output), unless its storage was counted."""
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.size_bytes += storage.nbytes()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.count(tensor)
        return tensor.detach()


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class ActivationStats:
    """Counters for the info RPC."""

    hits: int = 0  # backward calls that used a kept forward
    misses: int = 0  # backward calls with an activation_id that recomputed (gone, or not a match)
    evictions: int = 0  # kept forwards dropped for room or expired unused
    peak_bytes: int = 0  # the most bytes kept at once


@dataclass
class _Entry:
    kept: KeptForward
    expires_at: float


class ActivationCache:
    """Kept forwards by ``activation_id``, oldest first, within a byte budget and a time limit.

    ``budget_bytes`` 0 keeps nothing. ``clock`` (seconds) is injectable for tests.
    """

    def __init__(self, *, budget_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if budget_bytes < 0 or ttl_s <= 0:
            raise ValueError(f"need budget_bytes >= 0 and ttl_s > 0, got {budget_bytes} and {ttl_s}")
        self.budget_bytes, self.ttl_s, self._clock = budget_bytes, ttl_s, clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.size_bytes = 0
        self.stats = ActivationStats()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, activation_id: str) -> bool:
        return activation_id in self._entries

    def put(self, activation_id: str, kept: KeptForward) -> bool:
        """Keep ``kept`` for the backward of ``activation_id``, dropping the oldest kept forwards while over budget;
        False (nothing kept) if it alone exceeds the budget. An id already held is replaced."""
        self.expire()
        self._drop(activation_id)
        if kept.size_bytes > self.budget_bytes:
            logger.debug(
                "Not keeping forward %s: %d bytes of activations exceed the budget of %d",
                activation_id, kept.size_bytes, self.budget_bytes,
            )  # fmt: skip
            return False
        while self.size_bytes + kept.size_bytes > self.budget_bytes:
            oldest = next(iter(self._entries))
            logger.debug("Dropping kept forward %s for room", oldest)
            self._drop(oldest)
            self.stats.evictions += 1
        self._entries[activation_id] = _Entry(kept=kept, expires_at=self._clock() + self.ttl_s)
        self.size_bytes += kept.size_bytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.size_bytes)
        return True

    def take(self, activation_id: str) -> KeptForward | None:
        """Remove and return the kept forward of ``activation_id`` (None if it is gone or expired)."""
        self.expire()
        entry = self._entries.get(activation_id)
        if entry is None:
            return None
        self._drop(activation_id)
        return entry.kept

    def expire(self) -> int:
        """Drop the kept forwards whose time is up; how many were dropped."""
        now = self._clock()
        expired = []
        for key, entry in self._entries.items():  # in order of expiry: every entry lives ttl_s
            if entry.expires_at > now:
                break
            expired.append(key)
        for key in expired:
            logger.debug("Kept forward %s expired without its backward", key)
            self._drop(key)
        self.stats.evictions += len(expired)
        return len(expired)

    def clear(self) -> None:
        """Drop everything (the server serves other blocks now)."""
        self._entries.clear()
        self.size_bytes = 0

    def _drop(self, activation_id: str) -> None:
        entry = self._entries.pop(activation_id, None)
        if entry is not None:
            self.size_bytes -= entry.kept.size_bytes
