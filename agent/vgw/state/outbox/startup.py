"""Opening the outbox for `vgw run`: integrity check first, quarantine of a corrupt file -- but never a file that
only could not be read for lack of room."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vgw.base.errors import OutboxUnwritable, StorageError, StorageFault
from vgw.state.outbox.batches import Outbox
from vgw.state.outbox.connection import prepare_file
from vgw.state.outbox.quarantine import Quarantined, destroy_quarantined, integrity_problem, quarantine

log = logging.getLogger(__name__)

# Less free space than this and SQLite may fail to open a WAL database at all (its -shm and -wal files): a failed
# check then says nothing about the file.
ROOM_BYTES = 1 << 20


def room_fault(directory: Path) -> StorageFault | None:
    """FULL or READ_ONLY when the file system of ``directory`` has no room to open the outbox; None otherwise."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return StorageFault.READ_ONLY
    if st.f_bavail * st.f_frsize < ROOM_BYTES:
        return StorageFault.FULL
    return None


def open_checked(path: Path, storage_key: bytes, device: str) -> tuple[Outbox, Quarantined | None]:
    """Open the outbox for `vgw run`: integrity-check it first and quarantine a corrupt file.

    A corrupt outbox is never repaired in place (a half-readable row could be replayed or leak): its seqs are
    read, it is destroyed (see :func:`quarantine`), a fresh file is created and the seqs are carried over. The
    caller audits and logs the returned :class:`Quarantined`. Raises StorageError if even a fresh file cannot be opened.
    """
    for name in destroy_quarantined(path):
        log.warning("destroyed quarantined outbox copy %s (it may hold revoked grants' data)", name)
    prepare_file(path)  # a FIFO in its place would block the integrity check for ever
    problem = integrity_problem(path)
    if problem is None:
        try:
            return Outbox(path, storage_key, device), None
        except StorageError as exc:  # e.g. "file is not a database" only shows when the schema is read
            problem = str(exc.__cause__ or exc)
    problem = " ".join(problem.split())  # integrity_check answers span lines: one log line, one audit field
    fault = room_fault(path.parent)
    if fault is not None:
        # A full or read-only disk makes SQLite fail the check ("disk I/O error": no room for the -shm file). The
        # file is not corrupt: destroying it would lose every unsent batch. The caller waits for room.
        raise OutboxUnwritable(f"{path}: cannot open the outbox, the state file system is {fault}: {problem}",
                               fault)
    target, seqs = quarantine(path)
    log.error("outbox %s failed its integrity check (%s): quarantined as %s and destroyed, starting a fresh "
              "outbox (%d seq(s) kept)", path, problem, target.name, len(seqs))
    outbox = Outbox(path, storage_key, device)
    if seqs:
        outbox.seed_seqs(seqs)
    return outbox, Quarantined(target, problem, seqs)
