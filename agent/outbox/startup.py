"""Opening the outbox for `vgw run`: integrity check first, quarantine of a corrupt file."""

from __future__ import annotations

import logging
from pathlib import Path

from vgw.errors import StorageError
from vgw.outbox.batches import Outbox
from vgw.outbox.connection import prepare_file
from vgw.outbox.quarantine import Quarantined, destroy_quarantined, integrity_problem, quarantine

log = logging.getLogger(__name__)


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
    target, seqs = quarantine(path)
    log.error("outbox %s failed its integrity check (%s): quarantined as %s and destroyed, starting a fresh "
              "outbox (%d seq(s) kept)", path, problem, target.name, len(seqs))
    outbox = Outbox(path, storage_key, device)
    if seqs:
        outbox.seed_seqs(seqs)
    return outbox, Quarantined(target, problem, seqs)
