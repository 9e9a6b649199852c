"""The supervisor's periods, in one frozen value the agent is given (``Agent(cfg, timing=...)``).

The defaults are the product's; nothing in the config file sets them. A test that needs the agent to retry,
sweep or judge sooner passes a shorter :class:`Timing` instead of waiting out the real period.

Threads: no thread owns a :class:`Timing`; it is immutable, so the supervisor's, the collector's and the health
thread read it without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Timing:
    """Periods and deadlines of the agent's main loop and health checks, in seconds (monotonic clock)."""

    status_every_s: float = 0.5  # status.json is rewritten
    retention_every_s: float = 5.0  # retention and pending erasures
    pending_retry_every_s: float = 1.0  # the disk part of a pending consent document (vgw.state.consent.pending)
    floor_every_s: float = 30.0  # the persisted clock floor (vgw.state.consent.store)
    quota_audit_every_s: float = 60.0  # at most one quota-drop audit entry per grant per period (counter exact)
    quota_view_every_s: float = 5.0  # the status's quota view scans the rows' sizes: not every status tick
    replay_drain_s: float = 120.0  # replay_exit: how long the end of the trace waits for every acknowledgement
    collector_stall_s: float = 10.0  # no collector loop turn for this long: stalled (health not ok, no watchdog)
    shutdown_send_s: float = 2.0  # on SIGTERM, how long a live link may take to send what was just flushed
    seal_restart_s: float = 5.0  # a seal worker that failed: batches are sealed in-process this long, then a new one
    seal_reply_s: float = 30.0  # a seal worker that takes longer than this for a group is hung: stopped, see above

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"Timing.{name}: must be a number of seconds > 0, got {value!r}")


DEFAULT_TIMING = Timing()
