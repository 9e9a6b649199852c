"""The supervisor: the agent's main loop, on the main thread (``Agent.run``).

It owns the consent documents' intake (the MQTT intake's queue, the inbox file written by `vgw consent apply`),
the retries of a document applied in memory whose disk part waits (vgw.state.consent.pending), expiry, retention,
pending erasures, the quota-drop audits, the status file, the clock floor, the config reload (SIGHUP, see
vgw.daemon.agent "Reload"), health and the systemd watchdog, and the end of a replay (``replay_exit``, a state of the
loop: consent and SIGTERM are handled while it waits).
Locks: none of its own; the consent manager, store, outbox and audit log take theirs, and a consent change or
revocation takes the agent lock through the manager's hooks (:class:`vgw.daemon.locked_pipeline.PipelineGuard`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from vgw.base.errors import StorageError, VgwError
from vgw.base.fsutil import MAX_CONFIG_BYTES, read_small_file
from vgw.base.logs import apply_config_level
from vgw.config.settings import Config, load_config
from vgw.daemon.collector import Collector
from vgw.daemon.counters import Counters
from vgw.daemon.health import Health
from vgw.daemon.locked_pipeline import PipelineGuard
from vgw.daemon.sdnotify import notify, watchdog_interval
from vgw.daemon.status import StatusView
from vgw.daemon.timing import DEFAULT_TIMING, Timing
from vgw.daemon.writer import BatchWriter
from vgw.pipeline.catalogue import MAX_DBC_BYTES
from vgw.state.audit import AuditLog
from vgw.state.consent.intake import ConsentIntake
from vgw.state.consent.manager import ConsentManager
from vgw.state.consent.store import ConsentStore
from vgw.state.outbox import Outbox
from vgw.uplink.link import Uplink

log = logging.getLogger(__name__)

INTAKE_ROUNDS = 8  # consent intake emptied at most this often per main-loop turn
QUOTA_AUDIT_EVERY_S = DEFAULT_TIMING.quota_audit_every_s  # the periods themselves: vgw.daemon.timing.Timing


class Supervisor:
    """The main loop and the state-dir work it does between turns (thread: main; no lock of its own)."""

    def __init__(self, *, cfg: Config, stop: threading.Event, reload: threading.Event, intake: ConsentIntake,
                 manager: ConsentManager, store: ConsentStore, outbox: Outbox, audit: AuditLog,
                 audit_event: Callable[..., None], uplink: Uplink, writer: BatchWriter, counters: Counters,
                 guard: PipelineGuard, collector: Collector | None, health: Health, status: StatusView,
                 timing: Timing = DEFAULT_TIMING) -> None:
        self.cfg = cfg
        self.timing = timing
        self.stop = stop
        self.reload = reload
        self.intake = intake
        self.manager = manager
        self.store = store
        self.outbox = outbox
        self.audit = audit
        self._audit_event = audit_event  # an audit entry that a full disk does not make fatal
        self.uplink = uplink
        self.writer = writer
        self.counters = counters
        self.guard = guard
        self.collector = collector
        self.health = health
        self.status = status
        self.exit_code = 0
        self._catalogue_digest = catalogue_digest(cfg)
        self._quota_pending: dict[str, int] = {}  # quota drops not yet in the audit log
        self._quota_audited: dict[str, float] = {}

    def run(self) -> None:
        """Turn until stop (or, with ``replay_exit``, until the trace's batches are all acknowledged)."""
        wd = watchdog_interval()
        t = self.timing
        last_wd = last_status = last_floor = last_retention = last_pending = last_settle = 0.0
        replay_exit = bool(self.cfg.can and self.cfg.can.replay and self.cfg.can.replay_exit)
        drain_since: float | None = None  # replay_exit: when the end of the trace was reached
        while not self.stop.is_set():
            if self.reload.is_set():
                self.reload.clear()
                self.reload_config()
            if self.intake.ready.wait(0.1):
                self.guarded(self.apply_intake)
            self.guarded(self.manager.flush_rejections)
            now = time.monotonic()
            self.guarded(self.check_consent_file)
            if self.manager.pending is not None and now - last_pending >= t.pending_retry_every_s:
                last_pending = now  # a document applied in memory whose disk part waits (a full disk)
                self.guarded(self.manager.retry_pending)
                self.uplink.wake()
            if self.manager.disk_due and self.manager.pending is None and now - last_settle >= t.pending_retry_every_s:
                last_settle = now  # the start-up erasures a full disk refused: never forgotten
                self.guarded(self.manager.settle_disk)
            self.guarded(self.manager.check_expiry)
            if now - last_retention >= t.retention_every_s:
                last_retention = now
                self.guarded(self.retention)
                self.guarded(self.manager.finish_pending_erasures)
            self.audit_quota_drops()
            if now - last_status >= t.status_every_s:
                last_status = now
                self.guarded(self.store_rule_counts)
                self.status.write()
            if now - last_floor >= t.floor_every_s:
                last_floor = now
                self.persist_floor()
            if self.collector is None:
                self.guard.flush_due()  # no collector thread to do it
            elif self.health.check_silence(now):
                self.status.write()
            if self.health.update(now):
                self.uplink.publish_status()
            if wd is not None and self.health.healthy and now - last_wd >= wd:
                last_wd = now
                notify("WATCHDOG=1")
            if replay_exit and self.collector is not None and self.collector.done.is_set():
                # The drain is a state of this loop, not a wait beside it: consent documents, expiry, the
                # watchdog and SIGTERM are handled on every turn until the outbox is empty.
                if drain_since is None:
                    drain_since = now
                    log.info("end of trace: waiting for every batch to be acknowledged")
                if self.drained():
                    return
                self.uplink.wake()
                if now - drain_since >= t.replay_drain_s:
                    log.error("end of trace: outbox not drained within %g s", t.replay_drain_s)
                    self.exit_code = 1
                    return

    def drained(self) -> bool:
        """The outbox holds no batch or receipt waiting for the broker (a full disk: not yet known, False)."""
        try:
            return not self.outbox.stats() and self.outbox.receipt_count() == 0
        except StorageError:
            return False

    def guarded(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Main-loop work that writes the state dir: a full or read-only disk is logged, never fatal."""
        try:
            fn(*args, **kwargs)
        except StorageError as exc:
            self.writer.storage_failed(exc)

    # -- consent documents ------------------------------------------------------------------------------

    def apply_intake(self) -> None:
        """Apply what the MQTT intake holds, until it is empty: the newest verified document wins.

        Rejections on arrival are recorded per reason with their count (the manager coalesces them). Versions
        a newer one superseded before they were applied are counted, never applied. A few rounds per main-loop
        turn at most: a flood that never stops must not starve expiry and the watchdog (the rest waits one turn).
        """
        try:
            self._apply_intake()
        finally:
            self.intake.done()
            # Now settled (vgw.state.consent.intake): the uplink sleeps until rung, and its stored batches may wait
            # for this.
            self.uplink.wake()

    def _apply_intake(self) -> None:
        for _ in range(INTAKE_ROUNDS):
            taken = self.intake.take()
            if not taken:
                return
            superseded = taken.superseded
            for rejected in taken.rejected.values():
                self.manager.reject(rejected.last, source="mqtt", count=rejected.count)
            for i, consent in enumerate(taken.candidates):
                skipped = taken.skipped + [(c.ver, c.grant_ids) for c in taken.candidates[i + 1:]]
                if self.manager.apply(consent.token, source="mqtt", skipped=skipped).status != "rejected":
                    superseded += len(taken.candidates) - i - 1
                    break
            self.counters.add("consent_superseded", superseded)

    def check_consent_file(self) -> None:
        """A document handed over by `vgw consent apply` (the inbox file): verify and apply it, then remove it.

        Only this process writes consent.jws while it runs, so a hand-over can never overwrite a newer
        document that arrived over MQTT meanwhile; a rejected hand-over is reported once, not in a loop.
        """
        token = self.store.read_inbox()
        if token is None:
            return
        try:
            self.manager.apply(token, source="file")
        finally:
            self.store.clear_inbox()
        self.uplink.wake()

    # -- stored data ------------------------------------------------------------------------------------

    def retention(self) -> None:
        """Delete each grant's batches older than its retention (counted and audited), and undecryptable rows."""
        self.outbox.drop_undecryptable()
        now = time.time()
        for g in self.manager.active_grants():
            if g.retention_s:
                n = self.outbox.delete_older_than(g.id, now - g.retention_s)
                if n:
                    self.outbox.count(f"retention_deleted:{g.id}", n)
                    self.audit.append("retention-delete", grant=g.id, batches_deleted=n, retention_s=g.retention_s)

    def store_rule_counts(self) -> None:
        """Add what the collection rules counted since the last time to the outbox's counters (the report's)."""
        self.guard.store_rule_counts(self.outbox.count_many)

    def audit_quota_drops(self, *, force: bool = False) -> None:
        """Audit the writer's quota drops: one entry per grant per ``timing.quota_audit_every_s`` at most
        (all: ``force``)."""
        now = time.monotonic()
        quota = self.cfg.outbox.quota_bytes
        for gid, n in self.writer.take_quota_drops().items():
            self._quota_pending[gid] = self._quota_pending.get(gid, 0) + n
        for gid, n in list(self._quota_pending.items()):
            last = self._quota_audited.get(gid)
            if force or last is None or now - last >= self.timing.quota_audit_every_s:
                if last is None:
                    log.warning("outbox over its quota of %d bytes: dropping the oldest batches of grant %s",
                                quota, gid)
                self._audit_event("outbox-quota-drop", grant=gid, batches_dropped=n, quota_bytes=quota)
                self._quota_audited[gid] = now
                del self._quota_pending[gid]

    def persist_floor(self) -> None:
        """Move the clock floor to now and persist it (a full disk skips it; the next turn tries again)."""
        self.store.now()
        try:
            self.store.persist()
        except StorageError:
            pass

    # -- reload -----------------------------------------------------------------------------------------

    def reload_config(self) -> None:
        """SIGHUP: apply ``[log] level``; name what else changed and needs a restart (vgw.daemon.agent, Reload)."""
        try:
            new = load_config(self.cfg.path)
        except VgwError as exc:
            log.error("reload: %s; the running configuration stays", exc)
            return
        if apply_config_level(new.log_level):
            log.info("reload: log level %s", new.log_level)
        changed = [f"[{name}]" for name in ("device", "can", "obd", "mqtt", "consent", "batch", "outbox")
                   if getattr(new, name) != getattr(self.cfg, name)]
        if catalogue_digest(new) != self._catalogue_digest:
            changed.append("the DBC/signal map files")
        if changed:
            log.warning("reload: %s changed; restart the agent to apply (systemctl restart vgw-agent)",
                        ", ".join(changed))
        else:
            log.info("reload: configuration re-read; nothing else changed")


def catalogue_digest(cfg: Config) -> str:
    """A digest of the DBC and signal map files' bytes (a reload compares it). A file that cannot be read as
    the loaders read it (missing, a FIFO, a device, over its cap) counts as changed and is not read: a FIFO must
    not block the main loop, nor /dev/zero fill memory."""
    h = hashlib.sha256()
    files = [(p, MAX_DBC_BYTES) for p in cfg.can.dbc] + [(cfg.can.signal_map, MAX_CONFIG_BYTES)] if cfg.can else []
    for path, cap in files:
        try:
            h.update(read_small_file(path, what="file", max_bytes=cap))
        except (OSError, VgwError):
            h.update(b"unreadable:" + str(path).encode())
    return h.hexdigest()
