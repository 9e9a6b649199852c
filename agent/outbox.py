"""The encrypted store-and-forward outbox: one SQLite file in the state directory.

Tables:
  active_grants  grants allowed to store data now; inserts and key creation check it in the same
                 transaction, so a grant revoked by another process (``vgw consent apply``) can never
                 store again even before this process notices.
  grant_keys     per-grant AES-256-GCM data key, wrapped by the device storage key.
  seqs           next ``seq`` per grant; assigned at commit, so sequences survive crashes with no gap/reuse.
  batches        sealed envelopes, each encrypted again with its grant's data key (aad binds device/grant/seq).
  receipts       signed receipts waiting for the broker (no personal data, not encrypted).
  counters       named counters (drops, retention deletes) for status and the privacy report.

``secure_delete`` overwrites deleted content; after an erasure the WAL is checkpointed and truncated so no
page of a revoked grant survives in the -wal file either. ``synchronous=FULL`` makes a commit survive power
loss.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.crypto import keys
from agent.errors import StorageError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS active_grants (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grant_keys (grant_id TEXT PRIMARY KEY, wrapped BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seqs (grant_id TEXT PRIMARY KEY, next_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    grant_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created REAL NOT NULL,
    first_t REAL NOT NULL,
    samples INTEGER NOT NULL,
    blob BLOB NOT NULL,
    UNIQUE (grant_id, seq)
);
CREATE INDEX IF NOT EXISTS batches_grant ON batches (grant_id, id);
CREATE TABLE IF NOT EXISTS receipts (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, token TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    grant_id: str
    seq: int
    payload: bytes  # the decrypted envelope, ready to publish


@dataclass(frozen=True, slots=True)
class Erasure:
    grant_id: str
    batches_deleted: int
    key_destroyed: bool


class GrantNotActive(StorageError):
    """A batch or key was refused because its grant is not active (revoked meanwhile)."""


class Outbox:
    """Thread-safe access to the outbox database. Raises StorageError on I/O trouble."""

    def __init__(self, path: Path, storage_key: bytes, device: str) -> None:
        self.path = path
        self.device = device
        self._storage_key = storage_key
        self._lock = threading.RLock()
        self._data_keys: dict[str, bytes] = {}
        try:
            self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"{path}: cannot open outbox: {exc}") from exc
        try:
            path.chmod(0o600)
        except OSError:
            pass

    # -- transactions -------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StorageError(f"{self.path}: outbox busy or unwritable: {exc}") from exc
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.DatabaseError as exc:
                    self._db.execute("ROLLBACK")
                    raise StorageError(f"{self.path}: commit failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._data_keys.clear()
            try:
                self._db.close()
            except sqlite3.Error:
                pass

    # -- grants and keys ----------------------------------------------------------------------------

    def set_active_grants(self, grant_ids: set[str] | frozenset[str]) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM active_grants")
            db.executemany("INSERT INTO active_grants (id) VALUES (?)", [(g,) for g in sorted(grant_ids)])

    def active_grants(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM active_grants")}

    def _data_key(self, db: sqlite3.Connection, grant_id: str) -> bytes:
        cached = self._data_keys.get(grant_id)
        if cached is not None:
            return cached
        row = db.execute("SELECT wrapped FROM grant_keys WHERE grant_id = ?", (grant_id,)).fetchone()
        if row is None:
            key = keys.new_data_key()
            db.execute("INSERT INTO grant_keys (grant_id, wrapped) VALUES (?, ?)",
                       (grant_id, keys.wrap(self._storage_key, key)))
        else:
            key = keys.unwrap(self._storage_key, row[0])
        self._data_keys[grant_id] = key
        return key

    def has_key(self, grant_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM grant_keys WHERE grant_id = ?", (grant_id,)).fetchone() is not None

    # -- batches ------------------------------------------------------------------------------------

    def _aad(self, grant_id: str, seq: int) -> bytes:
        return f"vgw-outbox/1 {self.device}/{grant_id}/{seq}".encode()

    def next_seq(self, grant_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT next_seq FROM seqs WHERE grant_id = ?", (grant_id,)).fetchone()
            return int(row[0]) if row else 1

    def commit_batch(self, grant_id: str, make_payload: Callable[[int], bytes], first_t: float, samples: int) -> tuple[int, int]:
        """Assign the next seq, seal the batch with it (``make_payload(seq) -> envelope``) and store it.

        All in one transaction: the seq is persisted with the row. Returns (seq, stored bytes). Raises
        GrantNotActive if the grant was revoked meanwhile, StorageError on I/O failure.
        """
        with self._tx() as db:
            if db.execute("SELECT 1 FROM active_grants WHERE id = ?", (grant_id,)).fetchone() is None:
                raise GrantNotActive(f"grant {grant_id!r} is not active; batch discarded")
            row = db.execute("SELECT next_seq FROM seqs WHERE grant_id = ?", (grant_id,)).fetchone()
            seq = int(row[0]) if row else 1
            payload = make_payload(seq)
            blob = keys.seal_row(self._data_key(db, grant_id), payload, self._aad(grant_id, seq))
            db.execute(
                "INSERT INTO batches (grant_id, seq, created, first_t, samples, blob) VALUES (?, ?, ?, ?, ?, ?)",
                (grant_id, seq, time.time(), first_t, samples, blob),
            )
            db.execute(
                "INSERT INTO seqs (grant_id, next_seq) VALUES (?, ?) "
                "ON CONFLICT(grant_id) DO UPDATE SET next_seq = excluded.next_seq",
                (grant_id, seq + 1),
            )
            return seq, len(blob)

    def pending(self, limit: int, exclude: set[int] | None = None) -> list[Row]:
        """The oldest batches not in ``exclude`` (row ids in flight), decrypted for publishing."""
        exclude = exclude or set()
        out: list[Row] = []
        with self._lock:
            cur = self._db.execute("SELECT id, grant_id, seq, blob FROM batches ORDER BY id LIMIT ?",
                                   (limit + len(exclude),))
            for row_id, grant_id, seq, blob in cur.fetchall():
                if row_id in exclude:
                    continue
                key = self._data_keys.get(grant_id)
                if key is None:
                    krow = self._db.execute("SELECT wrapped FROM grant_keys WHERE grant_id = ?",
                                            (grant_id,)).fetchone()
                    if krow is None:
                        continue  # key destroyed: the row is unreadable and is being erased
                    key = keys.unwrap(self._storage_key, krow[0])
                    self._data_keys[grant_id] = key
                try:
                    payload = keys.open_row(key, blob, self._aad(grant_id, seq))
                except Exception:
                    self._count_locked("undecryptable_rows", 1)
                    self._db.execute("DELETE FROM batches WHERE id = ?", (row_id,))
                    continue
                out.append(Row(row_id, grant_id, seq, payload))
                if len(out) >= limit:
                    break
        return out

    def delete_batch(self, row_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM batches WHERE id = ?", (row_id,))

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT grant_id, COUNT(*), COALESCE(SUM(LENGTH(blob)), 0) FROM batches GROUP BY grant_id"
            ).fetchall()
        return {g: {"rows": int(n), "bytes": int(b)} for g, n, b in rows}

    def total_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(LENGTH(blob)), 0) FROM batches").fetchone()[0])

    # -- erasure ------------------------------------------------------------------------------------

    def erase_grant(self, grant_id: str) -> Erasure:
        """Destroy the grant's data key, then delete its rows; checkpoint so nothing survives in the WAL.

        The key goes first and in its own transaction: from that commit on, every row of the grant is
        unreadable, even if the process dies before the rows are gone.
        """
        with self._lock:
            self._data_keys.pop(grant_id, None)
            with self._tx() as db:
                db.execute("DELETE FROM active_grants WHERE id = ?", (grant_id,))
                key_existed = db.execute("DELETE FROM grant_keys WHERE grant_id = ?", (grant_id,)).rowcount > 0
            with self._tx() as db:
                deleted = db.execute("DELETE FROM batches WHERE grant_id = ?", (grant_id,)).rowcount
            self.checkpoint()
        return Erasure(grant_id=grant_id, batches_deleted=int(deleted), key_destroyed=True if key_existed or
                       not self.has_key(grant_id) else False)

    def orphan_grants(self, keep: set[str] | frozenset[str]) -> set[str]:
        """Grants with a key or rows on disk that are not in ``keep`` (left by a crash mid-erasure)."""
        with self._lock:
            ids = {r[0] for r in self._db.execute("SELECT grant_id FROM grant_keys")}
            ids |= {r[0] for r in self._db.execute("SELECT DISTINCT grant_id FROM batches")}
        return ids - set(keep)

    def checkpoint(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError:
                pass

    # -- retention and quota ------------------------------------------------------------------------

    def delete_older_than(self, grant_id: str, created_before: float) -> int:
        with self._tx() as db:
            n = db.execute("DELETE FROM batches WHERE grant_id = ? AND created < ?",
                           (grant_id, created_before)).rowcount
        return int(n)

    def drop_oldest(self, grant_id: str, count: int = 1) -> int:
        with self._tx() as db:
            n = db.execute(
                "DELETE FROM batches WHERE id IN (SELECT id FROM batches WHERE grant_id = ? ORDER BY id LIMIT ?)",
                (grant_id, count),
            ).rowcount
        return int(n)

    # -- receipts -----------------------------------------------------------------------------------

    def queue_receipt(self, token: str) -> int:
        with self._tx() as db:
            cur = db.execute("INSERT INTO receipts (created, token) VALUES (?, ?)", (time.time(), token))
            return int(cur.lastrowid or 0)

    def pending_receipts(self, limit: int, exclude: set[int] | None = None) -> list[tuple[int, str]]:
        exclude = exclude or set()
        with self._lock:
            rows = self._db.execute("SELECT id, token FROM receipts ORDER BY id LIMIT ?",
                                    (limit + len(exclude),)).fetchall()
        return [(int(i), str(t)) for i, t in rows if i not in exclude][:limit]

    def delete_receipt(self, receipt_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM receipts WHERE id = ?", (receipt_id,))

    def receipt_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])

    # -- counters -----------------------------------------------------------------------------------

    def _count_locked(self, name: str, n: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, n, n),
        )

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._count_locked(name, n)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {str(k): int(v) for k, v in self._db.execute("SELECT name, value FROM counters")}

    def integrity_ok(self) -> bool:
        with self._lock:
            row = self._db.execute("PRAGMA integrity_check").fetchone()
        return bool(row and row[0] == "ok")

