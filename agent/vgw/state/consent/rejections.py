"""Rejected consent documents: what to record, and what to count only (README "Consent document", intake rules).

A flood of invalid documents must not grow the audit log or the outbox without bound. The same document again
(by digest; the last ``REJECTED_MEMORY`` remembered) is counted only; distinct documents of one reason are
coalesced to one record per source and reason per ``REJECT_COALESCE_S``: the first at once, the rest summed
with a ``count`` when the interval ends (:meth:`RejectionLog.flush`). A record is an audit entry and a
``consent-rejected`` receipt, written by the caller's ``record``. Thread: the consent manager's (main); no I/O.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from vgw.base.errors import ConsentError
from vgw.contract.consent.verifier import peek_version

log = logging.getLogger(__name__)

REJECTED_MEMORY = 256  # how many rejected documents are remembered (by digest) to ignore their replays
REJECT_COALESCE_S = 60.0

# record(error, ver, source, count): one audit entry and one receipt standing for ``count`` documents
Record = Callable[[ConsentError, "int | None", str, int], None]


@dataclass
class _Window:
    """One reason's coalescing interval: when it began and what was rejected since the record that began it."""

    start: float
    pending: int = 0
    last: ConsentError | None = None
    ver: int | None = None


class RejectionLog:
    """Decides which rejections are recorded at once, summed later, or only counted."""

    def __init__(self, *, record: Record) -> None:
        self._record = record
        # Digests of documents already rejected: a replayed copy (a flood of the same bad document on the
        # consent topic) is counted, not audited and receipted again, so it cannot fill the disk.
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._windows: dict[tuple[str, str], _Window] = {}  # (source, reason) -> its interval
        self.repeated = 0  # the same document again
        self.coalesced = 0  # rejections folded into a later counted record

    def reject(self, exc: ConsentError, *, source: str, token: str | bytes | None = None, count: int = 1) -> None:
        if token is not None:
            digest = hashlib.sha256(token if isinstance(token, bytes) else token.encode("utf-8", "replace")).hexdigest()
            if digest in self._seen:
                self._seen.move_to_end(digest)
                self.repeated += 1
                log.debug("the same rejected consent document again (%s): counted only", exc.reason)
                return
            self._seen[digest] = None
            if len(self._seen) > REJECTED_MEMORY:
                self._seen.popitem(last=False)
        ver = exc.version if exc.version is not None else (peek_version(token) if token is not None else None)
        now = time.monotonic()
        key = (source, exc.reason)
        window = self._windows.get(key)
        if window is None or (window.pending == 0 and now - window.start >= REJECT_COALESCE_S):
            self._windows[key] = _Window(start=now)
            self._record(exc, ver, source, count)
            if count > 1:
                log.warning("%d consent documents rejected (%s) from %s", count, exc.reason, source)
            else:
                log.warning("%s (from %s)", exc, source)
            return
        window.pending += count
        window.last, window.ver = exc, ver
        self.coalesced += count
        log.debug("consent rejected again (%s): counted into the next entry", exc.reason)
        self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Record the sum of every reason whose coalescing interval is over (``force``: of every reason)."""
        now = time.monotonic()
        for key, window in list(self._windows.items()):
            if not force and now - window.start < REJECT_COALESCE_S:
                continue
            if window.pending == 0 or window.last is None:
                del self._windows[key]
                continue
            source, reason = key
            self._record(window.last, window.ver, source, window.pending)
            log.warning("%d more consent document(s) rejected (%s) from %s in the last %.0f s", window.pending,
                        reason, source, now - window.start)
            self._windows[key] = _Window(start=now)
