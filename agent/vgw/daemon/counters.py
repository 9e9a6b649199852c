"""Counters several daemon threads add to: one lock, so ``+=`` from two threads never loses a count.

Owned by no thread: the collector, the batch writer, the main loop and the OBD poller add to it; the status
writer reads a snapshot. Each ``add`` takes the counter lock for one dict update (never held across I/O).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping


class Counters(Mapping[str, int]):
    """A thread-safe set of named integer counters (read like a dict)."""

    def __init__(self, names: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> int:
        """Add ``n`` to ``name``; the new value."""
        with self._lock:
            value = self._values[name] = self._values.get(name, 0) + n
            return value

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        return len(self._values)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
