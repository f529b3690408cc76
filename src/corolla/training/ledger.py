"""At-most-once accumulation of micro-batches on a stage peer, per averaging round.

Trainers retry a backward that failed or timed out, possibly on the same peer, and a slow answer may arrive after
its retry: the peer must not add the same micro-batch's gradients twice. Each backward carries its micro-batch id;
the ledger admits an id once per round (``begin``), records it when its gradients are in (``commit``) or frees it
when the computation failed (``abort``, so that a retry may run), and starts afresh when the stage averages
(``new_round``). The guarantee is per peer: two peers of a stage that both receive a micro-batch (a retry after a
timeout) may both accumulate it; the trainer counts each micro-batch once, at the first answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DuplicateMicrobatch", "MicrobatchLedger"]


class DuplicateMicrobatch(Exception):
    """This micro-batch is already accumulated (or being computed) in this round."""


@dataclass
class MicrobatchLedger:
    round: int = 0
    samples: int = 0  # accumulated in this round
    _running: set[str] = field(default_factory=set)
    _done: set[str] = field(default_factory=set)

    def begin(self, microbatch_id: str) -> None:
        if not microbatch_id:
            raise ValueError("a backward request needs a micro-batch id")
        if microbatch_id in self._done or microbatch_id in self._running:
            raise DuplicateMicrobatch(f"micro-batch {microbatch_id!r} is already accumulated in round {self.round}")
        self._running.add(microbatch_id)

    def commit(self, microbatch_id: str, samples: int) -> None:
        self._running.remove(microbatch_id)
        self._done.add(microbatch_id)
        self.samples += samples

    def abort(self, microbatch_id: str) -> None:
        self._running.discard(microbatch_id)

    def new_round(self) -> None:
        """After averaging and the optimizer step: ids may come again (a new epoch), counts restart."""
        if self._running:
            raise RuntimeError(f"{len(self._running)} backward calls are still running; finish them first")
        self.round += 1
        self.samples = 0
        self._done.clear()

    @property
    def accumulated(self) -> frozenset[str]:
        return frozenset(self._done)
