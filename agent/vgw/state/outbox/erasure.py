"""Erasure of a grant's data (README "Receipts"): key first, then rows, then proof that no copy is left.

:meth:`Erasing.erase` is the one erasure routine of the agent: revocation, expiry, a cache that no longer
verifies and `vgw uninstall --purge` erase a whole grant with it, retention the grant's rows older than its
``retention_s``; narrowing (:meth:`vgw.state.outbox.Outbox.apply_terms`) replaces the key and deletes rows in its own
transaction and proves them gone with the same :meth:`Erasing.finish_erasure`. It returns what it found and
did (:class:`Erasure`), and a receipt says exactly that, never more.

``secure_delete`` overwrites deleted content; after an erasure the WAL is checkpointed and truncated so no
page of a revoked grant survives in the -wal file either, and the raw bytes of the files are searched for the
grant's wrapped key and rows: only when none is found is the key reported destroyed
(:meth:`Erasing.erase_grant`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vgw.state.outbox.connection import BUSY_TIMEOUT_S, Connection
from vgw.state.outbox.quarantine import destroy_quarantined

log = logging.getLogger(__name__)

# How long an erasure retries its checkpoint before it reports "not verified yet" (the agent's main loop
# then retries every few seconds; see Erasing.erase_grant).
ERASE_WAIT_S = 2.0


# The outbox's ledger of whole-grant erasures begun and not yet receipted: one ``meta`` row per grant, written in
# the transaction that destroys the key and counted up in the one that deletes the rows, removed in the transaction
# that queues the erasure receipt (Receipts.queue_receipt). A process killed in between leaves it, so the next start
# finishes the erasure and sends the receipt with the true count (vgw.state.consent.manager, settle_disk).
BEGUN = "erasing:"


@dataclass(frozen=True, slots=True)
class Begun:
    """An erasure begun and not yet receipted: its grant, the batches it deleted so far, why and under which
    consent version it began."""

    grant_id: str
    batches_deleted: int
    reason: str
    ver: int


@dataclass(frozen=True, slots=True)
class Erasure:
    """What one erasure found and did.

    ``batches_deleted``: unsent batches deleted (rows kept after their PUBACK for the replay window go too, but
    were sent). ``key_destroyed``: the grant's data key is gone and no copy of it or of a deleted row is left in
    any file (False for a rows-only erasure, whose key stays). ``key_found``: a data key was on disk when the
    erasure began (a grant that never stored anything has none). ``verified``: no copy of what was deleted is
    left in any file; until then no receipt may say it is gone (:meth:`Erasing.finish_erasure`).
    """

    grant_id: str
    batches_deleted: int
    key_destroyed: bool
    key_found: bool = True
    verified: bool = True


def _files_hold(files: list[Path], needles: list[bytes]) -> bool:
    """True if any needle occurs in the raw bytes of any of ``files`` (read in chunks that overlap)."""
    needles = list(dict.fromkeys(n for n in needles if n))  # each distinct needle searched once
    if not needles:
        return False
    overlap = max(len(n) for n in needles) - 1
    for p in files:
        try:
            fh = p.open("rb")
        except FileNotFoundError:
            continue
        with fh:
            tail = b""
            while chunk := fh.read(1 << 20):
                window = tail + chunk
                if any(n in window for n in needles):
                    return True
                tail = window[-overlap:] if overlap else b""
    return False


class Erasing(Connection):
    """Erasure of grants; ``_needles`` (under ``_lock``) holds what to search the files for until verified."""

    def __init__(self, path: Path, storage_key: bytes, device: str) -> None:
        super().__init__(path, storage_key, device)
        self._needles: dict[str, list[bytes]] = {}  # erased grants not yet verified gone: what to search for
        # Erasures taken up after a crash: what was deleted before it is not known, so the file is rebuilt.
        self._rebuild_for: set[str] = set()
        self._rebuild_failing = False  # the last rebuild failed (logged once)

    def erase_grant(self, grant_id: str, *, wait_s: float = ERASE_WAIT_S, reason: str = "", ver: int = 0) -> Erasure:
        """:meth:`erase` of the whole grant (revocation, expiry, uninstall). ``reason`` and ``ver`` go into the
        ledger of erasures begun (:meth:`erasures_begun`), for the receipt a restart may have to send."""
        return self.erase(grant_id, wait_s=wait_s, reason=reason, ver=ver)

    def erasures_begun(self) -> list[Begun]:
        """Whole-grant erasures begun whose receipt was never queued (the process died in between)."""
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
                                    (len(BEGUN), BEGUN)).fetchall()
        out = []
        for key, value in rows:
            try:
                doc = json.loads(value)
                out.append(Begun(str(key)[len(BEGUN):], int(doc["n"]), str(doc["reason"]), int(doc["ver"])))
            except (ValueError, KeyError, TypeError):
                out.append(Begun(str(key)[len(BEGUN):], 0, "", 0))
        return sorted(out, key=lambda b: b.grant_id)

    def end_erasure(self, grant_id: str) -> None:
        """Drop ``grant_id`` from the ledger of erasures begun (its receipt is accounted for elsewhere)."""
        with self._tx() as db:
            db.execute("DELETE FROM meta WHERE key = ?", (BEGUN + grant_id,))

    def _begin(self, db: sqlite3.Connection, grant_id: str, reason: str, ver: int) -> bool:
        """Enter the erasure in the ledger (in the caller's transaction); True if it was there already (an
        erasure a crash interrupted, taken up again: its count goes on)."""
        found = db.execute("SELECT 1 FROM meta WHERE key = ?", (BEGUN + grant_id,)).fetchone() is not None
        if not found:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)",
                       (BEGUN + grant_id, json.dumps({"n": 0, "reason": reason, "ver": ver})))
        return found

    def _count_begun(self, db: sqlite3.Connection, grant_id: str, rows: int) -> int:
        """Add ``rows`` to the erasure's count in the ledger (in the caller's transaction); the new count."""
        row = db.execute("SELECT value FROM meta WHERE key = ?", (BEGUN + grant_id,)).fetchone()
        try:
            doc = json.loads(row[0]) if row is not None else {}
        except ValueError:
            doc = {}
        doc["n"] = int(doc.get("n", 0)) + rows
        db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   (BEGUN + grant_id, json.dumps({"n": doc["n"], "reason": doc.get("reason", ""),
                                                  "ver": doc.get("ver", 0)})))
        return int(doc["n"])

    def erase(self, grant_id: str, *, older_than: float | None = None, wait_s: float = ERASE_WAIT_S,
              reason: str = "", ver: int = 0) -> Erasure:
        """Destroy the grant's data key, then delete its rows; then make sure no copy is left in any file.

        With ``older_than`` (retention) only the rows created before that time go, and the key stays.

        The key goes first and in its own transaction: from that commit on, every row of the grant is
        unreadable, even if the process dies before the rows are gone. Then the WAL is checkpointed (retried
        for up to ``wait_s`` while another process holds a read snapshot) and the raw bytes of the outbox, its
        -wal and any quarantined copy are searched for the wrapped key and the sealed rows. ``key_destroyed``
        is True only when that search finds nothing; otherwise the caller must not send an erasure receipt
        yet and finishes later with :meth:`finish_erasure` (README "Receipts").

        A whole-grant erasure is entered in the ledger of erasures begun in its first transaction and counted in
        its second, so a process killed before the receipt is queued leaves it there (:meth:`erasures_begun`);
        erasing the grant again then goes on counting, and ``batches_deleted`` is every row it deleted since it
        began.
        """
        whole = older_than is None
        key_found = False
        with self._lock:
            if whole:
                # The key first, in its own transaction: from its commit on every row of the grant is unreadable.
                self._data_keys.pop(grant_id, None)
                with self._forgetting_on_rollback(grant_id), self._tx() as db:
                    key_found = self._remember_key(db, grant_id)
                    if self._begin(db, grant_id, reason, ver):
                        self._rebuild_for.add(grant_id)
                    db.execute("DELETE FROM active_grants WHERE id = ?", (grant_id,))
                    db.execute("DELETE FROM grant_keys WHERE grant_id = ?", (grant_id,))
                    self._forget_rate_marks(db, grant_id)
            with self._forgetting_on_rollback(grant_id), self._tx() as db:
                rows, unsent = self._delete_rows(db, grant_id, created_before=older_than)
                counted = self._count_begun(db, grant_id, rows) if whole else 0
            # A revoked grant's receipt counts every row it had (since its erasure began); retention counts the
            # unsent ones it cut.
            deleted = counted if whole else unsent
            if not whole and not rows:
                return Erasure(grant_id=grant_id, batches_deleted=0, key_destroyed=False, key_found=False)
        gone = self.finish_erasure(grant_id, wait_s=wait_s)
        if not gone:
            log.warning("erasure of grant %s not verified: another process holds a read snapshot of the outbox, or "
                        "the disk has no room to rebuild it, so erased pages are still in its files; retried until "
                        "they are gone", grant_id)
        return Erasure(grant_id=grant_id, batches_deleted=int(deleted), key_destroyed=whole and gone,
                       key_found=key_found, verified=gone)

    def _remember_key(self, db: sqlite3.Connection, grant_id: str) -> bool:
        """Remember the grant's wrapped key, about to be deleted or replaced, to search the files for; True if it
        had one. In the caller's transaction."""
        wrapped = [bytes(r[0]) for r in db.execute("SELECT wrapped FROM grant_keys WHERE grant_id = ?", (grant_id,))]
        self._needles.setdefault(grant_id, []).extend(wrapped)
        return bool(wrapped)

    def _delete_rows(self, db: sqlite3.Connection, grant_id: str, *, row_ids: list[int] | None = None,
                     created_before: float | None = None) -> tuple[int, int]:
        """Delete the grant's rows (``row_ids``, or those created before ``created_before``, or all) in the
        caller's transaction, remembering a 32-byte piece of each (nonce and ciphertext start: it identifies the
        row in raw bytes) to search the files for. Returns (rows deleted, of which not yet acknowledged)."""
        params: list[object] = []
        if row_ids is not None:
            where, params = f"id IN ({','.join('?' * len(row_ids))})", list(row_ids)
        elif created_before is not None:
            where, params = "created < ?", [created_before]
        else:
            where = "1"
        query = f"FROM batches WHERE grant_id = ? AND {where}"
        pieces = [bytes(r[0]) for r in db.execute(f"SELECT substr(blob, 1, 32) {query}", [grant_id, *params])]
        unsent = int(db.execute(f"SELECT COUNT(*) {query} AND acked IS NULL", [grant_id, *params]).fetchone()[0])
        rows = int(db.execute(f"DELETE {query}", [grant_id, *params]).rowcount)
        self._needles.setdefault(grant_id, []).extend(pieces)
        return rows, unsent

    @contextmanager
    def _forgetting_on_rollback(self, grant_id: str) -> Iterator[None]:
        """A transaction that rolled back deleted nothing: forget what it added to search for."""
        before = len(self._needles.get(grant_id, []))
        try:
            yield
        except BaseException:
            del self._needles.get(grant_id, [])[before:]
            raise

    def _forget_rate_marks(self, db: sqlite3.Connection, grant_id: str) -> None:
        """Drop what the grant's limits remembered (when each path last sent): the grant's history goes with it."""
        db.execute("DELETE FROM rate_marks WHERE grant_id = ?", (grant_id,))

    def finish_erasure(self, grant_id: str, *, wait_s: float = 0.0) -> bool:
        """Checkpoint and search the raw files until nothing of ``grant_id`` is left; True once verified.

        Only call it after :meth:`erase_grant` committed its deletes. Verified means: a TRUNCATE checkpoint
        completed after those commits (every page is back in the main file, where ``secure_delete`` zeroed the
        erased content, and the -wal is empty), no quarantined copy is left, and, when this process still knows
        them, none of the grant's wrapped key or row pieces occurs in the outbox or its -wal. (The grant may
        hold a new key and new rows by then if it was granted again: those are not the erased data.)
        """
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                destroy_quarantined(self.path)
                files = [self.path, Path(str(self.path) + "-wal")]
                needles = self._needles.get(grant_id, [])
                clean = False
                if self.checkpoint():  # else a reader holds a snapshot: wait for it
                    # Taken up after a crash, what the erasure deleted before it is not known: rebuilt regardless.
                    clean = grant_id not in self._rebuild_for and not _files_hold(files, needles)
                    if not clean and self._rebuild():  # a copy SQLite left behind (see _rebuild), or unknown ones
                        clean = self.checkpoint() and not _files_hold(files, needles)
                if clean:
                    self._needles.pop(grant_id, None)
                    self._rebuild_for.discard(grant_id)
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _rebuild(self) -> bool:
        """Rewrite the outbox file from its live content (VACUUM); True when done. Under ``_lock``.

        ``secure_delete`` zeroes a deleted cell, but not the old bytes of a cell SQLite *moved* when it rebalanced
        the b-tree: they stay in the unused part of a page that is still in use, where no later write need ever
        reach them, so a completed checkpoint can still leave a piece of an erased row in the file for good (found
        by the fault-schedule explorer, docs/guarantees.md). VACUUM builds every page afresh from the rows that are
        left and truncates the file. The temporary copy it builds is kept in memory (it holds live rows only), so
        nothing of the outbox is written outside the state directory. It needs room for that copy in the WAL: on a
        full disk it fails, and the erasure stays unverified and is retried.
        """
        try:
            self._db.execute("PRAGMA temp_store = MEMORY")
            self._db.execute("VACUUM")
        except sqlite3.DatabaseError as exc:
            if not self._rebuild_failing:  # said once until it works (a full disk would say it every retry)
                log.warning("outbox rebuild after an erasure failed (%s); retried", type(exc).__name__)
            self._rebuild_failing = True
            return False
        finally:
            try:
                self._db.execute("PRAGMA temp_store = DEFAULT")
            except sqlite3.DatabaseError:
                pass
        self._rebuild_failing = False
        return True

    def orphan_grants(self, keep: set[str] | frozenset[str]) -> set[str]:
        """Grants with a key or rows on disk that are not in ``keep`` (left by a crash mid-erasure)."""
        with self._lock:
            ids = {r[0] for r in self._db.execute("SELECT grant_id FROM grant_keys")}
            ids |= {r[0] for r in self._db.execute("SELECT DISTINCT grant_id FROM batches")}
        return ids - set(keep)

    def checkpoint(self, *, wait_s: float = 0.0) -> bool:
        """Copy the WAL into the main file and truncate it. With ``wait_s``, retry while a reader (e.g. a
        concurrent `vgw status`) holds an old snapshot, so erased pages are overwritten everywhere before an
        erasure receipt says so. True when the checkpoint completed.

        Each attempt runs with SQLite's busy timeout off: a TRUNCATE checkpoint would otherwise wait the whole
        connection timeout for a reader, holding up the caller (the agent's main loop) far beyond ``wait_s``.
        """
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                try:
                    self._db.execute("PRAGMA busy_timeout = 0")
                    busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                except sqlite3.DatabaseError:
                    busy = 1
                finally:
                    try:
                        self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                    except sqlite3.DatabaseError:
                        pass
            if not busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
