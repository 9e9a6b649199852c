"""The outbox's SQLite connection: opening, schema, migration and the one transaction helper.

:class:`Connection` is the base every part of :class:`~vgw.state.outbox.Outbox` builds on. Threads: the collector,
the uplink and the agent's main loop all call into one outbox; one re-entrant lock (``_lock``) guards the
connection and every in-memory cache of the parts, and every write runs in :meth:`Connection._tx` (``BEGIN
IMMEDIATE`` ... ``COMMIT``, rolled back on any error), so a failed write never leaves half a change behind.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vgw.base.errors import OutboxUnwritable, StorageError, StorageFault, StorageOpenError
from vgw.base.fsutil import create_private, refuse_symlink

BUSY_TIMEOUT_S = 10.0  # how long a statement waits for another process's lock
# 1: scopes per batch. 2: terms per batch and per active grant, meta (epoch). 3: acked per batch (replay window).
# 4: rate_marks (when each path of a grant last kept a sample under a max_hz limit); sent_log (what the broker
#    acknowledged, per grant, scope and consent version in force, for the privacy report's periods).
SCHEMA_VERSION = 4
# Stamp of rows stored before terms were recorded: judged by their scopes alone (see Outbox.apply_terms).
LEGACY_TERMS = "legacy"

def prepare_file(path: Path) -> None:
    """Create the outbox file 0600 before SQLite opens it (SQLite makes -wal/-shm with the main file's mode),
    never through a planted link; refuse a FIFO or device in its place (SQLite would block reading it) and a side
    file that is a link (docs/guarantees.md). Raises StorageError."""
    create_private(path, what="outbox")
    for suffix in ("-wal", "-shm", "-journal"):
        side = Path(str(path) + suffix)
        refuse_symlink(side)
        if side.exists() and side.stat().st_mode & 0o077:
            side.chmod(0o600)


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS active_grants (id TEXT PRIMARY KEY, terms TEXT NOT NULL DEFAULT '') WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS grant_keys (grant_id TEXT PRIMARY KEY, wrapped BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS seqs (grant_id TEXT PRIMARY KEY, next_seq INTEGER NOT NULL) WITHOUT ROWID",
    """CREATE TABLE IF NOT EXISTS batches (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        grant_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        created REAL NOT NULL,
        first_t REAL NOT NULL,
        samples INTEGER NOT NULL,
        blob BLOB NOT NULL,
        scopes TEXT NOT NULL DEFAULT '{}',
        terms TEXT NOT NULL DEFAULT '',
        acked REAL,
        UNIQUE (grant_id, seq)
    )""",
    "CREATE INDEX IF NOT EXISTS batches_grant ON batches (grant_id, id)",
    "CREATE TABLE IF NOT EXISTS receipts (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, "
    "token TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS rate_marks (grant_id TEXT NOT NULL, path TEXT NOT NULL, t REAL NOT NULL, "
    "min_interval REAL NOT NULL, scope TEXT NOT NULL DEFAULT '', PRIMARY KEY (grant_id, path)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS sent_log (grant_id TEXT NOT NULL, scope TEXT NOT NULL, ver INTEGER NOT NULL, "
    "samples INTEGER NOT NULL, batches INTEGER NOT NULL, first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, "
    "PRIMARY KEY (grant_id, scope, ver)) WITHOUT ROWID",
)


def unwritable(path: Path, exc: sqlite3.Error) -> OutboxUnwritable:
    """Translate a failed write by SQLite's primary result code (its message text is for people only)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None  # extended codes keep the primary in the low byte
    if primary == sqlite3.SQLITE_FULL:
        fault = StorageFault.FULL
    elif primary == sqlite3.SQLITE_READONLY:
        fault = StorageFault.READ_ONLY
    else:
        fault = StorageFault.IO
    return OutboxUnwritable(f"{path}: outbox cannot store ({fault}): {exc}", fault)


class Connection:
    """One SQLite connection to the outbox file, opened for writing (``vgw run``, ``vgw consent apply``).

    Raises :class:`~vgw.base.errors.StorageOpenError` when the file cannot be opened, created or migrated.
    """

    def __init__(self, path: Path, storage_key: bytes, device: str) -> None:
        self.path = path
        self.device = device
        self._storage_key = storage_key
        self._lock = threading.RLock()
        self._data_keys: dict[str, bytes] = {}  # grant id -> unwrapped data key (dropped on erasure and close)
        # Created 0600 before SQLite opens it (SQLite makes -wal/-shm with the main file's mode), never through a
        # planted link; an existing side file that is a link is refused too (docs/guarantees.md).
        prepare_file(path)
        try:
            self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA foreign_keys=ON")
            epoch = self._ready()
            if epoch is None:  # a new file, or one an earlier version wrote: one transaction sets it up
                with self._tx() as db:
                    for statement in _SCHEMA:
                        db.execute(statement)
                    self._migrate(db)
                    epoch = self._epoch(db)
            self.epoch = epoch
        except sqlite3.DatabaseError as exc:
            raise StorageOpenError(f"{path}: cannot open outbox: {exc}") from exc
        except StorageError as exc:
            raise StorageOpenError(f"{path}: cannot open outbox: {exc.__cause__ or exc}") from exc.__cause__

    def _ready(self) -> str | None:
        """The epoch of an outbox already at :data:`SCHEMA_VERSION`, else None (reads only: an outbox on a
        read-only file system still opens)."""
        try:
            if int(self._db.execute("PRAGMA user_version").fetchone()[0]) < SCHEMA_VERSION:
                return None
            row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        except sqlite3.OperationalError:  # no such table: a file this version did not set up
            return None
        return None if row is None else str(row[0])

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring an outbox written by an earlier version to :data:`SCHEMA_VERSION` (inside the opening
        transaction)."""
        if int(db.execute("PRAGMA user_version").fetchone()[0]) >= SCHEMA_VERSION:
            return
        batch_cols = {r[1] for r in db.execute("PRAGMA table_info(batches)")}
        if "scopes" not in batch_cols:
            db.execute("ALTER TABLE batches ADD COLUMN scopes TEXT NOT NULL DEFAULT '{}'")
        if "terms" not in batch_cols:
            # Rows stored before terms were recorded: not publishable until judged against the consent
            # in force (apply_terms, at start) by the scopes they hold; rows without scopes are dropped.
            db.execute("ALTER TABLE batches ADD COLUMN terms TEXT NOT NULL DEFAULT ''")
            db.execute("UPDATE batches SET terms = ?", (LEGACY_TERMS,))
        if "acked" not in batch_cols:  # NULL: waiting for its PUBACK (README "Replay after failover")
            db.execute("ALTER TABLE batches ADD COLUMN acked REAL")
        if "terms" not in {r[1] for r in db.execute("PRAGMA table_info(active_grants)")}:
            db.execute("ALTER TABLE active_grants ADD COLUMN terms TEXT NOT NULL DEFAULT ''")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def _epoch(db: sqlite3.Connection) -> str:
        """The outbox epoch (README "Telemetry envelope"): made once, with the outbox, and kept for its whole life."""
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (secrets.token_hex(8),))
        return str(db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0])

    # -- transactions -------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run the block in one write transaction; any SQLite failure (SQLITE_FULL,
        SQLITE_READONLY, SQLITE_IOERR) rolls it back and raises :class:`~vgw.base.errors.OutboxUnwritable`."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise unwritable(self.path, exc) from exc
            try:
                yield self._db
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.DatabaseError):
                    # The caller must see a StorageError, not a raw sqlite3 error that would kill its thread.
                    raise unwritable(self.path, exc) from exc
                raise
            else:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.DatabaseError as exc:
                    self._rollback()
                    raise unwritable(self.path, exc) from exc

    def _rollback(self) -> None:
        # A data key replaced inside the transaction is rolled back on disk: the cache must not keep it, or rows
        # still sealed under the old key would no longer open (unwrapped again from disk when next needed).
        self._data_keys.clear()
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL) or the file is gone

    def _count_locked(self, name: str, n: int) -> None:
        """Add ``n`` to counter ``name``; only inside :meth:`_tx`."""
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, n, n),
        )

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every other use of the outbox (erasures included) while the caller reads and acts."""
        with self._lock:
            yield

    def integrity_ok(self) -> bool:
        with self._lock:
            row = self._db.execute("PRAGMA integrity_check").fetchone()
        return bool(row and row[0] == "ok")

    def close(self) -> None:
        with self._lock:
            self._data_keys.clear()
            try:
                self._db.close()
            except sqlite3.Error:
                pass
