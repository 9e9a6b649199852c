"""Replay of a recorded trace (anything ``can.LogReader`` reads) as if it came from a bus.

``rate`` 1.0 keeps the original timing, 2.0 plays twice as fast, 0 as fast as possible. Frame times stay the
ones recorded in the trace (CONTRACT §6). ``loop`` starts over at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import can

from agent.errors import SourceOpenError, SourceReadError


class ReplaySource:
    def __init__(self, path: Path, *, rate: float = 1.0, loop: bool = False) -> None:
        self.path = path
        self.rate = rate
        self.loop = loop
        self.finished = False
        self.frames_read = 0
        self._iter = self._open()
        self._start_wall: float | None = None
        self._start_trace: float | None = None
        self._pending: can.Message | None = None
        self.overflow = 0  # nothing is queued: a trace is read on demand

    def _open(self) -> Iterator[can.Message]:
        try:
            reader = can.LogReader(str(self.path))
        except (ValueError, OSError, can.CanError) as exc:
            raise SourceOpenError(f"{self.path}: cannot read trace: {exc}") from exc
        return iter(reader)

    def _next(self) -> can.Message | None:
        while True:
            try:
                return next(self._iter)
            except StopIteration:
                if not self.loop:
                    return None
                self._iter = self._open()
                self._start_wall = None
                if self.frames_read == 0:
                    return None  # an empty trace must not spin forever
            except (ValueError, OSError, can.CanError) as exc:
                raise SourceReadError(f"{self.path}: trace unreadable after {self.frames_read} frames: {exc}") from exc

    def recv(self, timeout: float) -> can.Message | None:
        if self.finished:
            time.sleep(min(timeout, 0.05))
            return None
        msg = self._pending or self._next()
        self._pending = None
        if msg is None:
            self.finished = True
            return None
        if msg.is_error_frame or msg.is_remote_frame:
            self.frames_read += 1
            return msg
        if self.rate > 0:
            if self._start_wall is None or self._start_trace is None:
                self._start_wall, self._start_trace = time.monotonic(), msg.timestamp
            due = self._start_wall + (msg.timestamp - self._start_trace) / self.rate
            wait = due - time.monotonic()
            if wait > timeout:
                time.sleep(timeout)
                self._pending = msg
                return None
            if wait > 0:
                # Sleep at least 2 ms: a frame is at most 2 ms late, and the thread wakes 4x less often
                # (CPU at 4k frames/s: 11 % -> 6.6 %, docs/performance.md).
                time.sleep(max(wait, 0.002))
        self.frames_read += 1
        return msg

    def set_filters(self, frames: frozenset[tuple[int, bool]]) -> None:
        return None

    def close(self) -> None:
        self.finished = True
