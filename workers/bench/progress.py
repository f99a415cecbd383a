"""Progress on stderr while the benchmark runs: a live counter on a terminal, lines otherwise."""

from __future__ import annotations

import time
from typing import TextIO

_REDRAW_EVERY_S = 0.25
_CLEAR_LINE = "\r\x1b[K"


class Progress:
    """What the benchmark is doing now; stdout stays free for the table or the JSON."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._label = ""
        self._begun = 0.0
        self._drawn = 0.0

    def note(self, text: str) -> None:
        """One line about a step (starting a fleet, cleaning up)."""
        self._write(f"{_CLEAR_LINE if self._live else ''}bench: {text}\n")

    def begin(self, label: str) -> None:
        """A scenario (or its warm-up) starts."""
        self._label = label
        self._begun = self._drawn = time.perf_counter()
        if self._live:
            self._write(f"{_CLEAR_LINE}bench: {label} …")

    def tick(self, done: int) -> None:
        """``done`` operations have completed so far; redrawn a few times a second at most."""
        now = time.perf_counter()
        if not self._live or now - self._drawn < _REDRAW_EVERY_S:
            return
        self._drawn = now
        rate = done / (now - self._begun)
        self._write(f"{_CLEAR_LINE}bench: {self._label} … {done:,} done, {rate:,.0f}/s")

    def end(self, summary: str) -> None:
        """The scenario finished; ``summary`` says what it measured."""
        self.note(f"{self._label}: {summary}")

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()
