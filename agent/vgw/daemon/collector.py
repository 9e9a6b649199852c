"""The collector: the thread that reads the CAN source and feeds the pipeline.

Thread ``vgw-collector`` owns the source (opens, reads, closes and reopens it) and everything here but
``done`` and the health readings (``beat``, ``frame_at``: single float writes the main loop reads). It
processes each chunk of frames (``recv_many``) under the agent lock (:class:`vgw.daemon.locked_pipeline.PipelineGuard`),
one lock per chunk, and hands full or due batches to the writer there; it waits for the writer's room
outside the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import can

from vgw.base.errors import SourceEndedError, SourceError, SourceFrameError, SourceReadError
from vgw.config.settings import BatchConfig, CanConfig
from vgw.daemon.counters import Counters
from vgw.daemon.locked_pipeline import PipelineGuard
from vgw.daemon.writer import BatchWriter
from vgw.pipeline.j1939.request import Requester
from vgw.sources import open_source
from vgw.sources.canbus import BusSource
from vgw.sources.canmsg import Frame, frame_of

log = logging.getLogger(__name__)

BAD_FRAMES_REOPEN = 100  # this many malformed frames in a row with nothing good between: reopen the source
CHUNK_FRAMES = 256  # frames the collector takes from its source per lock (vgw.sources.FrameSource.recv_many)
FRAME_ERROR_LOG_EVERY_S = 60.0  # per-frame errors are counted exactly but logged at most this often


class Collector:
    """Reads the source on thread ``vgw-collector`` until ``stop`` (or the end of a finite trace: ``done``).

    Locks: the agent lock (``guard.lock``) once per chunk and per due-flush check; the counters' own lock.
    ``exit_code`` becomes 1 when a trace cannot be opened with ``replay_exit``.
    """

    def __init__(self, *, can_cfg: CanConfig, batch: BatchConfig, guard: PipelineGuard, counters: Counters,
                 writer: BatchWriter, stop: threading.Event) -> None:
        self.can_cfg = can_cfg
        self.batch = batch
        self.guard = guard
        self.counters = counters
        self.writer = writer
        self.stop = stop
        self.thread: threading.Thread | None = None
        self.done = threading.Event()  # the finite trace was read to its end and every batch stored
        self.beat = time.monotonic()  # monotonic time of the collector loop's last iteration
        self.frame_at = self.beat  # monotonic time the source last delivered a frame
        self.exit_code = 0
        self._frame_errors_logged = 0.0
        self._frame_errors_unlogged = 0

    @property
    def source(self) -> Any:
        """The open source (None while there is none)."""
        return self.guard.source

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="vgw-collector", daemon=True)
        self.thread.start()

    def run(self) -> None:
        """The collector thread: open the source, read, route, flush; reopen on failure. Never ends on one bad
        frame or one failing session: only stop, or the end of a finite trace, ends it."""
        can_cfg = self.can_cfg
        # README "SAE J1939": requests (PGN 59904) only when the config allows them; rate-limited across reopens.
        requester = Requester(can_cfg.j1939_address) if can_cfg.j1939_requests and \
            can_cfg.j1939_address is not None else None
        while not self.stop.is_set():
            self.beat = time.monotonic()
            try:
                self.guard.source = open_source(can_cfg)
            except SourceEndedError as exc:  # a trace that cannot be opened, with replay_exit: end non-zero
                log.error("%s; ending (replay_exit)", exc)
                self.exit_code = 1
                self.done.set()
                return
            except SourceError as exc:
                self.counters.add("source_errors", 1)
                log.error("%s; retrying in %.1f s", exc, can_cfg.reopen_s)
                self._pause(can_cfg.reopen_s)
                continue
            source = self.guard.source
            try:
                with self.guard.lock:
                    self.guard.install_filters()
                if self._read_source(source, requester):
                    return
            except SourceError as exc:
                self.counters.add("source_errors", 1)
                log.error("%s; reopening in %.1f s", exc, can_cfg.reopen_s)
                self._pause(can_cfg.reopen_s)
            except Exception as exc:  # a defect must not end collection: count it, reopen, and say so
                self.counters.add("source_errors", 1)
                log.error("collector failed (%s); reopening the source in %.1f s", type(exc).__name__,
                          can_cfg.reopen_s)
                self._pause(can_cfg.reopen_s)
            finally:
                self.counters.add("rx_overflow", source.overflow)
                source.close()
                self.guard.source = None

    def _pause(self, seconds: float) -> None:
        """Wait (until stop) while still beating: waiting to reopen is progress, not a stall."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set():
            self.beat = now = time.monotonic()
            if now >= deadline:
                return
            self.stop.wait(min(1.0, deadline - now))

    def _read_source(self, source: Any, requester: Requester | None = None) -> bool:
        """Read ``source`` until stop (False) or the end of a finite trace (True, everything flushed); send the
        J1939 requests ``requester`` says are due (README "SAE J1939").

        Raises SourceReadError when the source fails or sends BAD_FRAMES_REOPEN malformed frames in a row.
        """
        guard, stop = self.guard, self.stop
        pipeline, lock = guard.pipeline, guard.lock
        counters = self.counters
        max_samples, max_interval = self.batch.max_samples, self.batch.max_interval_s
        recv_many = getattr(source, "recv_many", None)
        last_check = time.monotonic()
        bad_in_row = 0
        while not stop.is_set():
            self.beat = time.monotonic()
            try:
                frames = recv_many(CHUNK_FRAMES, 0.05) if recv_many is not None else _one(source.recv(0.05))
            except SourceFrameError as exc:
                counters.add("frames_malformed", 1)
                self._frame_error(str(exc))
                bad_in_row += 1
                if bad_in_row >= BAD_FRAMES_REOPEN:
                    raise SourceReadError(f"{bad_in_row} malformed frames in a row") from exc
                continue
            if frames:
                bad_in_row = 0
                # One lock per chunk: a revocation waits at most one chunk (CHUNK_FRAMES frames), never a
                # half-processed frame (docs/guarantees.md).
                with lock:
                    errors, remotes = pipeline.process_frames(frames, self._frame_failed)
                    if errors:
                        counters.add("error_frames", errors)  # bus errors, bus-off notices: never data
                    if remotes:
                        counters.add("remote_frames", remotes)
                    full = [b for b in pipeline.batches.values() if b.count >= max_samples]
                    if full:
                        guard.flush(full)
                if full:
                    self.writer.wait_room()  # a writer far behind (slow disk) holds the collector, not memory
            now = time.monotonic()
            if frames:
                self.frame_at = now
            if not frames or now - last_check >= 0.05:
                last_check = now
                with lock:
                    due = pipeline.due(max_samples, max_interval)
                    if due:
                        guard.flush(due)
                    requests = requester.due(now, pipeline.granted_scopes()) if requester else ()
                if requests and isinstance(source, BusSource):
                    for can_id, data in requests:
                        source.send_j1939_request(can_id, data)
            if source.finished:
                with lock:
                    guard.flush(pipeline.due(1, 0, force=True))
                self.writer.wait_idle(60.0)  # "done" means stored: replay_exit then waits for the uplink
                self.done.set()
                return True
        return False

    def _frame_failed(self, exc: Exception) -> None:
        self.counters.add("frames_failed", 1)
        self._frame_error(f"a frame could not be processed ({type(exc).__name__}); skipped")

    def _frame_error(self, what: str) -> None:
        """Log a per-frame error: the first at once, then at most once per FRAME_ERROR_LOG_EVERY_S with the
        number skipped meanwhile (the counters are exact; a noisy line must not fill the journal)."""
        now = time.monotonic()
        if self._frame_errors_logged and now - self._frame_errors_logged < FRAME_ERROR_LOG_EVERY_S:
            self._frame_errors_unlogged += 1
            return
        more = f" (and {self._frame_errors_unlogged} more frame error(s) since the last report)" \
            if self._frame_errors_unlogged else ""
        log.warning("%s%s", what, more)
        self._frame_errors_logged = now
        self._frame_errors_unlogged = 0


def source_name(can_cfg: CanConfig) -> str:
    """How a log line names the CAN source."""
    return f"replay {can_cfg.replay.name}" if can_cfg.replay else f"{can_cfg.interface}:{can_cfg.channel}"


def _one(msg: can.Message | None) -> list[Frame]:
    """A source without ``recv_many``: its one frame as a chunk."""
    return [frame_of(msg)] if msg is not None else []
