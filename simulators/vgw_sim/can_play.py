"""Put a recorded trace onto a bus the way can-utils' ``canplayer`` does.

:func:`play` reads any trace ``can.LogReader`` knows (candump ``-L`` ``.log``, ``.asc``, ``.blf``, ``.csv``
...) and sends its frames on a python-can bus with the trace's own timing: each frame leaves at its offset
from the first frame of the trace (``canplayer`` without ``-t``), or as fast as the bus takes them
(``realtime=False``, ``canplayer -t``). ``loops`` plays the trace that many times (``None``: until stopped,
``canplayer -l i``); every pass starts its timing afresh.

A candump ``.log`` is read with the agent's own line reader (:mod:`vgw.sources.candump`): a damaged line is
skipped and counted, as ``canplayer`` and the agent's replay skip it, and the frames after it are sent.

Errors: :class:`~vgw.base.errors.ConfigError` for a missing or unreadable trace (raised before anything is
sent, and also for a trace that holds no frame).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import can
from vgw.base.errors import ConfigError
from vgw.sources.candump import DamagedLine, is_candump, open_binary, read_frames


class Skipped:
    """Damaged lines skipped while playing (candump traces only)."""

    def __init__(self) -> None:
        self.lines = 0


def _frames(path: Path, skipped: Skipped | None = None) -> Iterator[can.Message]:
    try:
        if is_candump(path):
            with open_binary(path) as fh:
                for item in read_frames(fh):
                    if isinstance(item, DamagedLine):
                        if skipped is not None:
                            skipped.lines += 1
                    elif not item.is_error_frame:
                        yield item
            return
        for msg in can.LogReader(str(path)):
            if not msg.is_error_frame:
                yield msg
    except (OSError, EOFError, ValueError, IndexError, KeyError) as exc:
        raise ConfigError(f"trace file {path}: cannot read it ({type(exc).__name__}: {exc})") from exc


def check_trace(path: str | os.PathLike[str]) -> Path:
    """The trace's path, after reading its first frame. Raises :class:`ConfigError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"trace file {p} not found")
    if next(_frames(p), None) is None:
        raise ConfigError(f"trace file {p} holds no CAN frame")
    return p


def play(bus: can.BusABC, path: str | os.PathLike[str], *, loops: int | None = 1, realtime: bool = True,
         stop_event: threading.Event | None = None, skipped: Skipped | None = None) -> int:
    """Send the trace at ``path`` on ``bus`` ``loops`` times (``None``: until ``stop_event``). Returns the
    number of frames sent. Frames the bus refuses (full queue) are skipped, as ``canplayer`` does; damaged
    lines of a candump trace are skipped and counted in ``skipped`` (per pass)."""
    p = check_trace(path)
    stop = stop_event or threading.Event()
    sent = 0
    done = 0
    while loops is None or done < loops:
        first: float | None = None
        start = time.monotonic()
        if skipped is not None:
            skipped.lines = 0
        for msg in _frames(p, skipped):
            if stop.is_set():
                return sent
            if realtime:
                if first is None:
                    first = msg.timestamp
                delay = (msg.timestamp - first) - (time.monotonic() - start)
                if delay > 0 and stop.wait(delay):
                    return sent
            try:
                bus.send(can.Message(arbitration_id=msg.arbitration_id, is_extended_id=msg.is_extended_id,
                                     is_remote_frame=msg.is_remote_frame, is_fd=msg.is_fd,
                                     bitrate_switch=msg.bitrate_switch, dlc=msg.dlc, data=msg.data,
                                     check=False))
            except can.CanOperationError:
                continue
            sent += 1
        done += 1
    return sent
