"""Replay of a recorded trace (anything ``can.LogReader`` reads) as if it came from a bus.

``rate`` 1.0 keeps the original timing, 2.0 plays twice as fast, 0 as fast as possible. Frame times stay the
ones recorded in the trace (README "Telemetry envelope"). ``loop`` starts over at the end.

Damaged traces (docs/guarantees.md, "Damaged files"): a trace is read once, from start to end, and never
re-read from the start because of damage (that sent the same frame times again under new seqs).

* candump ``.log`` (and ``.log.gz``) is read line by line (:mod:`vgw.sources.candump`): a damaged line is
  skipped and counted; the first one is named as ``file:line`` in the log, once; the count is logged at
  the end of the trace.
* Any other format goes through ``can.LogReader``, which cannot resume past damage: the trace ends there,
  logged once with the number of frames read.

So ``recv`` raises :class:`SourceReadError` never: the collector's reopen would start the trace over.

With ``loop``, pass k shifts every frame time by k * (span of the trace + its mean frame interval), so frame
times keep rising and never repeat across passes.

Owned by the collector thread (``recv``/``close``); nothing here is shared with another thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import can
from vgw.errors import SourceEndedError, SourceOpenError
from vgw.sources.candump import Damage, DamagedLine, is_candump, open_binary, read_frames
from vgw.timefmt import valid_time

log = logging.getLogger(__name__)

MIN_LOOP_GAP_S = 0.001  # between passes of a trace whose frames all share one time


class ReplaySource:
    def __init__(self, path: Path, *, rate: float = 1.0, loop: bool = False, exit_on_error: bool = False) -> None:
        self.path = path
        self.rate = rate
        self.loop = loop
        self.exit_on_error = exit_on_error  # ``replay_exit``: a trace that cannot be opened ends the run
        self.finished = False
        self.frames_read = 0
        self.lines_skipped = 0  # damaged lines of the first pass (a loop does not count them again)
        self.overflow = 0  # nothing is queued: a trace is read on demand
        self._pass = 0
        self._shift = 0.0  # added to every frame time of this pass
        self._pass_frames = 0
        self._t_min: float | None = None  # raw frame times of the first pass: the span a loop shifts by
        self._t_max: float | None = None
        self._first_pass_frames = 0
        self._closers: list[Callable[[], object]] = []
        self._iter = self._open()
        self._start_wall: float | None = None
        self._start_trace: float | None = None
        self._pending: can.Message | None = None

    # -- reading --------------------------------------------------------------------------------------

    def _open(self) -> Iterator[can.Message | DamagedLine]:
        """The frames of one pass. Raises SourceOpenError when the file cannot be opened (retried by the
        collector; SourceEndedError with ``exit_on_error``);
        a file no reader can start on (unknown format, damaged header) is a trace with no frames."""
        self._release()
        try:
            if is_candump(self.path):
                fh = open_binary(self.path)
                self._closers.append(fh.close)
                return read_frames(fh)
            reader = can.LogReader(str(self.path))
        except OSError as exc:
            # Retried by the collector (the file may still appear), except with ``replay_exit``: a run that is
            # meant to end must not wait forever for a file (docs/guarantees.md, "Damaged files").
            error = SourceEndedError if self.exit_on_error else SourceOpenError
            raise error(f"{self.path}: cannot read trace: {exc.strerror or exc}") from exc
        except Exception as exc:  # python-can's readers raise ValueError, struct.error ... on a bad header
            # Retrying cannot help and must not loop (`replay_exit` would never end): nothing is replayed.
            if self._pass == 0:
                log.error("%s: cannot read trace (%s: %s): nothing is replayed", self.path, type(exc).__name__,
                          str(exc)[:120])
            return iter(())
        self._closers.append(reader.stop)
        return iter(reader)

    def _release(self) -> None:
        for close in self._closers:
            try:
                close()
            except Exception as exc:  # closing a damaged reader must not fail the replay
                log.debug("%s: closing the trace: %s", self.path, type(exc).__name__)
        self._closers.clear()

    def _next(self) -> can.Message | None:
        while True:
            try:
                item = next(self._iter)
            except StopIteration:
                if not self._next_pass():
                    return None
                continue
            except Exception as exc:  # a third-party reader (BLF, ASC, gzip...) may raise anything
                # The reader cannot go on past this point; ending the trace here beats re-reading it from the
                # start (which sends every frame time again) or a dead collector thread.
                if self._pass == 0:
                    log.error("%s: trace unreadable after %d frames (%s): the rest of it is skipped", self.path,
                              self._pass_frames, type(exc).__name__)
                if not self._next_pass():
                    return None
                continue
            if not isinstance(item, DamagedLine) and not valid_time(item.timestamp):
                # Another format's reader may hand out a NaN or a year-30000 time: never into policy or JSON.
                item = DamagedLine(self._pass_frames + 1, Damage.TIME)  # (a frame number: no lines here)
            if isinstance(item, DamagedLine):
                if self._pass == 0:
                    self.lines_skipped += 1
                    if self.lines_skipped == 1:
                        log.warning("%s:%d: damaged line skipped (%s); further damaged lines are counted, "
                                    "not logged", self.path, item.number, item.damage.value)
                continue
            if self._pass == 0:
                t = item.timestamp
                self._t_min = t if self._t_min is None else min(self._t_min, t)
                self._t_max = t if self._t_max is None else max(self._t_max, t)
            elif self._shift:
                item.timestamp += self._shift
            self._pass_frames += 1
            return item

    def _next_pass(self) -> bool:
        """At the end of a pass: log it, and start the next pass if looping. False when the trace is done."""
        if self._pass == 0:
            self._first_pass_frames = self._pass_frames
            if self.lines_skipped:
                log.warning("%s: %d damaged line(s) skipped", self.path, self.lines_skipped)
        if not self.loop or self._pass_frames == 0 or self._t_min is None or self._t_max is None:
            self._release()
            return False  # the end, or an empty/unreadable trace that must not spin forever
        span = self._t_max - self._t_min
        n = self._first_pass_frames
        gap = span / (n - 1) if n > 1 else 0.0  # the mean frame interval
        self._pass += 1
        self._shift += span + max(gap, MIN_LOOP_GAP_S)
        self._pass_frames = 0
        self._iter = self._open()
        return True

    # -- the FrameSource interface ---------------------------------------------------------------------

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
        self._release()
