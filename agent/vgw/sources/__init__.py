"""Frame sources behind one small interface, chosen by name from the config.

* ``canbus``: any python-can interface (socketcan, slcan, virtual, ...), kernel filters where supported.
* ``replay``: a recorded trace (candump .log by vgw.sources.candump, anything else through ``can.LogReader``).
* OBD-II sources live in ``vgw.sources.obd``.
"""

from __future__ import annotations

from typing import Protocol

import can

from vgw.config.settings import CanConfig
from vgw.sources.canmsg import Frame


class FrameSource(Protocol):
    """What the collector needs of a source."""

    #: True once a finite source (a trace without loop) has delivered its last frame.
    finished: bool
    @property
    def overflow(self) -> int:
        """Frames lost because a bounded receive queue was full (0 where nothing is queued)."""

    def recv(self, timeout: float) -> can.Message | None:
        """The next frame, or None after ``timeout`` s.

        Raises SourceFrameError for one malformed frame (skipped; the source stays usable) and SourceReadError
        when the source fails (the collector closes and reopens it).
        """

    def recv_many(self, max_frames: int, timeout: float) -> list[Frame]:
        """Up to ``max_frames`` frames (vgw.sources.canmsg) that are ready, waiting up to ``timeout`` s for the
        first; an empty list after ``timeout``. The collector takes its lock once per such chunk.

        Raises as :meth:`recv` does; a source raises an error met after the first frame on the next call.
        """

    def set_filters(self, frames: frozenset[tuple[int, bool]]) -> None:
        """Only these (id, is_extended) frames are wanted (a hint: the collector filters again)."""

    def close(self) -> None:
        """Release the bus/file. Idempotent."""


def open_source(can_cfg: CanConfig) -> FrameSource:
    """Open the source a [can] section describes. Raises SourceOpenError."""
    if can_cfg.replay is not None:
        from vgw.sources.replay import ReplaySource

        return ReplaySource(can_cfg.replay, rate=can_cfg.replay_rate, loop=can_cfg.replay_loop,
                            exit_on_error=can_cfg.replay_exit)
    from vgw.sources.canbus import BusSource

    return BusSource(can_cfg.interface, can_cfg.channel, can_cfg.bitrate, fd=can_cfg.fd,
                     data_bitrate=can_cfg.data_bitrate)

