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

A trace must be a regular file (links followed): a FIFO, ``/dev/zero`` or a folder cannot be opened as one
(``SourceOpenError``, or ``SourceEndedError`` with ``replay_exit``), never read as an empty or endless trace.

So ``recv`` raises :class:`SourceReadError` never: the collector's reopen would start the trace over.

With ``loop``, pass k shifts every frame time by k * (span of the trace + its mean frame interval), so frame
times keep rising and never repeat across passes.

Owned by the collector thread (``recv``/``close``); nothing here is shared with another thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import can

from vgw.base.errors import SourceEndedError, SourceOpenError
from vgw.base.fsutil import open_regular
from vgw.base.timefmt import valid_time
from vgw.sources.candump import Damage, DamagedLine, is_candump, open_binary, read_frame_chunks
from vgw.sources.canmsg import DATA, Frame, frame_of, message_of

log = logging.getLogger(__name__)

MIN_LOOP_GAP_S = 0.001  # between passes of a trace whose frames all share one time
# At replay_rate > 0, sleep at least this long before a frame that is not due yet: a frame is at most this
# late, and the collector wakes (and takes a lock) once per chunk of the frames due meanwhile, not per frame
# (CPU at 4k frames/s, docs/performance.md).
MIN_SLEEP_S = 0.01


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
        self._checked_times = False  # True for the candump reader, which refuses bad times itself
        self._iter = self._open()
        self._start_wall: float | None = None
        self._start_trace: float | None = None
        self._pending: Frame | None = None
        self._buf: list[Frame | DamagedLine] = []  # the current chunk, handed out from _pos on
        self._pos = 0
        self._clean = False

    # -- reading --------------------------------------------------------------------------------------

    def _open(self) -> Iterator[tuple[list[Frame | DamagedLine], bool]]:
        """The frames of one pass, a chunk at a time (vgw.sources.candump.read_frame_chunks). Raises
        SourceOpenError when the file cannot be opened (retried by the collector; SourceEndedError with
        ``exit_on_error``); a file no reader can start on (unknown format, damaged header) is a trace with no
        frames."""
        self._release()
        try:
            if is_candump(self.path):
                fh = open_binary(self.path)
                self._closers.append(fh.close)
                self._checked_times = True
                return read_frame_chunks(fh)
            # python-can's readers open the file by name: check it first, so a FIFO cannot block the open (or
            # read as an empty trace) and /dev/zero cannot be read without end.
            os.close(open_regular(self.path))
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
        self._checked_times = False
        return _chunks_of(reader)

    def _release(self) -> None:
        for close in self._closers:
            try:
                close()
            except Exception as exc:  # closing a damaged reader must not fail the replay
                log.debug("%s: closing the trace: %s", self.path, type(exc).__name__)
        self._closers.clear()

    def _refill(self) -> bool:
        """The next chunk of frames into the buffer; False when the trace is done."""
        while True:
            try:
                chunk, clean = next(self._iter)
            except StopIteration:
                if not self._next_pass():
                    return False
                continue
            except Exception as exc:  # a third-party reader (BLF, ASC, gzip...) may raise anything
                # The reader cannot go on past this point; ending the trace here beats re-reading it from the
                # start (which sends every frame time again) or a dead collector thread.
                if self._pass == 0:
                    log.error("%s: trace unreadable after %d frames (%s): the rest of it is skipped", self.path,
                              self._pass_frames, type(exc).__name__)
                if not self._next_pass():
                    return False
                continue
            # A clean chunk of the first pass (data frames, times checked by the reader) is handed out as it
            # is, a slice at a time; its time span is taken here, once per chunk.
            self._clean = clean and self._pass == 0 and self._checked_times
            self._buf, self._pos = chunk, 0
            if self._clean and chunk:
                lo, hi = min(f[0] for f in chunk), max(f[0] for f in chunk)  # type: ignore[index]
                self._t_min = lo if self._t_min is None else min(self._t_min, lo)
                self._t_max = hi if self._t_max is None else max(self._t_max, hi)
                self._pass_frames += len(chunk)
            return True

    def _next(self) -> Frame | None:
        while True:
            if self._pos >= len(self._buf):
                if not self._refill():
                    return None
                continue
            item = self._buf[self._pos]
            self._pos += 1
            if self._clean:
                return item  # type: ignore[return-value]
            if type(item) is not tuple:
                assert isinstance(item, DamagedLine)
                self._skipped(item)
                continue
            t = item[0]
            if not self._checked_times and not valid_time(t):
                # Another format's reader may hand out a NaN or a year-30000 time: never into policy or JSON.
                item = DamagedLine(self._pass_frames + 1, Damage.TIME)  # (a frame number: no lines here)
                self._skipped(item)
                continue
            if self._pass == 0:
                if self._t_min is None or t < self._t_min:
                    self._t_min = t
                if self._t_max is None or t > self._t_max:
                    self._t_max = t
            elif self._shift:
                item = (t + self._shift, *item[1:])
            self._pass_frames += 1
            return item

    def _skipped(self, item: DamagedLine) -> None:
        if self._pass == 0:
            self.lines_skipped += 1
            if self.lines_skipped == 1:
                log.warning("%s:%d: damaged line skipped (%s); further damaged lines are counted, not logged",
                            self.path, item.number, item.damage.value)

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
        """One frame as a python-can message (the collector uses :meth:`recv_many`)."""
        frames = self.recv_many(1, timeout)
        return message_of(frames[0]) if frames else None

    def recv_many(self, max_frames: int, timeout: float) -> list[Frame]:
        """Up to ``max_frames`` frames: as many as are due now (all of them at rate 0); waits up to ``timeout``
        s for the first. ``finished`` is set once the last frame was handed out."""
        if self.finished:
            time.sleep(min(timeout, 0.05))
            return []
        out: list[Frame] = []
        nxt = self._next
        if self.rate <= 0:
            pending, self._pending = self._pending, None
            if pending is not None:
                out.append(pending)
            while len(out) < max_frames:
                if self._clean and self._pos < len(self._buf):
                    take = self._buf[self._pos:self._pos + max_frames - len(out)]
                    self._pos += len(take)
                    out.extend(take)  # type: ignore[arg-type]
                    continue
                frame = nxt()
                if frame is None:
                    self.finished = True
                    break
                out.append(frame)
            self.frames_read += len(out)
            return out
        now = time.monotonic()
        while len(out) < max_frames:
            frame, self._pending = self._pending or nxt(), None
            if frame is None:
                self.finished = True
                break
            if frame[4] != DATA:  # error and remote frames are counted at once, never waited for
                out.append(frame)
                continue
            if self._start_wall is None or self._start_trace is None:
                self._start_wall, self._start_trace = now, frame[0]
            wait = self._start_wall + (frame[0] - self._start_trace) / self.rate - now
            if wait > 0:
                if out:
                    self._pending = frame
                    break
                if wait > timeout:
                    time.sleep(timeout)
                    self._pending = frame
                    break
                # Sleep at least MIN_SLEEP_S: the frames due meanwhile come in one chunk.
                time.sleep(max(wait, MIN_SLEEP_S))
                now = time.monotonic()
            out.append(frame)
        self.frames_read += len(out)
        return out

    def set_filters(self, frames: frozenset[tuple[int, bool]]) -> None:
        return None

    def close(self) -> None:
        self.finished = True
        self._release()


def _chunks_of(reader: Any) -> Iterator[tuple[list[Frame | DamagedLine], bool]]:
    """python-can's messages as chunks of frame tuples; the frames read before a reader error come first."""
    buf: list[Frame | DamagedLine] = []
    try:
        for msg in reader:
            buf.append(frame_of(msg))
            if len(buf) >= 256:
                yield buf, False
                buf = []
    except Exception:
        if buf:
            yield buf, False
        raise
    if buf:
        yield buf, False
