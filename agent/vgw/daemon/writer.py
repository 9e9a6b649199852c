"""The batch writer: the daemon part that seals and stores batches, so fsync never runs on the collector.

Thread ``vgw-writer`` owns everything here but the queue. Other threads hand it batches with :meth:`submit`
(the collector, the OBD poller through the agent, and shutdown, all under the agent lock) and take batches of
revoked grants back out with :meth:`drop` (under the agent lock too). The queue is guarded by the writer's
own condition lock, held only for list operations: never across sealing or SQLite.

Per group of up to GROUP_BATCHES batches: each is sealed (README "Telemetry envelope" version 2 plaintext, HPKE to the
grant's recipient) inside one outbox transaction (:meth:`vgw.state.outbox.Outbox.commit_batches`), so a group costs
one fsync. The outbox judges every batch at commit: a grant revoked meanwhile, or terms narrowed since the
batch was collected, discards it (counted ``batches_discarded``).

With ``[agent] seal_workers = 1`` the plaintext and the HPKE seal of a group are made by a child process
(:mod:`vgw.daemon.seal_worker`) while the writer thread waits on its pipe, so the collector has the agent's
core meanwhile. The writer predicts each batch's seq (the outbox's next seq, counted up within the group); the
outbox still assigns the seq in its transaction, and a batch whose seq came out otherwise (a batch before it
refused) is sealed again in-process with the right one. A batch of a grant revoked while its group was at the
worker is discarded at commit (:meth:`drop` marks it). A worker that dies, hangs or is refused is stopped; its
group and the following ones are sealed in-process, a new worker is started after ``Timing.seal_restart_s``, and
``seal`` in status.json says which way batches are sealed now (:meth:`seal_status`).

The storage-fault state (docs/guarantees.md "disk full/read-only") lives here: ``storage_error`` says why
the outbox cannot store now; :meth:`storage_failed` lets the main loop report a failed write of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vgw.base.errors import StorageError
from vgw.contract.consent.model import Grant
from vgw.contract.envelope import Series, columnar_plaintext, seal
from vgw.daemon.counters import Counters
from vgw.daemon.seal_worker import Request, SealWorker, SealWorkerGone
from vgw.daemon.timing import DEFAULT_TIMING, Timing
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
                 audit: Callable[..., None], on_stored: Callable[[], None], seal_workers: int = 0,
                 timing: Timing = DEFAULT_TIMING) -> None:
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
        # The seal worker (module docstring): the writer thread's alone, but for start and close.
        self.seal_workers = seal_workers
        self.timing = timing  # seal_restart_s, seal_reply_s
        self.sealed_by_worker = 0  # batches stored as the worker sealed them (the writer thread adds, status reads)
        self._worker: SealWorker | None = None
        self._worker_failed_at: float | None = None
        self._worker_error: str | None = None  # why batches are sealed in-process although a worker was asked for
        self.worker_restarts = 0
        # One set per group taken and not yet stored, oldest first: the grants revoked since it was taken, whose
        # batches in it are discarded (under _cond). Per group, so a grant granted again under the same id is
        # not refused in the groups taken after.
        self._taken: list[set[str]] = []
        self._expected: list[list[int]] = []  # per group at the worker, oldest first: the seqs it was sealed for

    # -- any thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.seal_workers:
            self._start_worker()
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
            for revoked in self._taken:  # groups in the making (maybe at the seal worker): these grants' go
                revoked.update(grant_ids)
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
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def seal_status(self) -> dict[str, Any]:
        """``seal`` in status.json: where batches are sealed ("worker" or "in-process"), the workers asked for,
        the worker's pid, how often it was restarted, and why batches are sealed in-process if one was asked for."""
        worker = self._worker  # read from the status thread: one reference, replaced whole by the writer thread
        alive = worker is not None and worker.alive()
        return {"workers": self.seal_workers, "mode": "worker" if alive else "in-process",
                "pid": worker.pid if alive and worker is not None else None, "restarts": self.worker_restarts,
                "sealed_by_worker": self.sealed_by_worker,
                "error": self._worker_error if self.seal_workers else None}

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
        # With a seal worker, two groups are in flight: the worker seals the newer while this thread stores
        # the older (``held``: the group, its revocation set, the worker it went to). Without one, one at a time.
        held: tuple[list[SealJob], set[str], SealWorker] | None = None
        while True:
            with self._cond:
                if held is None:
                    self._cond.wait_for(lambda: self._queue or self._closing)
                    if not self._queue:
                        return
                group, self._queue = self._queue[:GROUP_BATCHES], self._queue[GROUP_BATCHES:]
                revoked: set[str] = set()
                if group:
                    self._taken.append(revoked)
                self._busy = True
            try:
                sent = self._send_to_worker(group, after=held[0] if held is not None else None) if group else None
                if held is not None:
                    self._store(held[0], self._sealed_by_worker(held[2]), held[1])
                    self._done(held[1])
                    held = None
                if sent is not None and sent is self._worker:
                    held = (group, revoked, sent)
                elif group:
                    self._store(group, {}, revoked)
                    self._done(revoked)
            except Exception:  # a defect must not end the writer: the batches are lost, counted and logged
                lost = len(group) + (len(held[0]) if held is not None else 0)
                held = None
                with self._cond:
                    self._taken.clear()
                if self._worker is not None:  # its pipe may hold a reply nobody waits for now: start afresh
                    self._worker_failed("seal worker reset after a failed group")
                self.counters.add("batches_failed", lost)
                log.exception("a group of %d batch(es) could not be stored", lost)
            finally:
                if held is None:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()

    def _done(self, revoked: set[str]) -> None:
        """A group was stored: forget its revocation set."""
        with self._cond:
            self._taken = [r for r in self._taken if r is not revoked]

    def _store(self, jobs: list[SealJob], sealed: dict[int, tuple[int, bytes]] | None = None,
               revoked: set[str] | None = None) -> None:
        """Seal (unless ``sealed`` holds it: index -> (seq it was sealed for, envelope)) and store ``jobs``;
        a batch of a grant in ``revoked`` (filled by :meth:`drop` meanwhile) is discarded."""
        epoch = self.outbox.epoch
        device = self.device
        sealed = sealed or {}
        revoked = revoked if revoked is not None else set()

        def maker(i: int, job: SealJob) -> Callable[[int], bytes]:
            def make(seq: int) -> bytes:
                gid = job.grant.id
                with self._cond:
                    gone = gid in revoked
                if gone:  # revoked since this group was taken: nothing of it is stored
                    raise GrantNotActive(f"grant {gid!r} revoked; batch discarded")
                done = sealed.get(i)
                if done is not None and done[0] == seq:
                    self.sealed_by_worker += 1
                    return done[1]
                return seal(job.grant.recipient.kem, job.recipient, device, gid,
                            columnar_plaintext(device, gid, seq, job.series, epoch=epoch))
            return make

        batches = [NewBatch(j.grant.id, maker(i, j), j.first_t, j.samples, j.scopes, j.terms, j.marks)
                   for i, j in enumerate(jobs)]
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

    # -- the seal worker (the writer thread; start also from the agent's) ---------------------------------

    def _start_worker(self) -> None:
        worker = SealWorker(timeout_s=self.timing.seal_reply_s)
        try:
            worker.start()
        except OSError as exc:
            self._worker_failed(f"seal worker did not start: {exc}")
            return
        self._worker = worker
        self._worker_error = None
        log.info("seal worker started (pid %d)", worker.pid)

    def _worker_failed(self, why: str) -> None:
        self._expected.clear()
        if self._worker is not None:
            self._worker.close(grace_s=0.0)
            self._worker = None
        self._worker_failed_at = time.monotonic()
        self._worker_error = why
        log.warning("%s; batches are sealed in-process, a new worker starts in %g s", why, self.timing.seal_restart_s)

    def _send_to_worker(self, jobs: list[SealJob], after: list[SealJob] | None) -> SealWorker | None:
        """Hand ``jobs`` to the seal worker (started or restarted here if due), each with the seq the outbox will
        give it if every batch before it, ``after`` included, is stored. The worker it went to, or None: sealed
        in-process then."""
        if not self.seal_workers:
            return None
        if self._worker is not None and not self._worker.alive():
            self._worker_failed(f"seal worker exited (code {self._worker.returncode})")
        if self._worker is None:
            if self._worker_failed_at is not None:
                if time.monotonic() - self._worker_failed_at < self.timing.seal_restart_s:
                    return None
                self.worker_restarts += 1
            self._start_worker()
            if self._worker is None:
                return None
        epoch = self.outbox.epoch
        seqs: dict[str, int] = {}
        for job in after or ():
            gid = job.grant.id
            seqs[gid] = (seqs.get(gid) or self.outbox.next_seq(gid)) + 1
        requests: list[Request] = []
        for job in jobs:
            gid = job.grant.id
            seq = seqs.get(gid) or self.outbox.next_seq(gid)
            seqs[gid] = seq + 1
            requests.append((job.grant.recipient.kem, job.grant.recipient.pk, self.device, gid, seq, epoch,
                             job.series))
        worker = self._worker
        try:
            worker.send(requests)
        except ValueError:  # a value the pipe does not carry: this group is sealed in-process
            return None
        except SealWorkerGone as exc:
            self._worker_failed(str(exc))
            return None
        self._expected.append([r[4] for r in requests])
        return worker

    def _sealed_by_worker(self, worker: SealWorker) -> dict[int, tuple[int, bytes]]:
        """Index in the oldest group sent -> (the seq it was sealed for, envelope), for the batches the worker
        sealed. Empty if the worker it went to is gone (the group is then sealed in-process)."""
        seqs = self._expected.pop(0) if self._expected else []
        if worker is not self._worker:
            self._expected.clear()
            return {}
        try:
            envelopes = worker.receive()
        except SealWorkerGone as exc:
            self._expected.clear()
            self._worker_failed(str(exc))
            return {}
        return {i: (seq, env) for i, (seq, env) in enumerate(zip(seqs, envelopes, strict=True)) if env is not None}

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
