"""The pipeline behind the agent lock: routing, open batches and the hand-over of batches to the writer.

Owned by no single thread; every method takes :attr:`PipelineGuard.lock` (the agent lock), or is called with it
held where it says so. Who comes in: the collector (one chunk of frames at a time, :mod:`vgw.daemon.collector`),
the OBD-II poller (:meth:`offer_samples`, :meth:`granted_scopes`), the main loop (consent changes and revocations
through the consent manager's hooks, the due flush when there is no CAN source) and shutdown (the final flush).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from vgw.config.settings import BatchConfig
from vgw.contract.consent.model import Grant
from vgw.contract.consent.narrowing import terms_digest
from vgw.contract.envelope import load_recipient_key
from vgw.daemon.writer import BatchWriter, SealJob
from vgw.pipeline.catalogue import Catalogue
from vgw.pipeline.router import GrantBatch, Pipeline

log = logging.getLogger(__name__)


class PipelineGuard:
    """The pipeline, each grant's recipient key and each path's scope, guarded by ``lock``.

    ``lock`` guards ``pipeline``, the recipients and ``source``'s frame filters. Batches go to the writer with
    the lock held, so a revocation (which takes it) sees a grant's open batch or its queued one, never neither;
    once it holds the lock no chunk is half-processed. ``source`` is the collector's open source (None while it
    has none): the collector sets it, and its filters are installed under the lock.
    """

    def __init__(self, *, catalogue: Catalogue | None, obd: bool, writer: BatchWriter, batch: BatchConfig) -> None:
        self.lock = threading.Lock()
        self.pipeline = Pipeline(catalogue)
        self.writer = writer
        self.batch = batch
        self.source: Any = None
        self._recipients: dict[str, Any] = {}
        # What store_rule_counts last stored, per grant: (the batch it counted, {scope: (decoded, kept)}).
        # Guarded by its own lock, never the agent lock: the main loop must not wait for a stalled collector.
        self._rule_counted: dict[str, tuple[GrantBatch | None, dict[str, tuple[int, int]]]] = {}
        self._rule_counted_lock = threading.Lock()
        # Which scope each path belongs to: counted per batch for the privacy report (counts, never values).
        self._scope_of: dict[str, str] = catalogue.scope_of_path() if catalogue else {}
        if obd:
            from vgw.pipeline.obd.pids import DTC_PATH, PENDING_DTC_PATH, PIDS, VIN_PATH

            self._scope_of.update({p.path: p.scope for p in PIDS})
            self._scope_of.update({VIN_PATH: "read_vin", DTC_PATH: "read_diagnostics",
                                   PENDING_DTC_PATH: "read_diagnostics"})

    # -- consent (the main loop, through the consent manager's hooks) ----------------------------------

    def revoke(self, grant_ids: frozenset[str], remaining: tuple[Grant, ...]) -> None:
        """Stop collecting for ``grant_ids``: swap the router to ``remaining``, drop their open and queued
        batches. Called before the manager erases anything on disk."""
        with self.lock:
            self.pipeline.swap(remaining)
            self.install_filters()
            for gid in grant_ids:
                self._recipients.pop(gid, None)
            self.writer.drop(grant_ids)  # batches taken but not yet stored go too
        log.info("collection stopped for %d grant(s); in-memory batches dropped", len(grant_ids))

    def set_grants(self, grants: tuple[Grant, ...]) -> None:
        """A consent change: collect for exactly ``grants`` from now on."""
        with self.lock:
            self._recipients = {g.id: load_recipient_key(g.recipient.kem, g.recipient.pk) for g in grants}
            self.pipeline.swap(grants)
            self.install_filters()

    def install_filters(self) -> None:
        """Give the open source the frame ids the router wants (called with ``lock`` held)."""
        if self.source is not None:
            self.source.set_filters(self.pipeline.router.frames)

    # -- batches --------------------------------------------------------------------------------------

    def flush(self, batches: list[GrantBatch]) -> None:
        """Hand batches to the writer (vgw.daemon.writer), which seals and stores them off this thread. Called with
        ``lock`` held."""
        for batch in batches:
            first_t = batch.first_t
            cols, n = batch.take_columns()
            if not n:
                continue
            grant = batch.grant
            recipient = self._recipients.get(grant.id)
            if recipient is None:
                continue
            per_scope: dict[str, int] = {}
            for path, (times, _values) in cols.items():
                scope = self._scope_of.get(path, "")
                per_scope[scope] = per_scope.get(scope, 0) + len(times)
            self.writer.submit(SealJob(grant, recipient, cols, n, first_t, per_scope, terms_digest(grant),
                                       {p: (t, iv, self._scope_of.get(p, "")) for p, (t, iv) in batch.marks().items()}
                                       or None))

    def flush_due(self) -> None:
        """Flush the batches that are full or old enough (the main loop, when no collector does it)."""
        with self.lock:
            due = self.pipeline.due(self.batch.max_samples, self.batch.max_interval_s)
            if due:
                self.flush(due)

    def flush_all(self) -> None:
        """Flush every open batch (shutdown)."""
        with self.lock:
            self.flush(self.pipeline.due(1, 0, force=True))

    def store_rule_counts(self, store: Callable[[dict[str, int]], None]) -> None:
        """Hand ``store`` what the grants' collection rules decoded and let through since the last stored call, as
        outbox counters ``rules_decoded:<g>:<scope>`` and ``rules_kept:<g>:<scope>``: the privacy report's
        figures then survive a restart of the agent (the main loop stores them with the status, and at
        shutdown). When ``store`` raises (a full disk), the same counts are handed over again next time."""
        out: dict[str, int] = {}
        taken: dict[str, tuple[GrantBatch | None, dict[str, tuple[int, int]]]] = {}
        # Read without the agent lock, as the status writer reads the rule counts (list() copies in one step):
        # a collector stalled with the lock held must not stop the main loop too.
        with self._rule_counted_lock:
            for gid, batch in list(self.pipeline.batches.items()):
                if batch.rules is None and not batch.rule_counts:
                    continue
                counted, seen = self._rule_counted.get(gid, (None, {}))
                if counted is not batch:
                    seen = {}  # a new batch (granted again): its counts start at zero
                now = {scope: (c[0], c[1]) for scope, c in list(batch.rule_counts.items())}
                for scope, (decoded, kept) in now.items():
                    before = seen.get(scope, (0, 0))
                    if decoded > before[0]:
                        out[f"rules_decoded:{gid}:{scope}"] = decoded - before[0]
                    if kept > before[1]:
                        out[f"rules_kept:{gid}:{scope}"] = kept - before[1]
                taken[gid] = (batch, now)
            store(out)
            self._rule_counted.update(taken)

    # -- OBD-II (the poller's thread) -----------------------------------------------------------------

    def granted_scopes(self) -> frozenset[str]:
        with self.lock:
            return self.pipeline.granted_scopes()

    def offer_samples(self, samples: list[tuple[str, str, float, Any]]) -> None:
        """Samples (path, scope, t, value) from a non-CAN source, routed through the same consent policy."""
        with self.lock:
            for path, scope, t, value in samples:
                self.pipeline.offer(path, scope, t, value)
            due = self.pipeline.due(self.batch.max_samples, self.batch.max_interval_s)
            if due:
                self.flush(due)
