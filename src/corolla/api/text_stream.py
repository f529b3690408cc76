"""Tokens -> text pieces for streaming: incomplete characters and the possible start of a stop sequence are held
back until the next tokens settle them, and text ends before a stop sequence (which is never sent)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextAssembler:
    """The text of one choice, token by token. ``decode``: token ids -> text (special tokens skipped)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode, self._stop = decode, tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # the text so far, cut before a stop sequence once one appeared
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False  # a stop sequence appeared

    def add(self, token: int) -> str:
        """Append a token; returns the text that is now final (possibly empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self._decode(self.tokens)
        for stop in self._stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                text, self.stopped = text[:at], True
        self.text = text
        if self.stopped:
            return self._take(len(text))
        settled = len(text.rstrip("\ufffd"))  # a multi-byte character still missing bytes decodes to U+FFFD
        return self._take(settled - self._stop_prefix_length(text[:settled]))

    def finish(self) -> str:
        """The rest of the text (the generation ended)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def _stop_prefix_length(self, text: str) -> int:
        """The longest end of ``text`` that begins a stop sequence (it may become one with the next tokens)."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
