"""Progress of long CLI work on stderr: redrawn in place on a terminal, else one line per 10 %."""

from __future__ import annotations

from typing import Protocol, TextIO

BAR_WIDTH = 30


class Step(Protocol):
    """What a progress callback reports (``vault.migrate.MigrationStep`` is one)."""

    @property
    def stage(self) -> str: ...
    @property
    def done(self) -> int: ...
    @property
    def total(self) -> int: ...


class ProgressBar:
    """One bar per stage on ``stream``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._redraw = stream.isatty()
        self._stage: str | None = None
        self._tenths = -1

    def update(self, step: Step) -> None:
        """Show ``step`` (fits a ``vault.migrate`` progress callback)."""
        self.show(step.stage, step.done, step.total)

    def show(self, stage: str, done: int, total: int) -> None:
        """Show ``done`` of ``total`` for ``stage``."""
        if stage != self._stage:
            self.finish()
            self._stage, self._tenths = stage, -1
        fraction = done / total if total else 1.0
        filled = round(fraction * BAR_WIDTH)
        line = f"{stage:<5} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total}"
        if self._redraw:
            self._stream.write(f"\r{line}")
        elif int(fraction * 10) > self._tenths:
            self._tenths = int(fraction * 10)
            self._stream.write(f"{line}\n")
        self._stream.flush()

    def finish(self) -> None:
        """End the line being redrawn, if any."""
        if self._redraw and self._stage is not None:
            self._stream.write("\n")
            self._stream.flush()
