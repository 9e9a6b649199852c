"""Batches in the outbox: the grants allowed to store, their data keys and terms, the sealed batches.

Tables: ``active_grants``, ``grant_keys``, ``seqs`` and ``batches`` (each described in :mod:`vgw.state.outbox`).

Quota: the eviction order of :meth:`Outbox.commit_batch` over ``quota_bytes`` is stated once, in :mod:`vgw.state.outbox`
("Quota"), and lives in ``_fit_quota`` below.

Replay window (README "Replay after failover"): with ``keep_s`` > 0, :meth:`Outbox.mark_sent` stamps an
acknowledged row ``acked`` instead of deleting it; it is no longer pending, but an uplink that fails over to
another node of the cluster re-publishes the rows acked within the window (:meth:`Outbox.replayable`), since
a node can acknowledge a message and then lose it. :meth:`Outbox.sweep_acked` deletes them once the window
has passed. They are ordinary rows to retention, narrowing and erasure.

Narrowing (README "Narrowing applies to stored data"): no sample of a scope not in force at publish time leaves the
car. Three checks:
:meth:`Outbox.apply_terms` replaces the terms in force and deletes the withdrawn rows in one transaction
(under the lock the uplink holds from reading a row to handing it to the socket, so no withdrawn row can be
published in between); :meth:`Outbox.commit_batch` refuses a batch collected under other terms than those in
force; :meth:`Outbox.pending` only returns rows whose terms digest is the one in force.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from vgw.base.errors import StorageError
from vgw.contract.consent.narrowing import Narrowing, NarrowingKind
from vgw.state import keys
from vgw.state.outbox.connection import LEGACY_TERMS
from vgw.state.outbox.erasure import ERASE_WAIT_S, Erasing
from vgw.state.outbox.receipt_queue import ReceiptQueue
from vgw.state.outbox.tallies import Tallies

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class NewBatch:
    """One batch for :meth:`Outbox.commit_batches` (the arguments of :meth:`Outbox.commit_batch`)."""

    grant_id: str
    make_payload: Callable[[int], bytes]
    first_t: float
    samples: int
    scopes: dict[str, int] | None = None
    terms: str | None = None
    marks: dict[str, tuple[float, float, str]] | None = None  # path -> (frame time, interval, scope)


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """Stored batches of a grant still in force deleted because its terms narrowed (or could not be told)."""

    grant_id: str
    kinds: frozenset[NarrowingKind]
    scopes: frozenset[str]
    batches_deleted: int
    samples_deleted: int  # every sample of the deleted rows, still-permitted ones of mixed rows included
    key_destroyed: bool  # the data key that sealed the deleted rows is gone (kept rows were sealed anew), and no
    #                      copy of it or of a deleted row is left in any file (the same check as erase_grant)
    pending: bool = False  # key replaced and rows deleted, but a copy is still in the files: finish_erasure later


class GrantNotActive(StorageError):
    """A batch or key was refused because its grant is not active (revoked meanwhile)."""


class TermsChanged(GrantNotActive):
    """A batch was refused because it was collected under terms that are no longer in force."""


class Outbox(Erasing, ReceiptQueue, Tallies):
    """The encrypted outbox: batches (here), receipts, counters and erasure (their own modules).

    Threads: the collector commits batches, the uplink reads, marks and deletes them, the agent's main loop
    applies consent, retention and erasures; one re-entrant lock (``_lock``, :mod:`vgw.state.outbox.connection`)
    guards the connection and the in-memory sets below, and every write is one :meth:`_tx` transaction.
    Raises :class:`~vgw.base.errors.StorageError` on I/O trouble.
    """

    def __init__(self, path: Path, storage_key: bytes, device: str) -> None:
        super().__init__(path, storage_key, device)
        self._unwrappable: set[str] = set()  # grants whose key does not unwrap (storage key replaced?)
        self._undecryptable: set[int] = set()  # rows found unreadable by pending(): dropped by drop_undecryptable
        # Rows handed to the broker whose PUBACK has not come (maybe delivered): never dropped for quota.
        self._attempted: set[int] = set()
        # Grants a consent document stopped in memory while its disk part waits (vgw.state.consent.pending): never
        # published or stored, whatever ``active_grants`` on disk still says.
        self._withheld: frozenset[str] = frozenset()

    # -- grants and keys ----------------------------------------------------------------------------

    def set_active_grants(self, grant_ids: set[str] | frozenset[str]) -> None:
        """Only ``grant_ids`` may store from now on; a grant that stays keeps its terms (see apply_terms)."""
        with self._tx() as db:
            keep = sorted(grant_ids)
            db.execute(f"DELETE FROM active_grants WHERE id NOT IN ({','.join('?' * len(keep))})",  # noqa: S608
                       keep)
            db.executemany("INSERT OR IGNORE INTO active_grants (id) VALUES (?)", [(g,) for g in keep])

    def withhold(self, grant_ids: frozenset[str]) -> None:
        """From now on no row of ``grant_ids`` is read for publishing or stored (memory only; replaces the set).
        Under the lock the uplink holds from reading a row to handing it to the socket."""
        with self._lock:
            self._withheld = frozenset(grant_ids)

    def apply_terms(self, grants: dict[str, GrantTerms], *, now: float | None = None, ver: int | None = None
                    ) -> list[Withdrawal]:
        """Make ``grants`` the grants in force, with their terms, and delete what they withdraw (README "Narrowing
        applies to stored data").

        One transaction, under the lock the uplink holds while it publishes: before it, rows are published
        under the old terms; after it, every row left is permitted by the new ones. For each grant, a row
        stamped with other terms than ``digest`` is deleted if it holds a scope the grant no longer has (or
        scopes it does not record), or, when stamped ``since``, a scope the narrowing withdraws, every scope
        when it withdraws all, or it is older than a shortened retention; a row stamped with terms that are
        neither ``since`` nor legacy is deleted (fail closed). Rows kept are stamped ``digest``. When a grant
        narrowed, its data key is replaced and the kept rows sealed anew, so the deleted rows' key is gone.
        Grants absent from ``grants`` stop storing (their erasure is :meth:`erase_grant`).
        Returns one :class:`Withdrawal` per grant that narrowed or lost rows. ``ver``: the consent version these
        terms come from; what the broker acknowledges from now on is logged under it (:meth:`mark_sent`).
        """
        now = time.time() if now is None else now
        out: list[Withdrawal] = []
        searched = {g: len(n) for g, n in self._needles.items()}
        with self._lock, self._forget_needles_on_rollback(searched), self._tx() as db:
            ids = sorted(grants)
            if ver is not None:
                db.execute("INSERT INTO meta (key, value) VALUES ('ver', ?) ON CONFLICT(key) DO UPDATE "
                           "SET value = excluded.value", (str(ver),))
            db.execute(f"DELETE FROM active_grants WHERE id NOT IN ({','.join('?' * len(ids))})",  # noqa: S608
                       ids)
            for gid in ids:
                # A scope withdrawn leaves no trace of when its paths last sent (README "Limits hold across updates").
                held = sorted(grants[gid].scopes)
                db.execute(f"DELETE FROM rate_marks WHERE grant_id = ? AND scope NOT IN "  # noqa: S608 - "?" only
                           f"({','.join('?' * len(held))})", [gid, *held])
            db.executemany("INSERT INTO active_grants (id, terms) VALUES (?, ?) "
                           "ON CONFLICT(id) DO UPDATE SET terms = excluded.terms",
                           [(g, grants[g].digest) for g in ids])
            for gid in ids:
                w = self._judge_rows(db, gid, grants[gid], now)
                if w is not None:
                    out.append(w)
        return [self._verify_withdrawal(w) for w in out]

    @contextmanager
    def _forget_needles_on_rollback(self, searched: dict[str, int]) -> Iterator[None]:
        """A transaction that rolled back replaced and deleted nothing: drop what it added to search for."""
        try:
            yield
        except BaseException:
            for gid in list(self._needles):
                del self._needles[gid][searched.get(gid, 0):]
            raise

    def _verify_withdrawal(self, w: Withdrawal) -> Withdrawal:
        """``w`` with ``key_destroyed`` only if the raw files hold neither the replaced wrapped key nor a deleted
        row (the check of :meth:`erase_grant`); otherwise pending, finished by :meth:`finish_erasure`."""
        if not w.key_destroyed or self.finish_erasure(w.grant_id, wait_s=ERASE_WAIT_S):
            return w
        log.warning("narrowing of grant %s not verified: another process holds a read snapshot of the outbox, or "
                    "the disk has no room to rebuild it, so replaced pages are still in its files; retried until "
                    "they are gone", w.grant_id)
        return replace(w, key_destroyed=False, pending=True)

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
        # The erasure's own deletion (vgw.state.outbox.erasure): the rows go, and what to search the raw files for once
        # committed (finish_erasure) is remembered: a piece of each deleted row and the wrapped key about to be
        # replaced. A rollback forgets them again (apply_terms).
        self._remember_key(db, gid)
        self._delete_rows(db, gid, row_ids=deleted)
        db.executemany("UPDATE batches SET terms = ? WHERE id = ?", [(terms.digest, r) for r in kept])
        key_destroyed = self._rotate_key(db, gid, terms.digest)
        self._count_locked(f"narrowed_batches:{gid}", len(deleted))
        self._count_locked(f"narrowed_samples:{gid}", samples_deleted)
        kinds = set(n.kinds) | ({NarrowingKind.TERMS_CHANGED} if unknown else set())
        return Withdrawal(gid, frozenset(kinds), n.scopes, len(deleted), samples_deleted, key_destroyed)

    def _rotate_key(self, db: sqlite3.Connection, gid: str, digest: str) -> bool:
        """Replace the grant's data key and seal its remaining rows with the new one; True: the old key is gone.

        A key that cannot be unwrapped (the storage key was replaced) sealed rows nobody can read or send: they
        are deleted with it (counted ``unreadable_deleted:<g>``), so an erasure receipt can say the key is
        destroyed (README "Receipts") rather than leave it in the file.
        """
        if db.execute("SELECT 1 FROM grant_keys WHERE grant_id = ?", (gid,)).fetchone() is None:
            return True
        try:
            old = self._data_key(db, gid)
        except StorageError:
            gone = db.execute("DELETE FROM batches WHERE grant_id = ?", (gid,)).rowcount
            db.execute("DELETE FROM grant_keys WHERE grant_id = ?", (gid,))
            self._data_keys.pop(gid, None)
            self._count_locked(f"unreadable_deleted:{gid}", int(gone))
            return True
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
                                                   quota_bytes, b.scopes, b.terms, b.marks))
                except sqlite3.DatabaseError:
                    raise  # the disk, not this batch: the whole group fails (OutboxUnwritable)
                except Exception as exc:
                    db.execute("ROLLBACK TO one_batch")
                    results.append(exc)
                db.execute("RELEASE one_batch")
        return results

    def _commit_in(self, db: sqlite3.Connection, grant_id: str, make_payload: Callable[[int], bytes],
                   first_t: float, samples: int, quota_bytes: int | None, scopes: dict[str, int] | None,
                   terms: str | None, marks: dict[str, tuple[float, float, str]] | None = None) -> Committed:
        active = db.execute("SELECT terms FROM active_grants WHERE id = ?", (grant_id,)).fetchone()
        if active is None or grant_id in self._withheld:
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
        if marks:
            # With the batch, in its transaction: a stored sample's mark is never lost to a restart, and a batch
            # that was not stored leaves no mark (README "Limits hold across updates").
            db.executemany("INSERT INTO rate_marks (grant_id, path, t, min_interval, scope) VALUES (?, ?, ?, ?, ?) "
                           "ON CONFLICT(grant_id, path) DO UPDATE SET t = excluded.t, "
                           "min_interval = excluded.min_interval, scope = excluded.scope",
                           [(grant_id, p, t, iv, scope) for p, (t, iv, scope) in sorted(marks.items())])
        dropped: dict[str, int] = {}
        if quota_bytes is not None:
            dropped = self._fit_quota(db, grant_id, int(cur.lastrowid or 0), quota_bytes)
        return Committed(seq, len(blob), dropped)

    def rate_marks(self) -> dict[str, dict[str, tuple[float, float]]]:
        """Per grant and path, the frame time of the last stored sample a max_hz limit judged, and its interval."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        with self._lock:
            for gid, path, t, iv in self._db.execute("SELECT grant_id, path, t, min_interval FROM rate_marks"):
                out.setdefault(str(gid), {})[str(path)] = (float(t), float(iv))
        return out

    def _fit_quota(self, db: sqlite3.Connection, grant_id: str, new_row: int, quota: int) -> dict[str, int]:
        total = int(db.execute("SELECT COALESCE(SUM(LENGTH(blob)), 0) FROM batches").fetchone()[0])
        if total <= quota:
            return {}
        # 0. Rows kept after their PUBACK for the replay window, oldest first: the broker has them, so they go
        #    before any unsent batch and are not counted as dropped.
        for row_id, size in db.execute("SELECT id, LENGTH(blob) FROM batches WHERE acked IS NOT NULL ORDER BY acked, id"
                                       ).fetchall():
            if total <= quota:
                return {}
            db.execute("DELETE FROM batches WHERE id = ?", (row_id,))
            total -= int(size)
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
                if row_id == keep or row_id in self._attempted:
                    continue
                victims.append(row_id)
                total -= int(size)
            if victims:
                db.executemany("DELETE FROM batches WHERE id = ?", [(v,) for v in victims])
                dropped[gid] = dropped.get(gid, 0) + len(victims)

        # 1. The committing grant's own oldest batches (a grant pays for its own backlog first).
        drop_from(grant_id, keep=new_row)
        # 2. Still over: its new batch does not fit beside the others; the largest grant that has a batch not in
        #    flight gives way, oldest first (possibly the committing grant's new batch itself, when it is the
        #    largest). A grant whose batches are all in flight is passed over, not the end of the search.
        while total > quota:
            before = total
            for (gid,) in db.execute("SELECT grant_id FROM batches GROUP BY grant_id "
                                     "ORDER BY SUM(LENGTH(blob)) DESC").fetchall():
                drop_from(str(gid), keep=None)
                if total < before:
                    break
            if total == before:
                break  # only rows in flight left: wait for their PUBACKs
        for gid, n in dropped.items():
            self._count_locked(f"dropped_quota:{gid}", n)
        return dropped

    def pending(self, limit: int, exclude: set[int] | None = None) -> list[Row]:
        """The oldest batches not in ``exclude`` (row ids in flight), decrypted for publishing. Reads only.

        Publish-time check (README "Narrowing applies to stored data"): only rows of a grant in force whose terms
        digest is the one in
        force; anything else waits for :meth:`apply_terms` or an erasure to delete it, and is never returned.
        A row that does not decrypt is skipped and remembered; :meth:`drop_undecryptable` deletes it.
        """
        exclude = exclude or set()
        out: list[Row] = []
        with self._lock:
            skip = sorted(self._unwrappable | self._withheld)
            cur = self._db.execute(
                "SELECT b.id, b.grant_id, b.seq, b.samples, b.blob, b.scopes FROM batches b "  # noqa: S608 - only "?" placeholders are formatted in
                "JOIN active_grants a ON a.id = b.grant_id AND a.terms = b.terms "
                f"WHERE b.acked IS NULL AND b.grant_id NOT IN ({','.join('?' * len(skip))}) ORDER BY b.id LIMIT ?",
                (*skip, limit + len(exclude) + len(self._undecryptable)),
            )
            rows = cur.fetchall()
            for row_id, grant_id, seq, samples, blob, scopes in rows:
                if row_id in exclude or row_id in self._undecryptable:
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
                    self._undecryptable.add(int(row_id))
                    continue
                out.append(Row(row_id, grant_id, seq, payload, int(samples), str(scopes)))
                if len(out) >= limit:
                    break
        return out

    def drop_undecryptable(self) -> int:
        """Delete the rows :meth:`pending` found unreadable (counted as ``undecryptable_rows``). Returns how
        many; they stay remembered (and skipped) if the outbox cannot be written now."""
        with self._lock:
            victims = sorted(self._undecryptable)
            if not victims:
                return 0
            with self._tx() as db:
                db.executemany("DELETE FROM batches WHERE id = ?", [(v,) for v in victims])
                self._count_locked("undecryptable_rows", len(victims))
            self._undecryptable.clear()
            return len(victims)

    def mark_attempted(self, row_id: int) -> None:
        """``row_id`` was handed to the broker: maybe delivered from now on, so never a quota victim."""
        with self._lock:
            self._attempted.add(row_id)

    def delete_batch(self, row_id: int) -> None:
        with self._tx() as db:
            self._attempted.discard(row_id)
            db.execute("DELETE FROM batches WHERE id = ?", (row_id,))

    def mark_sent(self, row: Row, when: float | None = None, *, keep: bool = False) -> None:
        """The broker acknowledged ``row``: delete it (``keep``: stamp it acked, for the replay window) and record
        it for the privacy report, in one transaction.

        ``sent_batches:<g>`` += 1, ``sent_samples:<g>`` += row.samples, ``first_sent:<g>`` = MIN(t),
        ``last_sent:<g>`` = MAX(t) with t = ``when`` (Unix seconds, default now). If the row is gone already
        (erased or dropped while its PUBACK was on the way) it still counts: it did reach the broker.
        The same goes to ``sent_log`` per grant (scope ''), per scope and per consent version in force (set by
        :meth:`apply_terms`), with the first and last acknowledgement in ms: the privacy report's periods.
        """
        self.mark_sent_many([row], when, keep=keep)

    def mark_sent_many(self, rows: Sequence[Row], when: float | None = None, *, keep: bool = False) -> None:
        """:meth:`mark_sent` for several acknowledged rows in one transaction (one fsync for all of them)."""
        at = when if when is not None else time.time()
        t, t_ms = int(at), int(at * 1000)
        with self._tx() as db:
            got = db.execute("SELECT value FROM meta WHERE key = 'ver'").fetchone()
            ver = int(got[0]) if got is not None and str(got[0]).isdigit() else 0
            for row in rows:
                g = row.grant_id
                self._attempted.discard(row.id)
                if keep:
                    db.execute("UPDATE batches SET acked = ? WHERE id = ? AND acked IS NULL", (time.time(), row.id))
                else:
                    db.execute("DELETE FROM batches WHERE id = ?", (row.id,))
                self._count_locked(f"sent_batches:{g}", 1)
                self._count_locked(f"sent_samples:{g}", row.samples)
                try:
                    per_scope = json.loads(row.scopes)
                except ValueError:
                    per_scope = {}
                log_rows = [(g, "", ver, row.samples, 1, t_ms, t_ms)]
                for scope, n in sorted(per_scope.items()):
                    self._count_locked(f"sent_samples:{g}:{scope}", int(n))
                    if scope:  # '' (a path whose scope is unknown) must not add to the grant's own row
                        log_rows.append((g, str(scope), ver, int(n), 1, t_ms, t_ms))
                db.executemany(
                    "INSERT INTO sent_log (grant_id, scope, ver, samples, batches, first_ms, last_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(grant_id, scope, ver) DO UPDATE SET "
                    "samples = samples + excluded.samples, batches = batches + 1, "
                    "first_ms = MIN(first_ms, excluded.first_ms), last_ms = MAX(last_ms, excluded.last_ms)", log_rows)
            for g in sorted({row.grant_id for row in rows}):
                db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                           "SET value = MIN(value, excluded.value)", (f"first_sent:{g}", t))
                db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                           "SET value = MAX(value, excluded.value)", (f"last_sent:{g}", t))

    def replayable(self, acked_since: float, after_id: int, limit: int) -> list[Row]:
        """Rows acknowledged at or after ``acked_since`` with id > ``after_id``, oldest first, decrypted.

        A replayed row keeps the time of its first PUBACK, so it stays on the car at most the window after it.

        The same publish-time checks as :meth:`pending` (a grant in force, the terms in force), so a replay never
        sends what a narrowing or erasure has withdrawn. Reads only.
        """
        out: list[Row] = []
        with self._lock:
            rows = self._db.execute(
                "SELECT b.id, b.grant_id, b.seq, b.samples, b.blob, b.scopes FROM batches b "
                "JOIN active_grants a ON a.id = b.grant_id AND a.terms = b.terms "
                "WHERE b.acked IS NOT NULL AND b.acked >= ? AND b.id > ? ORDER BY b.id LIMIT ?",
                (acked_since, after_id, limit)).fetchall()
            for row_id, grant_id, seq, samples, blob, scopes in rows:
                has_key = self._db.execute("SELECT 1 FROM grant_keys WHERE grant_id = ?", (grant_id,)).fetchone()
                if grant_id in self._unwrappable or grant_id in self._withheld or has_key is None:
                    continue  # key destroyed (being erased) or not readable: nothing to replay
                try:
                    payload = keys.open_row(self._data_key(self._db, grant_id), blob, self._aad(grant_id, seq))
                except Exception:  # unreadable: not replayed; drop_undecryptable deletes it
                    self._undecryptable.add(int(row_id))
                    continue
                out.append(Row(row_id, grant_id, seq, payload, int(samples), str(scopes)))
        return out

    def sweep_acked(self, acked_before: float) -> int:
        """Delete the rows kept since a PUBACK older than ``acked_before`` (their replay window has passed)."""
        with self._tx() as db:
            return int(db.execute("DELETE FROM batches WHERE acked IS NOT NULL AND acked < ?",
                                  (acked_before,)).rowcount)

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
                "SELECT grant_id, COUNT(*), COALESCE(SUM(LENGTH(blob)), 0) FROM batches WHERE acked IS NULL "
                "GROUP BY grant_id").fetchall()
        return {g: {"rows": int(n), "bytes": int(b)} for g, n, b in rows}

    def total_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(LENGTH(blob)), 0) FROM batches").fetchone()[0])

    # -- retention and quota ------------------------------------------------------------------------

    def delete_older_than(self, grant_id: str, created_before: float) -> int:
        """Retention: :meth:`erase` the grant's rows created before ``created_before``; returns how many were still
        unsent (rows kept after their PUBACK for the replay window go too, but were sent)."""
        return self.erase(grant_id, older_than=created_before, wait_s=0.0).batches_deleted



def _held_scopes(scopes_json: str) -> frozenset[str] | None:
    """The scopes a row records, or None if it records none it can vouch for (unknown paths included)."""
    try:
        held = json.loads(scopes_json)
    except ValueError:
        return None
    if not isinstance(held, dict) or not held or "" in held:
        return None
    return frozenset(str(s) for s in held)




