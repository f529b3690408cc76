"""What the generation benchmarks share: a transformers streamer that notes when the first new token arrives."""

from __future__ import annotations

import time


class FirstTokenClock:
    """Pass as ``streamer=`` to ``generate``: ``first_at`` is the ``time.perf_counter()`` of the first generated
    token (``generate`` puts the prompt first, then each new token)."""

    def __init__(self):
        self.calls, self.first_at = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first_at = time.perf_counter()

    def end(self):
        pass
