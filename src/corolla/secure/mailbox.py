"""Where a BTARD peer keeps the signed messages it received, until the step that needs them waits for them.

Messages are stored by (step, kind, sender, slot). The first valid message for a key is the one the peer acts on;
a second valid one with a different body is kept as well: the two together prove that the sender equivocated
(``conflicts``). Only steps within ``window`` of the current one are accepted, so a peer cannot be made to store
messages for arbitrary future steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from corolla.secure.envelope import Envelope

__all__ = ["Mailbox"]

Key = tuple[int, str, str, int]  # (step, kind, sender, slot)


class Mailbox:
    def __init__(self, *, window: int = 2):
        self.window = window
        self.current = 0
        self._messages: dict[Key, Envelope] = {}
        self.conflicts: list[tuple[Envelope, Envelope]] = []
        self._changed = asyncio.Condition()

    def check_step(self, step: int) -> None:
        """ValueError unless ``step`` is within the window around the current step."""
        if not self.current - 1 <= step <= self.current + self.window:
            raise ValueError(f"step {step} is outside {self.current - 1}..{self.current + self.window}")

    async def put(self, envelope: Envelope) -> None:
        """Store a message whose signature was checked; returns once waiters are woken."""
        header = envelope.header
        self.check_step(header.step)
        key = (header.step, header.kind, header.sender, header.slot)
        async with self._changed:
            held = self._messages.get(key)
            if held is None:
                self._messages[key] = envelope
                self._changed.notify_all()
            elif held.header.digest != header.digest and not any(
                b.header.digest == header.digest for a, b in self.conflicts if a is held
            ):
                self.conflicts.append((held, envelope))

    def get(self, step: int, kind: str, sender: str, slot: int = 0) -> Envelope | None:
        return self._messages.get((step, kind, sender, slot))

    async def collect(self, step: int, kind: str, slots: Mapping[str, int], *, deadline: float) -> dict[str, Envelope]:
        """The messages of ``kind`` at ``step`` from each sender of ``slots`` (at the slot given for it), waiting
        until all are here or until ``deadline`` (``time.monotonic()``); the ones that came, by sender."""

        def found() -> dict[str, Envelope]:
            out = {}
            for sender, slot in slots.items():
                envelope = self._messages.get((step, kind, sender, slot))
                if envelope is not None:
                    out[sender] = envelope
            return out

        async with self._changed:
            while True:
                have = found()
                left = deadline - time.monotonic()
                if len(have) == len(slots) or left <= 0:
                    return have
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    pass

    def forget_before(self, step: int) -> None:
        """Drop the messages of steps before ``step`` and make ``step`` the current one."""
        self.current = step
        self._messages = {key: env for key, env in self._messages.items() if key[0] >= step - 1}
        self.conflicts = [(a, b) for a, b in self.conflicts if a.header.step >= step - 1]
