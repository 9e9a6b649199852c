"""A read-only look at an outbox file, for `vgw status` and `vgw report` (docs/style.md: a read never writes)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from vgw.base.errors import StorageError
from vgw.base.fsutil import refuse_symlink
from vgw.state.outbox.connection import BUSY_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class OutboxFigures:
    """What `vgw status` and `vgw report` show of an outbox: counts and sizes, never contents."""

    stats: dict[str, dict[str, int]]  # grant id -> {"rows": n, "bytes": n} waiting for the broker
    counters: dict[str, int]
    receipts_queued: int
    used_bytes: int
    # (grant, scope or '' for the grant, consent version, samples, batches, first ack ms, last ack ms)
    sent_log: tuple[tuple[str, str, int, int, int, int, int], ...] = ()


def read_figures(path: Path) -> OutboxFigures:
    """Read an outbox's figures without writing anything: no schema, no key, no -wal/-shm created.

    SQLite's ``mode=ro`` still creates -wal and -shm for a WAL database whose side files are absent (a closed
    outbox), so that case is read with ``immutable=1`` (no locks, no side files) and checked afterwards: if
    the file changed or a -wal appeared meanwhile (an agent started writing), it is read again with
    ``mode=ro``, which then finds the writer's side files and creates none (it does use the -shm, SQLite's
    shared-memory index that every reader of a live WAL database takes its read lock in). A -wal without
    -shm (an agent that crashed) is read immutable too: the frames still in that -wal show once `vgw run` has
    recovered them.
    A missing file has empty figures. Raises StorageError for a file SQLite cannot read.
    """
    for suffix in ("", "-wal", "-shm"):
        refuse_symlink(Path(str(path) + suffix))
    before = _file_state(path)
    if before is None:
        return OutboxFigures({}, {}, 0, 0)
    wal, shm = Path(str(path) + "-wal"), Path(str(path) + "-shm")
    if wal.exists() and shm.exists():
        return _read_figures(path, "mode=ro")
    figures = _read_figures(path, "immutable=1")
    if _file_state(path) == before and not wal.exists():
        return figures
    return _read_figures(path, "mode=ro")


def _file_state(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _waiting(db: sqlite3.Connection) -> str:
    """The WHERE clause for rows still waiting for the broker: not those kept after their PUBACK for the replay
    window (README "Replay after failover"; an outbox written before that column existed has none)."""
    return "WHERE acked IS NULL" if "acked" in {r[1] for r in db.execute("PRAGMA table_info(batches)")} else ""


def _read_figures(path: Path, mode: str) -> OutboxFigures:
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?{mode}", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            stats = {str(g): {"rows": int(n), "bytes": int(b)} for g, n, b in db.execute(
                f"SELECT grant_id, COUNT(*), COALESCE(SUM(LENGTH(blob)), 0) FROM batches {_waiting(db)} "  # noqa: S608
                "GROUP BY grant_id")}
            counters = {str(k): int(v) for k, v in db.execute("SELECT name, value FROM counters")}
            receipts = int(db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])
            used = int(db.execute("SELECT COALESCE(SUM(LENGTH(blob)), 0) FROM batches").fetchone()[0])
            log_rows: tuple[tuple[str, str, int, int, int, int, int], ...] = ()
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sent_log'").fetchone():
                log_rows = tuple((str(g), str(s), int(v), int(n), int(b), int(f), int(last)) for g, s, v, n, b, f, last
                                 in db.execute("SELECT grant_id, scope, ver, samples, batches, first_ms, last_ms "
                                               "FROM sent_log ORDER BY grant_id, scope, ver"))
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"{path}: cannot read outbox: {exc}") from exc
    return OutboxFigures(stats, counters, receipts, used, log_rows)  # used: kept rows too (they take room)
