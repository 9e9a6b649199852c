"""A corrupt outbox is never repaired in place: quarantined, its seqs salvaged, then destroyed.

On start :func:`vgw.state.outbox.open_checked` runs ``PRAGMA integrity_check``; a corrupt file is quarantined: its
``seqs`` are salvaged if still readable, then the file and its -wal/-shm are overwritten and deleted (a corrupt
copy would keep revoked grants' wrapped keys and rows beyond any erasure, docs/guarantees.md), and a fresh
file takes its place.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from vgw.base.fsutil import destroy_file


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
    unreadable). The salvaged seqs keep ``seq`` rising for the cloud (README "Telemetry envelope"): a fresh file
    alone would
    restart at 1 and the receiver would drop the new batches as re-deliveries. Nothing else is kept: a copy
    would hold wrapped keys and rows of grants that a later revocation could no longer reach (README "Receipts").
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


@dataclass(frozen=True, slots=True)
class Quarantined:
    file: Path  # the name the corrupt outbox was quarantined under (then destroyed)
    reason: str  # what integrity_check said
    seqs_recovered: dict[str, int]
