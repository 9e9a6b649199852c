"""Health: whether the agent is doing its work (the systemd watchdog is fed only while it is), and bus silence.

Owned by the main loop, which calls :meth:`Health.update` and :meth:`Health.check_silence` every turn. Takes
no lock: it reads other threads' liveness and single float timestamps (the collector's ``beat`` and
``frame_at``); ``healthy``, ``problem`` and ``bus_silent`` are single attribute writes that the status view
reads from any thread (paho's, for the retained status).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from vgw.config.settings import CanConfig
from vgw.daemon.collector import Collector, source_name
from vgw.daemon.timing import DEFAULT_TIMING, Timing
from vgw.daemon.writer import BatchWriter
from vgw.uplink.link import Uplink

log = logging.getLogger(__name__)

COLLECTOR_STALL_S = DEFAULT_TIMING.collector_stall_s  # the period itself: vgw.daemon.timing.Timing


class Health:
    """The agent's health and the bus's silence, judged by the main loop (thread: main; no lock)."""

    def __init__(self, *, collector: Collector | None, writer: BatchWriter, uplink: Uplink,
                 obd: Callable[[], Any], can_cfg: CanConfig | None, timing: Timing = DEFAULT_TIMING) -> None:
        self.collector = collector
        self.writer = writer
        self.uplink = uplink
        self._obd = obd  # the OBD-II poller once started (None before, and without [obd])
        self.can_cfg = can_cfg
        self.healthy = True
        self.problem: str | None = None  # why the agent is not healthy (None: it is)
        self.collector_stall_s = timing.collector_stall_s
        self.bus_silent = False

    def update(self, now: float) -> bool:
        """Judge health now; True when ``healthy`` changed (the retained status must say so)."""
        self.problem = self._problem(now)
        healthy = self.problem is None
        if healthy == self.healthy:
            return False
        self.healthy = healthy
        return True

    def _problem(self, now: float) -> str | None:
        """Why the agent is not doing its work, or None. The watchdog is fed only while this is None.

        "Working" for the collector is its loop going round (a quiet bus is legal), not frames arriving.
        """
        collector = self.collector
        thread = collector.thread if collector is not None else None
        if collector is not None and thread is not None and not collector.done.is_set():
            if not thread.is_alive():
                return "collector stopped"
            stalled = now - collector.beat
            if stalled >= self.collector_stall_s:
                return f"collector stalled for {stalled:.0f} s"
        obd = self._obd()
        if obd is not None and not obd.is_alive():
            return "OBD poller stopped"
        if not self.uplink.is_alive():
            return "uplink stopped"
        if self.writer.started and not self.writer.is_alive():
            return "batch writer stopped"
        return None

    def check_silence(self, now: float) -> bool:
        """Say once when the bus has delivered no frame for ``[can] silent_s``, and once when frames return.
        True when ``bus_silent`` changed."""
        can_cfg, collector = self.can_cfg, self.collector
        assert can_cfg is not None and collector is not None
        quiet = now - collector.frame_at
        silent = bool(can_cfg.silent_s) and quiet >= can_cfg.silent_s and not collector.done.is_set()
        if silent and not self.bus_silent:
            log.warning("CAN %s: no frame for %.0f s (check the channel, the cable or the simulator; "
                        "`vgw sim can` prints the [can] lines to use)", source_name(can_cfg), quiet)
        elif self.bus_silent and not silent:
            log.info("CAN %s: frames again", source_name(can_cfg))
        if silent == self.bus_silent:
            return False
        self.bus_silent = silent
        return True

    def bus_status(self) -> dict[str, Any] | None:
        if self.can_cfg is None or self.collector is None:
            return None
        return {"silent": self.bus_silent, "last_frame_age_s": round(time.monotonic() - self.collector.frame_at, 1)}
