"""Signed receipts waiting for the broker (README "Receipts"): no personal data, so stored as they are."""

from __future__ import annotations

import time
from collections.abc import Callable

from vgw.state.outbox.connection import Connection
from vgw.state.outbox.erasure import BEGUN


class ReceiptQueue(Connection):
    # Called (in the storing thread) after each receipt is stored: the daemon wakes the uplink with it, which
    # otherwise sleeps until it has something to do (vgw.uplink.link).
    on_receipt: Callable[[], None] | None = None

    def queue_receipt(self, token: str, *, ends_erasure: str | None = None) -> int:
        """Store a signed receipt until the broker acknowledges it. Returns its row id.

        ``ends_erasure``: the grant whose erasure this receipt reports; it leaves the ledger of erasures begun in
        the same transaction (vgw.state.outbox.erasure), so a crash never loses the receipt nor sends it twice."""
        with self._tx() as db:
            cur = db.execute("INSERT INTO receipts (created, token) VALUES (?, ?)", (time.time(), token))
            if ends_erasure is not None:
                db.execute("DELETE FROM meta WHERE key = ?", (BEGUN + ends_erasure,))
            rid = int(cur.lastrowid or 0)
        if self.on_receipt is not None:
            self.on_receipt()
        return rid

    def pending_receipts(self, limit: int, exclude: set[int] | None = None) -> list[tuple[int, str]]:
        """The oldest receipts not in ``exclude`` (ids in flight): (id, token)."""
        exclude = exclude or set()
        with self._lock:
            rows = self._db.execute("SELECT id, token FROM receipts ORDER BY id LIMIT ?",
                                    (limit + len(exclude),)).fetchall()
        return [(int(i), str(t)) for i, t in rows if i not in exclude][:limit]

    def delete_receipt(self, receipt_id: int) -> None:
        """The broker acknowledged the receipt. Raises :class:`~vgw.base.errors.OutboxUnwritable`."""
        with self._tx() as db:
            db.execute("DELETE FROM receipts WHERE id = ?", (receipt_id,))

    def receipt_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])
