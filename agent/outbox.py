"""The encrypted store-and-forward outbox: one SQLite file in the state directory.

Tables:
  meta           ``epoch``: a random string made when the outbox is created, carried in every batch
                 (CONTRACT §6) so a receiver tells a wiped or re-provisioned device (seq 1 again) from a
                 re-delivery; ``user_version`` (a PRAGMA) is the schema version, see :data:`SCHEMA_VERSION`.
  active_grants  grants allowed to store data now, each with the digest of its terms in force
                 (:func:`vgw.consent.narrowing.terms_digest`); inserts and key creation check it in the
                 same transaction, so a grant revoked by another process (``vgw consent apply``) can never
                 store again even before this process notices.
  grant_keys     per-grant AES-256-GCM data key, wrapped by the device storage key.
  seqs           next ``seq`` per grant; assigned at commit, so sequences survive crashes with no gap/reuse.
  batches        sealed envelopes, each encrypted again with its grant's data key (aad binds device/grant/seq);
                 ``scopes`` = {scope: samples} it holds (no values), ``terms`` = the digest of the terms its
                 samples were collected under. The agent cannot re-filter a sealed row, so these two decide
                 whether a narrowed grant still permits it (README "Narrowing applies to stored data").
  receipts       signed receipts waiting for the broker (no personal data, not encrypted).
  counters       named counters (drops, retention deletes, what was sent) for status and the privacy report.
                 Most add up; ``first_sent:<g>`` / ``last_sent:<g>`` (Unix seconds) are kept with a MIN / MAX
                 upsert instead (see :meth:`Outbox.mark_sent`), so one table serves the report.

Durability (the fault-injection suite in ``tests/test_faults_*.py`` checks each point): a batch counts as
collected only once its transaction commits; its ``seq`` is assigned in that transaction, so a crash loses at
most the batch not yet committed and never reuses or skips a seq. On start :func:`open_checked` runs
``PRAGMA integrity_check``; a corrupt file is quarantined: its ``seqs`` are salvaged if still readable, then the
file and its -wal/-shm are overwritten and deleted (a corrupt copy would keep revoked grants' wrapped keys and
rows beyond any erasure, docs/guarantees.md), and a fresh file takes its place.

Quota: :meth:`Outbox.commit_batch` with ``quota_bytes`` drops, in the same transaction, the oldest batches of
the committing grant until the outbox fits (then, if one grant's new batch alone does not fit beside the
others, the oldest of the largest grant). A batch already handed to the broker whose PUBACK has not come is
never dropped for quota (it may have arrived: dropping it would make the ``dropped_quota`` count lie).

Narrowing (CONTRACT §6): no sample of a scope not in force at publish time leaves the car. Three checks:
:meth:`Outbox.apply_terms` replaces the terms in force and deletes the withdrawn rows in one transaction
(under the lock the uplink holds from reading a row to handing it to the socket, so no withdrawn row can be
published in between); :meth:`Outbox.commit_batch` refuses a batch collected under other terms than those in
force; :meth:`Outbox.pending` only returns rows whose terms digest is the one in force.

``secure_delete`` overwrites deleted content; after an erasure the WAL is checkpointed and truncated so no
page of a revoked grant survives in the -wal file either, and the raw bytes of the files are searched for the
grant's wrapped key and rows: only when none is found is the key reported destroyed (:meth:`Outbox.erase_grant`).
The file is created 0600 before SQLite opens it (SQLite gives -wal/-shm the mode of the main file) and is never
opened through a symlink. ``synchronous=FULL`` makes a commit survive power
loss.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vgw.consent.narrowing import Narrowing, NarrowingKind
from vgw.crypto import keys
from vgw.errors import StorageError
from vgw.fsutil import create_private, destroy_file, refuse_symlink

log = logging.getLogger("vgw.outbox")

BUSY_TIMEOUT_S = 10.0  # how long a statement waits for another process's lock
# How long an erasure retries its checkpoint before it reports "not verified yet" (the agent's main loop
# then retries every few seconds; see Outbox.erase_grant).
ERASE_WAIT_S = 2.0

# 1: scopes per batch. 2: terms per batch and per active grant, meta (epoch).
SCHEMA_VERSION = 2
# Stamp of rows stored before terms were recorded: judged by their scopes alone (see apply_terms).
LEGACY_TERMS = "legacy"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS active_grants (id TEXT PRIMARY KEY, terms TEXT NOT NULL DEFAULT '') WITHOUT ROWID;
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
    scopes TEXT NOT NULL DEFAULT '{}',
    terms TEXT NOT NULL DEFAULT '',
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
    samples: int = 0
    scopes: str = "{}"  # JSON {scope: samples} of this batch, for the privacy report (no values)


@dataclass(frozen=True, slots=True)
class Committed:
    seq: int
    size: int  # stored bytes of the new row
    dropped: dict[str, int]  # grant id -> batches dropped for the quota by this commit


@dataclass(frozen=True, slots=True)
class GrantTerms:
    """A grant's terms as the outbox needs them: digest, scopes, and what changed since ``since``."""

    digest: str  # terms_digest() of the grant in force
    scopes: frozenset[str]
    narrowing: Narrowing = field(default_factory=Narrowing)
    since: str | None = None  # digest of the terms ``narrowing`` was computed against (None: unknown)


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """Stored batches of a grant still in force deleted because its terms narrowed (or could not be told)."""

    grant_id: str
    kinds: frozenset[NarrowingKind]
    scopes: frozenset[str]
    batches_deleted: int
    samples_deleted: int  # every sample of the deleted rows, still-permitted ones of mixed rows included
    key_destroyed: bool  # the data key that sealed the deleted rows is gone (kept rows were sealed anew)


@dataclass(frozen=True, slots=True)
class Erasure:
    grant_id: str
    batches_deleted: int
    key_destroyed: bool


@dataclass(frozen=True)
class NewBatch:
    """One batch for :meth:`Outbox.commit_batches` (the arguments of :meth:`Outbox.commit_batch`)."""

    grant_id: str
    make_payload: Callable[[int], bytes]
    first_t: float
    samples: int
    scopes: dict[str, int] | None = None
    terms: str | None = None


class GrantNotActive(StorageError):
    """A batch or key was refused because its grant is not active (revoked meanwhile)."""


class TermsChanged(GrantNotActive):
    """A batch was refused because it was collected under terms that are no longer in force."""


class OutboxUnwritable(StorageError):
    """The outbox cannot store now: ``kind`` is ``full`` (disk or page limit), ``read-only`` or ``io``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _unwritable(path: Path, exc: sqlite3.Error) -> OutboxUnwritable:
    text = str(exc).lower()
    if "full" in text:
        kind = "full"
    elif "readonly" in text or "read-only" in text or "read only" in text:
        kind = "read-only"
    else:
        kind = "io"
    return OutboxUnwritable(f"{path}: outbox cannot store ({kind}): {exc}", kind)


def integrity_problem(path: Path) -> str | None:
    """None if ``path`` is absent or passes ``PRAGMA integrity_check``, else a one-line reason."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    if rows and rows[0][0] == "ok":
        return None
    return "; ".join(str(r[0]) for r in rows[:3]) or "integrity_check returned nothing"


QUARANTINE_MARK = ".corrupt-"


def quarantine(path: Path) -> tuple[Path, dict[str, int]]:
    """Take a corrupt outbox (and its -wal/-shm) out of use; salvage its seqs, then destroy it.

    Returns (the name it was moved to before being destroyed, {grant: next_seq} read from it, empty if
    unreadable). The salvaged seqs keep ``seq`` rising for the cloud (CONTRACT §6): a fresh file alone would
    restart at 1 and the receiver would drop the new batches as re-deliveries. Nothing else is kept: a copy
    would hold wrapped keys and rows of grants that a later revocation could no longer reach (CONTRACT §7).
    The move comes first, so a crash mid-way leaves a ``.corrupt-`` file that the next start destroys.
    """
    seqs: dict[str, int] = {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            seqs = {str(g): int(n) for g, n in db.execute("SELECT grant_id, next_seq FROM seqs")}
        finally:
            db.close()
    except (sqlite3.DatabaseError, ValueError, TypeError):
        seqs = {}
    target = path.with_name(f"{path.name}{QUARANTINE_MARK}{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            src.replace(Path(str(target) + suffix))
    destroy_quarantined(path)
    return target, seqs


def destroy_quarantined(path: Path) -> list[str]:
    """Overwrite and delete every quarantined copy of the outbox at ``path`` (left by a crash mid-quarantine
    or by an earlier version that kept them). Returns the names destroyed."""
    gone = []
    for p in sorted(path.parent.glob(f"{path.name}{QUARANTINE_MARK}*")):
        if destroy_file(p):
            gone.append(p.name)
    return gone


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


class Outbox:
    """Thread-safe access to the outbox database. Raises StorageError on I/O trouble."""

    def __init__(self, path: Path, storage_key: bytes, device: str) -> None:
        self.path = path
        self.device = device
        self._storage_key = storage_key
        self._lock = threading.RLock()
        self._data_keys: dict[str, bytes] = {}
        self._unwrappable: set[str] = set()  # grants whose key does not unwrap (storage key replaced?)
        # Rows handed to the broker whose PUBACK has not come (maybe delivered): never dropped for quota.
        self.attempted: set[int] = set()
        self._needles: dict[str, list[bytes]] = {}  # erased grants not yet verified gone: what to search for
        # Created 0600 before SQLite opens it (SQLite makes -wal/-shm with the main file's mode), never through a
        # planted link; an existing side file that is a link is refused too (docs/guarantees.md).
        create_private(path)
        for suffix in ("-wal", "-shm", "-journal"):
            side = Path(str(path) + suffix)
            refuse_symlink(side)
            if side.exists() and side.stat().st_mode & 0o077:
                side.chmod(0o600)
        try:
            self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._migrate()
            self.epoch = self._epoch()
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"{path}: cannot open outbox: {exc}") from exc

    def _migrate(self) -> None:
        """Bring an outbox written by an earlier version to :data:`SCHEMA_VERSION`, in one transaction."""
        if int(self._db.execute("PRAGMA user_version").fetchone()[0]) >= SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            batch_cols = {r[1] for r in self._db.execute("PRAGMA table_info(batches)")}
            if "scopes" not in batch_cols:
                self._db.execute("ALTER TABLE batches ADD COLUMN scopes TEXT NOT NULL DEFAULT '{}'")
            if "terms" not in batch_cols:
                # Rows stored before terms were recorded: not publishable until judged against the consent
                # in force (apply_terms, at start) by the scopes they hold; rows without scopes are dropped.
                self._db.execute("ALTER TABLE batches ADD COLUMN terms TEXT NOT NULL DEFAULT ''")
                self._db.execute("UPDATE batches SET terms = ?", (LEGACY_TERMS,))
            if "terms" not in {r[1] for r in self._db.execute("PRAGMA table_info(active_grants)")}:
                self._db.execute("ALTER TABLE active_grants ADD COLUMN terms TEXT NOT NULL DEFAULT ''")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            self._rollback()
            raise
        self._db.execute("COMMIT")

    def _epoch(self) -> str:
        """The outbox epoch (CONTRACT §6): made once, with the outbox, and kept for its whole life."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is not None:
            return str(row[0])
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (secrets.token_hex(8),))
        return str(self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0])

    # -- transactions -------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise _unwritable(self.path, exc) from exc
            try:
                yield self._db
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.DatabaseError):
                    # SQLITE_FULL / SQLITE_READONLY / SQLITE_IOERR inside the transaction: the caller must
                    # see a StorageError, not a raw sqlite3 error that would kill its thread.
                    raise _unwritable(self.path, exc) from exc
                raise
            else:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.DatabaseError as exc:
                    self._rollback()
                    raise _unwritable(self.path, exc) from exc

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL) or the file is gone

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every other use of the outbox (erasures included) while the caller reads and acts."""
        with self._lock:
            yield

    def close(self) -> None:
        with self._lock:
            self._data_keys.clear()
            try:
                self._db.close()
            except sqlite3.Error:
                pass

    # -- grants and keys ----------------------------------------------------------------------------

    def set_active_grants(self, grant_ids: set[str] | frozenset[str]) -> None:
        """Only ``grant_ids`` may store from now on; a grant that stays keeps its terms (see apply_terms)."""
        with self._tx() as db:
            keep = sorted(grant_ids)
            db.execute(f"DELETE FROM active_grants WHERE id NOT IN ({','.join('?' * len(keep))})",  # noqa: S608
                       keep)
            db.executemany("INSERT OR IGNORE INTO active_grants (id) VALUES (?)", [(g,) for g in keep])

    def apply_terms(self, grants: dict[str, GrantTerms], *, now: float | None = None) -> list[Withdrawal]:
        """Make ``grants`` the grants in force, with their terms, and delete what they withdraw (CONTRACT §6).

        One transaction, under the lock the uplink holds while it publishes: before it, rows are published
        under the old terms; after it, every row left is permitted by the new ones. For each grant, a row
        stamped with other terms than ``digest`` is deleted if it holds a scope the grant no longer has (or
        scopes it does not record), or, when stamped ``since``, a scope the narrowing withdraws, every scope
        when it withdraws all, or it is older than a shortened retention; a row stamped with terms that are
        neither ``since`` nor legacy is deleted (fail closed). Rows kept are stamped ``digest``. When a grant
        narrowed, its data key is replaced and the kept rows sealed anew, so the deleted rows' key is gone.
        Grants absent from ``grants`` stop storing (their erasure is :meth:`erase_grant`).
        Returns one :class:`Withdrawal` per grant that narrowed or lost rows.
        """
        now = time.time() if now is None else now
        out: list[Withdrawal] = []
        with self._tx() as db:
            ids = sorted(grants)
            db.execute(f"DELETE FROM active_grants WHERE id NOT IN ({','.join('?' * len(ids))})",  # noqa: S608
                       ids)
            db.executemany("INSERT INTO active_grants (id, terms) VALUES (?, ?) "
                           "ON CONFLICT(id) DO UPDATE SET terms = excluded.terms",
                           [(g, grants[g].digest) for g in ids])
            for gid in ids:
                w = self._judge_rows(db, gid, grants[gid], now)
                if w is not None:
                    out.append(w)
        return out

    def _judge_rows(self, db: sqlite3.Connection, gid: str, terms: GrantTerms, now: float) -> Withdrawal | None:
        n = terms.narrowing
        rows = db.execute("SELECT id, terms, scopes, samples, created FROM batches WHERE grant_id = ? "
                          "AND terms != ?", (gid, terms.digest)).fetchall()
        deleted: list[int] = []
        kept: list[int] = []
        samples_deleted = 0
        unknown = False
        for row_id, stamp, scopes_json, samples, created in rows:
            held = _held_scopes(str(scopes_json))
            known = terms.since is not None and stamp == terms.since
            if held is None or not held <= terms.scopes:
                withdraw = True  # a removed scope, or scopes not recorded: cannot be shown to be permitted
            elif known:
                withdraw = n.withdraw_all or bool(held & n.scopes) or (
                    n.retention_s is not None and created < now - n.retention_s)
            else:
                withdraw = stamp not in ("", LEGACY_TERMS)  # collected under terms nobody can name now
            if withdraw:
                deleted.append(int(row_id))
                samples_deleted += int(samples)
                unknown = unknown or not known
            else:
                kept.append(int(row_id))
        if not deleted and not n:
            if kept:
                db.executemany("UPDATE batches SET terms = ? WHERE id = ?", [(terms.digest, r) for r in kept])
            return None
        db.executemany("DELETE FROM batches WHERE id = ?", [(r,) for r in deleted])
        db.executemany("UPDATE batches SET terms = ? WHERE id = ?", [(terms.digest, r) for r in kept])
        key_destroyed = self._rotate_key(db, gid, terms.digest)
        self._count_locked(f"narrowed_batches:{gid}", len(deleted))
        self._count_locked(f"narrowed_samples:{gid}", samples_deleted)
        kinds = set(n.kinds) | ({NarrowingKind.TERMS_CHANGED} if unknown else set())
        return Withdrawal(gid, frozenset(kinds), n.scopes, len(deleted), samples_deleted, key_destroyed)

    def _rotate_key(self, db: sqlite3.Connection, gid: str, digest: str) -> bool:
        """Replace the grant's data key and seal its remaining rows with the new one. True if the old key is
        gone (or there was none); False if it cannot be unwrapped (the rows stay under it, unreadable)."""
        if db.execute("SELECT 1 FROM grant_keys WHERE grant_id = ?", (gid,)).fetchone() is None:
            return True
        try:
            old = self._data_key(db, gid)
        except StorageError:
            return False
        new = keys.new_data_key()
        for row_id, seq, blob in db.execute("SELECT id, seq, blob FROM batches WHERE grant_id = ?",
                                            (gid,)).fetchall():
            aad = self._aad(gid, int(seq))
            db.execute("UPDATE batches SET blob = ? WHERE id = ?",
                       (keys.seal_row(new, keys.open_row(old, blob, aad), aad), row_id))
        db.execute("UPDATE grant_keys SET wrapped = ? WHERE grant_id = ?", (keys.wrap(self._storage_key, new), gid))
        self._data_keys[gid] = new
        return True

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

    def commit_batch(self, grant_id: str, make_payload: Callable[[int], bytes], first_t: float, samples: int,
                     *, quota_bytes: int | None = None, scopes: dict[str, int] | None = None,
                     terms: str | None = None) -> Committed:
        """Assign the next seq, seal the batch with it (``make_payload(seq) -> envelope``) and store it.

        All in one transaction: the seq is persisted with the row, and with ``quota_bytes`` the batches dropped
        to fit are deleted and counted (``dropped_quota:<grant>``) in it too. Raises GrantNotActive if the grant
        was revoked meanwhile, OutboxUnwritable when the disk is full or read-only (nothing is stored then and
        no seq is used, so the cloud sees no gap for a batch that never existed).

        ``terms`` is the digest of the terms the samples were collected under; a batch collected under other
        terms than those in force (a narrowing landed while it was in memory) raises TermsChanged. None: the
        terms in force. ``scopes`` ({scope: samples}) is what a narrowing judges the row by.
        """
        with self._tx() as db:
            return self._commit_in(db, grant_id, make_payload, first_t, samples, quota_bytes, scopes, terms)

    def commit_batches(self, batches: Sequence[NewBatch], *, quota_bytes: int | None = None
                       ) -> list[Committed | Exception]:
        """:meth:`commit_batch` for several batches in one transaction (one fsync for all of them).

        Each batch is judged alone (a savepoint each): one whose grant is not active or whose terms changed
        gets its GrantNotActive/TermsChanged, one whose payload cannot be made gets that exception, and the
        others are stored. Returns one result per batch, in order. Raises OutboxUnwritable when the disk is
        full or read-only: then nothing of the group is stored and no seq is used.
        """
        results: list[Committed | Exception] = []
        with self._tx() as db:
            for b in batches:
                db.execute("SAVEPOINT one_batch")
                try:
                    results.append(self._commit_in(db, b.grant_id, b.make_payload, b.first_t, b.samples,
                                                   quota_bytes, b.scopes, b.terms))
                except sqlite3.DatabaseError:
                    raise  # the disk, not this batch: the whole group fails (OutboxUnwritable)
                except Exception as exc:
                    db.execute("ROLLBACK TO one_batch")
                    results.append(exc)
                db.execute("RELEASE one_batch")
        return results

    def _commit_in(self, db: sqlite3.Connection, grant_id: str, make_payload: Callable[[int], bytes],
                   first_t: float, samples: int, quota_bytes: int | None, scopes: dict[str, int] | None,
                   terms: str | None) -> Committed:
        active = db.execute("SELECT terms FROM active_grants WHERE id = ?", (grant_id,)).fetchone()
        if active is None:
            raise GrantNotActive(f"grant {grant_id!r} is not active; batch discarded")
        if terms is not None and terms != active[0]:
            raise TermsChanged(f"grant {grant_id!r} changed its terms; batch collected under the old ones "
                               "discarded")
        row = db.execute("SELECT next_seq FROM seqs WHERE grant_id = ?", (grant_id,)).fetchone()
        seq = int(row[0]) if row else 1
        payload = make_payload(seq)
        blob = keys.seal_row(self._data_key(db, grant_id), payload, self._aad(grant_id, seq))
        cur = db.execute(
            "INSERT INTO batches (grant_id, seq, created, first_t, samples, blob, scopes, terms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (grant_id, seq, time.time(), first_t, samples, blob, json.dumps(scopes or {}, sort_keys=True),
             str(active[0])),
        )
        db.execute(
            "INSERT INTO seqs (grant_id, next_seq) VALUES (?, ?) "
            "ON CONFLICT(grant_id) DO UPDATE SET next_seq = excluded.next_seq",
            (grant_id, seq + 1),
        )
        dropped: dict[str, int] = {}
        if quota_bytes is not None:
            dropped = self._fit_quota(db, grant_id, int(cur.lastrowid or 0), quota_bytes)
        return Committed(seq, len(blob), dropped)

    def _fit_quota(self, db: sqlite3.Connection, grant_id: str, new_row: int, quota: int) -> dict[str, int]:
        total = int(db.execute("SELECT COALESCE(SUM(LENGTH(blob)), 0) FROM batches").fetchone()[0])
        if total <= quota:
            return {}
        dropped: dict[str, int] = {}

        def drop_from(gid: str, keep: int | None) -> None:
            nonlocal total
            cur = db.execute("SELECT id, LENGTH(blob) FROM batches WHERE grant_id = ? ORDER BY id", (gid,))
            victims: list[int] = []
            for row_id, size in cur.fetchall():
                if total <= quota:
                    break
                if row_id == keep or row_id in self.attempted:
                    continue
                victims.append(row_id)
                total -= int(size)
            if victims:
                db.executemany("DELETE FROM batches WHERE id = ?", [(v,) for v in victims])
                dropped[gid] = dropped.get(gid, 0) + len(victims)

        # 1. The committing grant's own oldest batches (the rule: a grant pays for its own backlog).
        drop_from(grant_id, keep=new_row)
        # 2. Still over: its new batch does not fit beside the others; the largest grant gives way, oldest first
        #    (possibly the committing grant's new batch itself, when it is the largest).
        while total > quota:
            big = db.execute("SELECT grant_id FROM batches GROUP BY grant_id ORDER BY SUM(LENGTH(blob)) DESC "
                             "LIMIT 1").fetchone()
            if big is None:
                break
            before = total
            drop_from(str(big[0]), keep=None)
            if total == before:
                break  # only rows in flight left: wait for their PUBACKs
        for gid, n in dropped.items():
            self._count_locked(f"dropped_quota:{gid}", n)
        return dropped

    def pending(self, limit: int, exclude: set[int] | None = None) -> list[Row]:
        """The oldest batches not in ``exclude`` (row ids in flight), decrypted for publishing.

        Publish-time check (CONTRACT §6): only rows of a grant in force whose terms digest is the one in
        force; anything else waits for :meth:`apply_terms` or an erasure to delete it, and is never returned.
        """
        exclude = exclude or set()
        out: list[Row] = []
        with self._lock:
            skip = sorted(self._unwrappable)
            cur = self._db.execute(
                "SELECT b.id, b.grant_id, b.seq, b.samples, b.blob, b.scopes FROM batches b "  # noqa: S608 - only "?" placeholders are formatted in
                "JOIN active_grants a ON a.id = b.grant_id AND a.terms = b.terms "
                f"WHERE b.grant_id NOT IN ({','.join('?' * len(skip))}) ORDER BY b.id LIMIT ?",
                (*skip, limit + len(exclude)),
            )
            rows = cur.fetchall()
            for row_id, grant_id, seq, samples, blob, scopes in rows:
                if row_id in exclude:
                    continue
                key = self._data_keys.get(grant_id)
                if key is None:
                    krow = self._db.execute("SELECT wrapped FROM grant_keys WHERE grant_id = ?",
                                            (grant_id,)).fetchone()
                    if krow is None:
                        continue  # key destroyed: the row is unreadable and is being erased
                    try:
                        key = keys.unwrap(self._storage_key, krow[0])
                    except StorageError as exc:
                        # Kept, not deleted (the right storage key may come back), but never blocks the rest.
                        self._unwrappable.add(grant_id)
                        log.error("outbox rows of grant %s cannot be read: %s", grant_id, exc)
                        continue
                    self._data_keys[grant_id] = key
                try:
                    payload = keys.open_row(key, blob, self._aad(grant_id, seq))
                except Exception:
                    try:
                        self._count_locked("undecryptable_rows", 1)
                        self._db.execute("DELETE FROM batches WHERE id = ?", (row_id,))
                    except sqlite3.DatabaseError:
                        pass  # unwritable now: the row is skipped again next time
                    continue
                out.append(Row(row_id, grant_id, seq, payload, int(samples), str(scopes)))
                if len(out) >= limit:
                    break
        return out

    def delete_batch(self, row_id: int) -> None:
        with self._lock:
            self.attempted.discard(row_id)
            try:
                self._db.execute("DELETE FROM batches WHERE id = ?", (row_id,))
            except sqlite3.DatabaseError as exc:
                raise _unwritable(self.path, exc) from exc

    def mark_sent(self, row: Row, when: float | None = None) -> None:
        """The broker acknowledged ``row``: delete it and record it for the privacy report, in one transaction.

        ``sent_batches:<g>`` += 1, ``sent_samples:<g>`` += row.samples, ``first_sent:<g>`` = MIN(t),
        ``last_sent:<g>`` = MAX(t) with t = ``when`` (Unix seconds, default now). If the row is gone already
        (erased or dropped while its PUBACK was on the way) it still counts: it did reach the broker.
        """
        self.mark_sent_many([row], when)

    def mark_sent_many(self, rows: Sequence[Row], when: float | None = None) -> None:
        """:meth:`mark_sent` for several acknowledged rows in one transaction (one fsync for all of them)."""
        t = int(when if when is not None else time.time())
        with self._lock:
            for row in rows:
                self.attempted.discard(row.id)
            with self._tx() as db:
                for row in rows:
                    g = row.grant_id
                    db.execute("DELETE FROM batches WHERE id = ?", (row.id,))
                    self._count_locked(f"sent_batches:{g}", 1)
                    self._count_locked(f"sent_samples:{g}", row.samples)
                    try:
                        per_scope = json.loads(row.scopes)
                    except ValueError:
                        per_scope = {}
                    for scope, n in sorted(per_scope.items()):
                        self._count_locked(f"sent_samples:{g}:{scope}", int(n))
                for g in sorted({row.grant_id for row in rows}):
                    db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                               "SET value = MIN(value, excluded.value)", (f"first_sent:{g}", t))
                    db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                               "SET value = MAX(value, excluded.value)", (f"last_sent:{g}", t))

    def seed_seqs(self, seqs: dict[str, int]) -> None:
        """Raise each grant's next seq to at least the given value (after a quarantine salvaged them)."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO seqs (grant_id, next_seq) VALUES (?, ?) "
                "ON CONFLICT(grant_id) DO UPDATE SET next_seq = MAX(next_seq, excluded.next_seq)",
                sorted(seqs.items()),
            )

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

    def erase_grant(self, grant_id: str, *, wait_s: float = ERASE_WAIT_S) -> Erasure:
        """Destroy the grant's data key, then delete its rows; then make sure no copy is left in any file.

        The key goes first and in its own transaction: from that commit on, every row of the grant is
        unreadable, even if the process dies before the rows are gone. Then the WAL is checkpointed (retried
        for up to ``wait_s`` while another process holds a read snapshot) and the raw bytes of the outbox, its
        -wal and any quarantined copy are searched for the wrapped key and the sealed rows. ``key_destroyed``
        is True only when that search finds nothing; otherwise the caller must not send an erasure receipt
        yet and finishes later with :meth:`finish_erasure` (CONTRACT §7).
        """
        with self._lock:
            self._data_keys.pop(grant_id, None)
            needles = [bytes(r[0]) for r in self._db.execute(
                "SELECT wrapped FROM grant_keys WHERE grant_id = ?", (grant_id,))]
            with self._tx() as db:
                db.execute("DELETE FROM active_grants WHERE id = ?", (grant_id,))
                db.execute("DELETE FROM grant_keys WHERE grant_id = ?", (grant_id,))
            # Only now, with the key gone: a 32-byte piece of each sealed row (nonce and ciphertext start)
            # identifies it in raw bytes (reading 100k rows must not delay the key's destruction).
            needles += [bytes(r[0]) for r in self._db.execute(
                "SELECT substr(blob, 1, 32) FROM batches WHERE grant_id = ?", (grant_id,))]
            with self._tx() as db:
                deleted = db.execute("DELETE FROM batches WHERE grant_id = ?", (grant_id,)).rowcount
            self._needles.setdefault(grant_id, []).extend(needles)
        gone = self.finish_erasure(grant_id, wait_s=wait_s)
        if not gone:
            log.warning("erasure of grant %s not verified: another process holds a read snapshot of the outbox, "
                        "so erased pages are still in its files; retried until they are gone", grant_id)
        return Erasure(grant_id=grant_id, batches_deleted=int(deleted), key_destroyed=gone)

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
                if self.checkpoint() and not _files_hold(
                        [self.path, Path(str(self.path) + "-wal")], self._needles.get(grant_id, [])):
                    self._needles.pop(grant_id, None)
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

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

    # -- retention and quota ------------------------------------------------------------------------

    def delete_older_than(self, grant_id: str, created_before: float) -> int:
        with self._tx() as db:
            n = db.execute("DELETE FROM batches WHERE grant_id = ? AND created < ?",
                           (grant_id, created_before)).rowcount
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
            try:
                self._db.execute("DELETE FROM receipts WHERE id = ?", (receipt_id,))
            except sqlite3.DatabaseError as exc:
                raise _unwritable(self.path, exc) from exc

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
            try:
                self._count_locked(name, n)
            except sqlite3.DatabaseError as exc:
                raise _unwritable(self.path, exc) from exc

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {str(k): int(v) for k, v in self._db.execute("SELECT name, value FROM counters")}

    def page_limit(self, pages: int | None) -> None:
        """Cap the file at ``pages`` pages (None: SQLite's default). A full disk in tests: SQLITE_FULL."""
        with self._lock:
            self._db.execute(f"PRAGMA max_page_count = {int(pages) if pages else 4294967294}")

    def read_only(self, on: bool) -> None:
        """Refuse every write on this connection (SQLITE_READONLY), as a read-only state dir would."""
        with self._lock:
            self._db.execute(f"PRAGMA query_only = {1 if on else 0}")

    def integrity_ok(self) -> bool:
        with self._lock:
            row = self._db.execute("PRAGMA integrity_check").fetchone()
        return bool(row and row[0] == "ok")



def _held_scopes(scopes_json: str) -> frozenset[str] | None:
    """The scopes a row records, or None if it records none it can vouch for (unknown paths included)."""
    try:
        held = json.loads(scopes_json)
    except ValueError:
        return None
    if not isinstance(held, dict) or not held or "" in held:
        return None
    return frozenset(str(s) for s in held)


@dataclass(frozen=True, slots=True)
class Quarantined:
    file: Path  # the name the corrupt outbox was quarantined under (then destroyed)
    reason: str  # what integrity_check said
    seqs_recovered: dict[str, int]


def open_checked(path: Path, storage_key: bytes, device: str) -> tuple[Outbox, Quarantined | None]:
    """Open the outbox for `vgw run`: integrity-check it first and quarantine a corrupt file.

    A corrupt outbox is never repaired in place (a half-readable row could be replayed or leak): its seqs are
    read, it is destroyed (see :func:`quarantine`), a fresh file is created and the seqs are carried over. The
    caller audits and logs the returned :class:`Quarantined`. Raises StorageError if even a fresh file cannot be opened.
    """
    for name in destroy_quarantined(path):
        log.warning("destroyed quarantined outbox copy %s (it may hold revoked grants' data)", name)
    problem = integrity_problem(path)
    if problem is None:
        try:
            return Outbox(path, storage_key, device), None
        except StorageError as exc:  # e.g. "file is not a database" only shows when the schema is read
            problem = str(exc.__cause__ or exc)
    problem = " ".join(problem.split())  # integrity_check answers span lines: one log line, one audit field
    target, seqs = quarantine(path)
    log.error("outbox %s failed its integrity check (%s): quarantined as %s and destroyed, starting a fresh "
              "outbox (%d seq(s) kept)", path, problem, target.name, len(seqs))
    outbox = Outbox(path, storage_key, device)
    if seqs:
        outbox.seed_seqs(seqs)
    return outbox, Quarantined(target, problem, seqs)
