"""Named counters in the outbox (drops, retention deletes, what was sent) for status and the privacy report.

Most add up; ``first_sent:<g>`` / ``last_sent:<g>`` (Unix seconds) are kept with a MIN / MAX upsert instead (see
:meth:`vgw.state.outbox.Outbox.mark_sent`), so one table serves the report. No values, only counts.
"""

from __future__ import annotations

from vgw.state.outbox.connection import Connection


class Tallies(Connection):
    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``. Raises :class:`~vgw.base.errors.OutboxUnwritable`."""
        with self._tx():
            self._count_locked(name, n)

    def count_many(self, counts: dict[str, int]) -> None:
        """Add each of ``counts`` in one transaction. Raises :class:`~vgw.base.errors.OutboxUnwritable`."""
        if not counts:
            return
        with self._tx():
            for name, n in sorted(counts.items()):
                self._count_locked(name, n)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {str(k): int(v) for k, v in self._db.execute("SELECT name, value FROM counters")}
