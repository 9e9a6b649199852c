"""Progress on long work, the way command-line tools show it: one line redrawn in place on a terminal, and
nothing at all when stderr is not a terminal (piped into a file or another program, a CI log, systemd), so
output meant for programs stays clean."""

from __future__ import annotations

import sys
from typing import IO


class Progress:
    """A one-line progress bar on a terminal (``out``, default stderr); silent otherwise."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.live = self.out.isatty()
        self._phase = ""

    def phase(self, name: str) -> None:
        """Start a phase of known length (its bar starts empty)."""
        self._phase = name
        self.update(0.0)

    def update(self, fraction: float, note: str = "") -> None:
        if not self.live:
            return
        width = 30
        done = int(max(0.0, min(1.0, fraction)) * width)
        self.out.write(f"\r\x1b[2K{self._phase:<22} [{'#' * done}{'.' * (width - done)}] {note}")
        self.out.flush()

    def step(self, text: str) -> None:
        """A step of work whose length is unknown: its name alone."""
        if self.live:
            self.out.write(f"\r\x1b[2K{text} ...")
            self.out.flush()

    def close(self) -> None:
        """Clear the line (a terminal shows the result next, not a stale bar)."""
        if self.live:
            self.out.write("\r\x1b[2K")
            self.out.flush()
