"""The batch writer: the daemon part that seals and stores batches, so fsync never runs on the collector.

Thread ``vgw-writer`` owns everything here but the queue. Other threads hand it batches with :meth:`submit`
(the collector, the OBD poller through the agent, and shutdown, all under the agent lock) and take batches of
revoked grants back out with :meth:`drop` (under the agent lock too). The queue is guarded by the writer's
own condition lock, held only for list operations: never across sealing or SQLite.

Per group of up to GROUP_BATCHES batches: each is sealed (README "Telemetry envelope" version 2 plaintext, HPKE to the
grant's recipient) inside one outbox transaction (:meth:`vgw.state.outbox.Outbox.commit_batches`), so a group costs
one fsync. The outbox judges every batch at commit: a grant revoked meanwhile, or terms narrowed since the
batch was collected, discards it (counted ``batches_discarded``).

The storage-fault state (docs/guarantees.md "disk full/read-only") lives here: ``storage_error`` says why
the outbox cannot store now; :meth:`storage_failed` lets the main loop report a failed write of its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vgw.base.errors import StorageError
from vgw.contract.consent.model import Grant
from vgw.contract.envelope import Series, columnar_plaintext, seal
from vgw.daemon.counters import Counters
from vgw.state.outbox import GrantNotActive, NewBatch, Outbox, OutboxUnwritable

log = logging.getLogger(__name__)

GROUP_BATCHES = 8  # batches per transaction at most: bounds how long a revocation waits for the outbox
MAX_QUEUED = 4  # batches waiting at most before the collector waits for the writer (bounded memory: RSS)
RECOVERED_AFTER_STORES = 3  # consecutive stored batches before a storage fault counts as over


@dataclass
class SealJob:
    """One batch to seal and store: what the collector took out of a grant's open batch."""

    grant: Grant
    recipient: Any
    series: dict[str, Series]
    samples: int
    first_t: float
    scopes: dict[str, int]
    terms: str | None  # the digest of the terms it was collected under (None: those in force)
    # path -> (frame time, max_hz interval, scope): rate marks to keep with it (Outbox.rate_marks)
    marks: dict[str, tuple[float, float, str]] | None = None


class BatchWriter:
    def __init__(self, *, device: str, outbox: Outbox, counters: Counters, quota_bytes: int,
                 audit: Callable[..., None], on_stored: Callable[[], None]) -> None:
        self.device = device
        self.outbox = outbox
        self.counters = counters
        self.quota_bytes = quota_bytes
        self._audit = audit
        self._on_stored = on_stored
        self._cond = threading.Condition()
        self._queue: list[SealJob] = []
        self._busy = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._state = threading.Lock()  # the storage-fault state below (the writer and the main loop)
        self.storage_error: str | None = None  # why the outbox cannot store now (None: it can)
        self._store_failures_at_error = 0
        self._stores_since_error = 0
        self._quota_pending: dict[str, int] = {}  # drops not yet in the audit log

    # -- any thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vgw-writer", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: SealJob) -> None:
        """Queue a batch. Without a running writer (not started, or stopped) it is stored at once, here."""
        if self._thread is None or not self._thread.is_alive():
            self._store([job])
            return
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()

    def drop(self, grant_ids: frozenset[str] | set[str]) -> int:
        """Forget the queued batches of these grants (revocation: their samples never reach the disk)."""
        with self._cond:
            keep = [j for j in self._queue if j.grant.id not in grant_ids]
            dropped = len(self._queue) - len(keep)
            self._queue = keep
            return dropped

    def wait_room(self, timeout: float = 5.0) -> None:
        """Wait (outside the agent lock) while more than MAX_QUEUED batches are queued: bounded memory."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._queue) <= MAX_QUEUED or self._closing, timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued batch was stored (or refused). True if it was within ``timeout`` s."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Store what is queued, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            left, self._queue = self._queue, []
        if left:
            self._store(left)

    def take_quota_drops(self) -> dict[str, int]:
        with self._state:
            out, self._quota_pending = self._quota_pending, {}
            return out

    def storage_failed(self, exc: StorageError) -> None:
        """A write failed (counted in ``store_failures``): logged and audited when the state changes, not per
        batch, so a full disk does not fill the journal."""
        with self._state:
            failures = self.counters.add("store_failures")
            self._stores_since_error = 0
            if self.storage_error is not None:
                return
            kind = exc.kind if isinstance(exc, OutboxUnwritable) else "io"
            self.storage_error = str(exc)
            self._store_failures_at_error = failures - 1
        log.error("outbox cannot store (%s): %s; new batches are counted and dropped until it can", kind, exc)
        self._audit("outbox-unwritable", kind=kind)

    # -- the writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                group, self._queue = self._queue[:GROUP_BATCHES], self._queue[GROUP_BATCHES:]
                self._busy = True
            try:
                self._store(group)
            except Exception:  # a defect must not end the writer: the batches are lost, counted and logged
                self.counters.add("batches_failed", len(group))
                log.exception("a group of %d batch(es) could not be stored", len(group))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _store(self, jobs: list[SealJob]) -> None:
        epoch = self.outbox.epoch
        device = self.device

        def maker(job: SealJob) -> Callable[[int], bytes]:
            def make(seq: int) -> bytes:
                gid = job.grant.id
                return seal(job.grant.recipient.kem, job.recipient, device, gid,
                            columnar_plaintext(device, gid, seq, job.series, epoch=epoch))
            return make

        batches = [NewBatch(j.grant.id, maker(j), j.first_t, j.samples, j.scopes, j.terms, j.marks) for j in jobs]
        try:
            results: list[Any] = self.outbox.commit_batches(batches, quota_bytes=self.quota_bytes)
        except StorageError as exc:
            for _ in jobs:
                self.storage_failed(exc)
            return
        stored = 0
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, GrantNotActive):
                self.counters.add("batches_discarded")
            elif isinstance(result, Exception):  # one bad batch must never stop collection
                if self.counters.add("batches_failed") == 1:
                    log.error("a batch of grant %s could not be sealed and was dropped (%s)", job.grant.id,
                              type(result).__name__)
            else:
                stored += 1
                for gid, n in result.dropped.items():
                    self.counters.add("quota_dropped", n)
                    with self._state:
                        self._quota_pending[gid] = self._quota_pending.get(gid, 0) + n
        if stored:
            self.counters.add("batches", stored)
            self._stored(stored)
            self._on_stored()

    def _stored(self, n: int) -> None:
        with self._state:
            if self.storage_error is None:
                return
            # A nearly full disk can take one small batch now and then; only a run of successes means it
            # recovered (else the log and the audit would flap with every batch).
            self._stores_since_error += n
            if self._stores_since_error < RECOVERED_AFTER_STORES:
                return
            lost = self.counters["store_failures"] - self._store_failures_at_error
            self.storage_error = None
        log.warning("outbox stores again; %d batch(es) were not stored meanwhile", lost)
        self._audit("outbox-recovered", batches_not_stored=lost)
