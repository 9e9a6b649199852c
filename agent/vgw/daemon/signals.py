"""SIGTERM, SIGINT and SIGHUP for `vgw run`: the one place the daemon installs signal handlers.

Thread: main (Python runs signal handlers there, between bytecodes). No lock: a handler only appends to a
list or sets an event. Install as early as possible (`vgw` does before it even parses its arguments): until an
agent is attached, a stop request is remembered -- systemd may stop the service while it is still starting, and
that must still be a clean exit 0 -- and SIGHUP is ignored (the agent reads the config as it starts). Once
attached, SIGTERM/SIGINT set the agent's stop event and SIGHUP its reload event (vgw.daemon.agent, "Reload").
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


class DaemonSignals:
    """The signal handlers of one `vgw run` process (owned by the main thread)."""

    def __init__(self) -> None:
        self.early: list[int] = []  # stop signals received before an agent was attached
        self._stop: threading.Event | None = None
        self._reload: threading.Event | None = None
        self.installed = False

    def install(self) -> bool:
        """Install the handlers (once); False off the main thread, where Python cannot."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if not self.installed:
            signal.signal(signal.SIGTERM, self._on_stop)
            signal.signal(signal.SIGINT, self._on_stop)
            signal.signal(signal.SIGHUP, self._on_reload)
            self.installed = True
        return True

    def attach(self, stop: threading.Event, reload: threading.Event) -> None:
        """Route the signals to an agent's events; a stop requested while it was starting takes effect now."""
        self._reload = reload
        self._stop = stop
        if self.early:
            log.info("signal %d during start: stopping", self.early[0])
            stop.set()

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self._stop is None:
            self.early.append(signum)
            return
        log.info("signal %d: stopping", signum)
        self._stop.set()

    def _on_reload(self, signum: int, frame: Any) -> None:
        if self._reload is not None:
            self._reload.set()
