"""The agent daemon (`vgw run`): wires source -> pipeline -> outbox -> uplink under the consent manager.

Threads:
  collector  reads the source, routes/decodes/batches under ``self._lock``, seals and commits full batches.
  uplink     owns the MQTT connection (agent.uplink).
  main       consent documents (MQTT intake, the cache file written by `vgw consent apply`), expiry,
             retention, status file, clock floor, systemd watchdog, signals.

A revocation takes ``self._lock``: once it holds it no frame is half-processed, it swaps the router and drops
the grant's open batch; then the manager erases the grant on disk.

Faults (what each costs is in docs/guarantees.md; tests/test_faults_*.py prove it):
  corrupt outbox      integrity_check at start; quarantined, audited, fresh file with the salvaged seqs.
  outbox over quota   the committing grant's oldest batches go, counted ``dropped_quota:<g>``, audited
                      (one entry per grant per minute at most) and shown by `vgw status`.
  disk full/read-only batches are counted in ``store_failures`` and not stored; logged and audited once when
                      it starts and once when it recovers; ``storage`` in status.json says which.
  bus down/bus-off    SourceReadError: close, wait ``[can] reopen_s``, reopen; error frames are counted.
  bad frame           malformed input (SourceFrameError) or a frame the pipeline fails on: counted in
                      ``frames_malformed``/``frames_failed``, skipped, logged at most once a minute;
                      BAD_FRAMES_REOPEN in a row reopen the source.
  stalled collector   the collector beats once per loop (a quiet bus still beats); no beat for
                      COLLECTOR_STALL_S, or a dead thread: health not ok in status.json, no WATCHDOG=1, so
                      systemd restarts the agent.
  silent bus          no frame for ``[can] silent_s``: logged once, ``bus.silent`` in status.json (a wrong
                      channel, an unplugged cable, a simulator on another bus); cleared when frames come back.
  SIGTERM             collector stopped, open batches committed, up to 2 s to hand them to a live link,
                      status offline, exit 0. SIGKILL loses at most the batches not yet committed.

Reload (SIGHUP, `systemctl reload vgw-agent`): the config file is read again. ``[log] level`` applies at once
(unless --log-level/--debug pinned it). Everything else -- and the DBC and signal map files -- is only
compared and named in a warning: the collector's open batches, the bus's frame allow-list and the consent
filter are all built from the catalogue and the source, and swapping them mid-stream would mix two decodings
in one batch. A restart commits the open batches first (SIGTERM above), so it is the safe way to apply them.
A config that no longer loads is logged and the running one stays.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import can
from vgw.audit import AuditLog
from vgw.catalogue import Catalogue, load_catalogue
from vgw.config import Config, load_config
from vgw.consent.intake import ConsentIntake
from vgw.consent.manager import ConsentManager, load_trust_keys
from vgw.consent.narrowing import terms_digest
from vgw.consent.store import ConsentStore
from vgw.crypto.envelope import batch_plaintext, load_recipient_key, seal
from vgw.crypto.keys import load_or_create_storage_key
from vgw.crypto.receipts import ReceiptSigner
from vgw.errors import SourceError, SourceFrameError, SourceReadError, StorageError, VgwError
from vgw.fsutil import atomic_write, ensure_private_dir
from vgw.j1939.request import Requester
from vgw.logs import apply_config_level
from vgw.outbox import GrantNotActive, Outbox, OutboxUnwritable, open_checked
from vgw.pipeline.router import GrantBatch, Pipeline
from vgw.sdnotify import notify, watchdog_interval
from vgw.sources.canbus import BusSource
from vgw.uplink import Uplink

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
RECOVERED_AFTER_STORES = 3  # consecutive stored batches before a storage fault counts as over
LOCK_FILE = "agent.lock"
OUTBOX_FILE = "outbox.sqlite"
QUOTA_AUDIT_EVERY_S = 60.0  # at most one quota-drop audit entry per grant per minute (the counter is exact)
INTAKE_ROUNDS = 8  # consent intake emptied at most this often per main-loop turn
SHUTDOWN_SEND_S = 2.0  # on SIGTERM, how long a live link may take to send what was just flushed
COLLECTOR_STALL_S = 10.0  # no collector loop iteration for this long: stalled (health not ok, watchdog not fed)
BAD_FRAMES_REOPEN = 100  # this many malformed frames in a row with nothing good between: reopen the source
FRAME_ERROR_LOG_EVERY_S = 60.0  # per-frame errors are counted exactly but logged at most this often


class AgentLock:
    """An exclusive flock on the state dir: one `vgw run` per state dir; `vgw consent apply` checks it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        try:
            # O_NOFOLLOW: a link planted here must never make us truncate its target (docs/guarantees.md).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot open the agent lock: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def held_by_other(state_dir: Path) -> bool:
        """True while a `vgw run` holds the lock; reads only (a shared flock on a read-only descriptor)."""
        try:
            fd = os.open(state_dir / LOCK_FILE, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"{state_dir / LOCK_FILE}: cannot open the agent lock: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def open_state(cfg: Config, *, check: bool = False) -> tuple[Outbox, AuditLog, ConsentStore, ReceiptSigner]:
    """Open the state directory's parts (shared by `vgw run` and the CLI commands).

    ``check`` (`vgw run` only): integrity-check the outbox first and quarantine a corrupt one (audited).
    """
    ensure_private_dir(cfg.state_dir)
    storage_key = load_or_create_storage_key(cfg.device.storage_key)
    audit = AuditLog(cfg.state_dir)
    if check:
        outbox, quarantined = open_checked(cfg.state_dir / OUTBOX_FILE, storage_key, cfg.device.id)
        if quarantined is not None:
            audit.append("outbox-quarantined", file=quarantined.file.name, reason=quarantined.reason[:200],
                         seqs_recovered=len(quarantined.seqs_recovered))
    else:
        outbox = Outbox(cfg.state_dir / OUTBOX_FILE, storage_key, cfg.device.id)
    store = ConsentStore(cfg.state_dir)
    signer = ReceiptSigner.from_file(cfg.device.id, cfg.mqtt.key_file)
    return outbox, audit, store, signer


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = cfg.device.id
        ensure_private_dir(cfg.state_dir)
        self.lock_file = AgentLock(cfg.state_dir)
        if not self.lock_file.acquire():
            raise StorageError(f"{cfg.state_dir}: another `vgw run` is using this state directory")
        try:
            self.outbox, self.audit, self.store, self.signer = open_state(cfg, check=True)
            self.catalogue: Catalogue | None = None
            if cfg.can is not None:
                self.catalogue = load_catalogue(cfg.can.dbc, cfg.can.signal_map, strict=cfg.can.dbc_strict)
            trust = load_trust_keys(cfg.consent.trust_keys)
        except BaseException:
            self.lock_file.release()
            raise
        self.pipeline = Pipeline(self.catalogue)
        # Which scope each path belongs to: counted per batch for the privacy report (counts, never values).
        self._scope_of: dict[str, str] = self.catalogue.scope_of_path() if self.catalogue else {}
        if cfg.obd is not None:
            from vgw.obd.pids import DTC_PATH, PENDING_DTC_PATH, PIDS, VIN_PATH

            self._scope_of.update({p.path: p.scope for p in PIDS})
            self._scope_of.update({VIN_PATH: "read_vin", DTC_PATH: "read_diagnostics",
                                   PENDING_DTC_PATH: "read_diagnostics"})
        self._obd: Any = None
        self._lock = threading.Lock()
        self._recipients: dict[str, Any] = {}
        self.manager = ConsentManager(device=self.device, store=self.store, outbox=self.outbox, audit=self.audit,
                                      signer=self.signer, trust_keys=trust, on_revoke=self._on_revoke,
                                      on_change=self._on_consent_change)
        # Documents from MQTT are judged on arrival and the newest verified one always survives (intake.py).
        self.intake = ConsentIntake(trust_keys=trust, device=self.device,
                                    clock=lambda: max(time.time(), self.store.floor))
        self.uplink = Uplink(cfg.mqtt, self.device, self.outbox, on_consent=self.intake.offer,
                             status_payload=self._public_status)
        self._stop = threading.Event()
        self._reload = threading.Event()  # set by SIGHUP, handled by the main loop
        self._catalogue_digest = _catalogue_digest(cfg)
        self._source_done = threading.Event()
        self._collector: threading.Thread | None = None
        self.counters: dict[str, int] = {"batches": 0, "batches_discarded": 0, "store_failures": 0,
                                         "consent_superseded": 0, "source_errors": 0, "batches_failed": 0,
                                         "error_frames": 0, "remote_frames": 0, "rx_overflow": 0, "quota_dropped": 0,
                                         "frames_malformed": 0, "frames_failed": 0}
        self.storage_error: str | None = None  # why the outbox cannot store now (None: it can)
        self._store_failures_at_error = 0
        self._stores_since_error = 0
        self._quota_pending: dict[str, int] = {}  # drops not yet in the audit log
        self._quota_audited: dict[str, float] = {}
        self._quota_view: dict[str, int] = {"quota_bytes": cfg.outbox.quota_bytes, "used_bytes": 0}
        self._quota_view_at = 0.0
        self.healthy = True
        self.health_problem: str | None = None  # why the agent is not healthy (None: it is)
        self.collector_stall_s = COLLECTOR_STALL_S
        self._collector_beat = time.monotonic()  # monotonic time of the collector loop's last iteration
        self._frame_at = self._collector_beat  # monotonic time the source last delivered a frame
        self.bus_silent = False
        self._frame_errors_logged = 0.0
        self._frame_errors_unlogged = 0
        self.exit_code = 0
        self._source: Any = None

    # -- consent hooks ------------------------------------------------------------------------------

    def _apply_intake(self) -> None:
        """Apply what the MQTT intake holds, until it is empty: the newest verified document wins.

        Rejections on arrival are recorded per reason with their count (the manager coalesces them). Versions
        a newer one superseded before they were applied are counted, never applied. A few rounds per main-loop
        turn at most: a flood that never stops must not starve expiry and the watchdog (the rest waits one turn).
        """
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
            self.counters["consent_superseded"] += superseded
            self.uplink.wake()

    def _on_revoke(self, grant_ids: frozenset[str]) -> None:
        with self._lock:
            if self.pipeline is not None:
                remaining = tuple(g for g in self.manager.active_grants() if g.id not in grant_ids)
                self.pipeline.swap(remaining)
                self._install_filters()
            for gid in grant_ids:
                self._recipients.pop(gid, None)
        log.info("collection stopped for %d grant(s); in-memory batches dropped", len(grant_ids))

    def _on_consent_change(self) -> None:
        self.intake.set_in_force(self.manager.in_force)
        grants = self.manager.active_grants()
        with self._lock:
            self._recipients = {g.id: load_recipient_key(g.recipient.kem, g.recipient.pk) for g in grants}
            if self.pipeline is not None:
                self.pipeline.swap(grants)
                self._install_filters()
        self.uplink.publish_status()  # the retained status names the consent in force (README "Topics")
        self.uplink.wake()

    def _install_filters(self) -> None:
        if self._source is not None and self.pipeline is not None:
            self._source.set_filters(self.pipeline.router.frames)

    # -- batches ------------------------------------------------------------------------------------

    def _flush(self, batches: list[GrantBatch]) -> None:
        """Seal and commit batches. Called with self._lock held."""
        for batch in batches:
            samples = batch.take()
            if not samples:
                continue
            grant = batch.grant
            recipient = self._recipients.get(grant.id)
            if recipient is None:
                continue
            kem = grant.recipient.kem

            def make(seq: int, _s: list[dict[str, Any]] = samples, _g: str = grant.id, _k: str = kem,
                     _r: Any = recipient) -> bytes:
                return seal(_k, _r, self.device, _g, batch_plaintext(self.device, _g, seq, _s,
                                                                     epoch=self.outbox.epoch))

            per_scope: dict[str, int] = {}
            for sample in samples:
                scope = self._scope_of.get(sample["path"], "")
                per_scope[scope] = per_scope.get(scope, 0) + 1
            try:
                committed = self.outbox.commit_batch(grant.id, make, batch.first_t, len(samples),
                                                     quota_bytes=self.cfg.outbox.quota_bytes, scopes=per_scope,
                                                     terms=terms_digest(grant))
            except GrantNotActive:
                self.counters["batches_discarded"] += 1
            except StorageError as exc:
                self.counters["store_failures"] += 1
                self._stores_since_error = 0
                self._storage_failed(exc)
            except Exception:  # one bad batch must never stop the collector (it would stop all collection)
                self.counters["batches_failed"] += 1
                if self.counters["batches_failed"] == 1:
                    log.exception("a batch of grant %s could not be sealed and was dropped", grant.id)
            else:
                self.counters["batches"] += 1
                if self.storage_error is not None:
                    # A nearly full disk can take one small batch now and then; only a run of successes
                    # means it recovered (else the log and the audit would flap with every batch).
                    self._stores_since_error += 1
                    if self._stores_since_error >= RECOVERED_AFTER_STORES:
                        self._storage_recovered()
                for gid, n in committed.dropped.items():
                    self.counters["quota_dropped"] += n
                    self._quota_pending[gid] = self._quota_pending.get(gid, 0) + n
        self.uplink.wake()

    def _storage_failed(self, exc: StorageError) -> None:
        # Logged and audited when the state changes, not per batch: a full disk must not fill the journal.
        if self.storage_error is None:
            kind = exc.kind if isinstance(exc, OutboxUnwritable) else "io"
            self.storage_error = str(exc)
            self._store_failures_at_error = self.counters["store_failures"] - 1
            log.error("outbox cannot store (%s): %s; new batches are counted and dropped until it can", kind, exc)
            self._audit("outbox-unwritable", kind=kind)

    def _storage_recovered(self) -> None:
        lost = self.counters["store_failures"] - self._store_failures_at_error
        log.warning("outbox stores again; %d batch(es) were not stored meanwhile", lost)
        self.storage_error = None
        self._audit("outbox-recovered", batches_not_stored=lost)

    def _audit(self, event: str, **fields: Any) -> None:
        try:
            self.audit.append(event, **fields)
        except StorageError as exc:  # the same full disk: the counters and the log still tell
            log.debug("audit entry %s not written: %s", event, exc)

    def _audit_quota_drops(self, *, force: bool = False) -> None:
        now = time.monotonic()
        for gid, n in list(self._quota_pending.items()):
            last = self._quota_audited.get(gid)
            if force or last is None or now - last >= QUOTA_AUDIT_EVERY_S:
                if last is None:
                    log.warning("outbox over its quota of %d bytes: dropping the oldest batches of grant %s",
                                self.cfg.outbox.quota_bytes, gid)
                self._audit("outbox-quota-drop", grant=gid, batches_dropped=n,
                            quota_bytes=self.cfg.outbox.quota_bytes)
                self._quota_audited[gid] = now
                del self._quota_pending[gid]

    # -- collector thread ---------------------------------------------------------------------------

    def _collect(self) -> None:
        """The collector thread: open the source, read, route, flush; reopen on failure. Never ends on one bad
        frame or one failing session: only stop, or the end of a finite trace, ends it."""
        assert self.cfg.can is not None and self.pipeline is not None
        from vgw.errors import SourceEndedError
        from vgw.sources import open_source

        can_cfg = self.cfg.can
        # README "SAE J1939": requests (PGN 59904) only when the config allows them; rate-limited across reopens.
        requester = Requester(can_cfg.j1939_address) if can_cfg.j1939_requests and \
            can_cfg.j1939_address is not None else None
        while not self._stop.is_set():
            self._collector_beat = time.monotonic()
            try:
                self._source = open_source(can_cfg)
            except SourceEndedError as exc:  # a trace that cannot be opened, with replay_exit: end non-zero
                log.error("%s; ending (replay_exit)", exc)
                self.exit_code = 1
                self._source_done.set()
                return
            except SourceError as exc:
                self.counters["source_errors"] += 1
                log.error("%s; retrying in %.1f s", exc, can_cfg.reopen_s)
                self._pause(can_cfg.reopen_s)
                continue
            source = self._source
            try:
                with self._lock:
                    self._install_filters()
                if self._read_source(source, requester):
                    return
            except SourceError as exc:
                self.counters["source_errors"] += 1
                log.error("%s; reopening in %.1f s", exc, can_cfg.reopen_s)
                self._pause(can_cfg.reopen_s)
            except Exception as exc:  # a defect must not end collection: count it, reopen, and say so
                self.counters["source_errors"] += 1
                log.error("collector failed (%s); reopening the source in %.1f s", type(exc).__name__,
                          can_cfg.reopen_s)
                self._pause(can_cfg.reopen_s)
            finally:
                self.counters["rx_overflow"] += source.overflow
                source.close()
                self._source = None

    def _pause(self, seconds: float) -> None:
        """Wait (until stop) while still beating: waiting to reopen is progress, not a stall."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            self._collector_beat = now = time.monotonic()
            if now >= deadline:
                return
            self._stop.wait(min(1.0, deadline - now))

    def _read_source(self, source: Any, requester: Requester | None = None) -> bool:
        """Read ``source`` until stop (False) or the end of a finite trace (True, everything flushed); send the
        J1939 requests ``requester`` says are due (README "SAE J1939").

        Raises SourceReadError when the source fails or sends BAD_FRAMES_REOPEN malformed frames in a row.
        """
        pipeline, lock, stop = self.pipeline, self._lock, self._stop
        samples_seen = pipeline.counters
        max_samples, max_interval = self.cfg.batch.max_samples, self.cfg.batch.max_interval_s
        # A batch can only be full once (max_samples - largest open batch) more samples went in: look for
        # full batches only then, not after every frame (a hot-path cost measured in docs/performance.md).
        next_full_check = 0
        last_check = time.monotonic()
        bad_in_row = 0
        while not stop.is_set():
            self._collector_beat = time.monotonic()
            try:
                msg = source.recv(0.05)
            except SourceFrameError as exc:
                self.counters["frames_malformed"] += 1
                self._frame_error(str(exc))
                bad_in_row += 1
                if bad_in_row >= BAD_FRAMES_REOPEN:
                    raise SourceReadError(f"{bad_in_row} malformed frames in a row") from exc
                continue
            bad_in_row = 0
            if msg is not None and msg.is_error_frame:
                self.counters["error_frames"] += 1  # bus errors, bus-off notices: never data
            elif msg is not None and msg.is_remote_frame:
                self.counters["remote_frames"] += 1
            elif msg is not None:
                with lock:
                    try:
                        pipeline.process(msg.arbitration_id, bytes(msg.data), msg.timestamp, msg.is_extended_id)
                    except Exception as exc:  # one frame the pipeline cannot take must not stop collection
                        self.counters["frames_failed"] += 1
                        self._frame_error(f"a frame could not be processed ({type(exc).__name__}); skipped")
                    if samples_seen["samples"] >= next_full_check:
                        batches = pipeline.batches.values()
                        full = [b for b in batches if len(b.samples) >= max_samples]
                        if full:
                            self._flush(full)
                        largest = max((len(b.samples) for b in batches), default=0)
                        next_full_check = samples_seen["samples"] + max(1, max_samples - largest)
            now = time.monotonic()
            if msg is not None:
                self._frame_at = now
            if msg is None or now - last_check >= 0.05:
                last_check = now
                with lock:
                    due = pipeline.due(max_samples, max_interval)
                    if due:
                        self._flush(due)
                    next_full_check = 0
                    requests = requester.due(now, pipeline.granted_scopes()) if requester else ()
                if requests and isinstance(source, BusSource):
                    for can_id, data in requests:
                        source.send_j1939_request(can_id, data)
            if source.finished:
                with lock:
                    self._flush(pipeline.due(1, 0, force=True))
                self._source_done.set()
                return True
        return False

    def _frame_error(self, what: str) -> None:
        """Log a per-frame error: the first at once, then at most once per FRAME_ERROR_LOG_EVERY_S with the
        number skipped meanwhile (the counters are exact; a noisy line must not fill the journal)."""
        now = time.monotonic()
        if self._frame_errors_logged and now - self._frame_errors_logged < FRAME_ERROR_LOG_EVERY_S:
            self._frame_errors_unlogged += 1
            return
        more = f" (and {self._frame_errors_unlogged} more frame error(s) since the last report)" \
            if self._frame_errors_unlogged else ""
        log.warning("%s%s", what, more)
        self._frame_errors_logged = now
        self._frame_errors_unlogged = 0

    # -- OBD-II -------------------------------------------------------------------------------------

    def granted_scopes(self) -> frozenset[str]:
        with self._lock:
            return self.pipeline.granted_scopes()

    def offer_samples(self, samples: list[tuple[str, str, float, Any]]) -> None:
        """Samples (path, scope, t, value) from a non-CAN source, routed through the same consent policy."""
        cfg = self.cfg.batch
        with self._lock:
            for path, scope, t, value in samples:
                self.pipeline.offer(path, scope, t, value)
            due = self.pipeline.due(cfg.max_samples, cfg.max_interval_s)
            if due:
                self._flush(due)

    def _start_obd(self) -> None:
        from vgw.obd.poller import ObdPoller  # built by the OBD-II issue

        assert self.cfg.obd is not None
        self._obd = ObdPoller(self.cfg.obd, wanted_scopes=self.granted_scopes, sink=self.offer_samples,
                              stop=self._stop)
        self._obd.start()

    def _flush_due(self) -> None:
        with self._lock:
            due = self.pipeline.due(self.cfg.batch.max_samples, self.cfg.batch.max_interval_s)
            if due:
                self._flush(due)

    # -- status -------------------------------------------------------------------------------------

    def _public_status(self) -> dict[str, Any]:
        consent = self.manager.in_force
        return {"device": self.device, "consent_version": consent.ver if consent else None,
                "grants": [g.id for g in self.manager.active_grants()], "healthy": self.healthy}

    def _quota_status(self) -> dict[str, int]:
        now = time.monotonic()
        if now - self._quota_view_at >= 5.0:  # a scan of the rows' sizes: not every status tick
            self._quota_view_at = now
            try:
                self._quota_view = {"quota_bytes": self.cfg.outbox.quota_bytes, "used_bytes": self.outbox.total_bytes()}
            except Exception:  # a status view must never stop the agent
                log.debug("quota view unavailable", exc_info=True)
        return self._quota_view

    def status(self) -> dict[str, Any]:
        consent = self.manager.in_force
        pipeline = dict(self.pipeline.counters)
        source = self._source
        live_overflow = source.overflow if source is not None else 0
        up = self.uplink
        return {
            "device": self.device,
            "pid": os.getpid(),
            "updated": time.time(),
            "link": self.uplink.state,
            "link_error": self.uplink.last_error,
            "endpoint": self.uplink.endpoint,  # [mqtt] host:port in use (or last tried), README "Configuration (TOML)"
            "last_publish": self.uplink.last_publish,
            "consent_version": consent.ver if consent else None,
            "consent_expired": self.manager.expired,
            "collect": self.pipeline.rule_counts(),  # collection rules: decoded vs let through, per grant/scope
            "published": {"batches": self.uplink.published_batches, "receipts": self.uplink.published_receipts},
            "storage": {"ok": self.storage_error is None, "error": self.storage_error},
            "health": {"ok": self.health_problem is None, "problem": self.health_problem},
            "quota": self._quota_status(),
            "obd": self._obd.health() if self._obd is not None else None,
            "bus": self._bus_status(),
            "counters": {**pipeline, **self.counters, "rx_overflow": self.counters["rx_overflow"] + live_overflow,
                         "connect_attempts": up.connect_attempts, "connect_failures": up.connect_failures,
                         "mqtt_queue_full": up.queue_full, "ack_store_failures": up.ack_store_failures,
                         "mqtt_oversized_dropped": up.oversized_dropped,
                         "replayed_batches": up.replayed_batches,  # README "Replay after failover"
                         "consent_rejections_coalesced": self.manager.coalesced_rejections},
        }

    def _write_status(self) -> None:
        try:
            atomic_write(self.cfg.state_dir / STATUS_FILE, json.dumps(self.status()).encode(), mode=0o600)
        except StorageError:
            pass

    # -- main loop ----------------------------------------------------------------------------------

    def _check_consent_file(self) -> None:
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

    def _retention(self) -> None:
        self.outbox.drop_undecryptable()
        now = time.time()
        for g in self.manager.active_grants():
            if g.retention_s:
                n = self.outbox.delete_older_than(g.id, now - g.retention_s)
                if n:
                    self.outbox.count(f"retention_deleted:{g.id}", n)
                    self.audit.append("retention-delete", grant=g.id, batches_deleted=n, retention_s=g.retention_s)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or the end of a replay with replay_exit). Returns the exit code."""
        self._install_signal_handlers()
        try:
            self.manager.load_cached()
            self._on_consent_change()
            self.uplink.start()
            if self.cfg.can is not None:
                self._collector = threading.Thread(target=self._collect, name="vgw-collector", daemon=True)
                self._collector.start()
            if self.cfg.obd is not None:
                self._start_obd()
            notify("READY=1")
            log.info("agent %s running (consent v%s)", self.device,
                     self.manager.in_force.ver if self.manager.in_force else "none")
            self._main_loop()
        finally:
            self._shutdown()
        return self.exit_code

    def _main_loop(self) -> None:
        wd = watchdog_interval()
        last_wd = last_status = last_floor = last_retention = 0.0
        replay_exit = bool(self.cfg.can and self.cfg.can.replay and self.cfg.can.replay_exit)
        while not self._stop.is_set():
            if self._reload.is_set():
                self._reload.clear()
                self._reload_config()
            if self.intake.ready.wait(0.1):
                self._guarded(self._apply_intake)
            self._guarded(self.manager.flush_rejections)
            now = time.monotonic()
            self._guarded(self._check_consent_file)
            self._guarded(self.manager.check_expiry)
            if now - last_retention >= 5.0:
                last_retention = now
                self._guarded(self._retention)
                self._guarded(self.manager.finish_pending_erasures)
            self._audit_quota_drops()
            if now - last_status >= 0.5:
                last_status = now
                self._write_status()
            if now - last_floor >= 30.0:
                last_floor = now
                self.store.now()
                try:
                    self.store.persist()
                except StorageError:
                    pass
            if self.cfg.can is None:
                self._flush_due()  # no collector thread to do it
            else:
                self._check_silence(now)
            self.health_problem = self._health_problem(now)
            healthy = self.health_problem is None
            if healthy != self.healthy:
                self.healthy = healthy
                self.uplink.publish_status()
            if wd is not None and self.healthy and now - last_wd >= wd:
                last_wd = now
                notify("WATCHDOG=1")
            if replay_exit and self._source_done.is_set():
                log.info("end of trace: waiting for every batch to be acknowledged")
                if not self.uplink.drain(timeout=120.0):
                    log.error("end of trace: outbox not drained within 120 s")
                    self.exit_code = 1
                return

    def _check_silence(self, now: float) -> None:
        """Say once when the bus has delivered no frame for ``[can] silent_s``, and once when frames return."""
        can_cfg = self.cfg.can
        assert can_cfg is not None
        quiet = now - self._frame_at
        silent = bool(can_cfg.silent_s) and quiet >= can_cfg.silent_s and not self._source_done.is_set()
        if silent and not self.bus_silent:
            log.warning("CAN %s: no frame for %.0f s (check the channel, the cable or the simulator; "
                        "`vgw sim can` prints the [can] lines to use)", _source_name(can_cfg), quiet)
        elif self.bus_silent and not silent:
            log.info("CAN %s: frames again", _source_name(can_cfg))
        if silent != self.bus_silent:
            self.bus_silent = silent
            self._write_status()

    def _bus_status(self) -> dict[str, Any] | None:
        if self.cfg.can is None:
            return None
        return {"silent": self.bus_silent, "last_frame_age_s": round(time.monotonic() - self._frame_at, 1)}

    def _reload_config(self) -> None:
        """SIGHUP: apply ``[log] level``; name what else changed and needs a restart (module docstring, Reload)."""
        try:
            new = load_config(self.cfg.path)
        except VgwError as exc:
            log.error("reload: %s; the running configuration stays", exc)
            return
        if apply_config_level(new.log_level):
            log.info("reload: log level %s", new.log_level)
        changed = [f"[{name}]" for name in ("device", "can", "obd", "mqtt", "consent", "batch", "outbox")
                   if getattr(new, name) != getattr(self.cfg, name)]
        if _catalogue_digest(new) != self._catalogue_digest:
            changed.append("the DBC/signal map files")
        if changed:
            log.warning("reload: %s changed; restart the agent to apply (systemctl restart vgw-agent)",
                        ", ".join(changed))
        else:
            log.info("reload: configuration re-read; nothing else changed")

    def _health_problem(self, now: float) -> str | None:
        """Why the agent is not doing its work, or None. The watchdog is fed only while this is None.

        "Working" for the collector is its loop going round (a quiet bus is legal), not frames arriving.
        """
        collector = self._collector
        if collector is not None and not self._source_done.is_set():
            if not collector.is_alive():
                return "collector stopped"
            stalled = now - self._collector_beat
            if stalled >= self.collector_stall_s:
                return f"collector stalled for {stalled:.0f} s"
        if self._obd is not None and not self._obd.is_alive():
            return "OBD poller stopped"
        if not self.uplink.is_alive():
            return "uplink stopped"
        return None

    def _guarded(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Main-loop work that writes the state dir: a full or read-only disk is logged, never fatal."""
        try:
            fn(*args, **kwargs)
        except StorageError as exc:
            self.counters["store_failures"] += 1
            self._storage_failed(exc)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            log.info("signal %d: stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, lambda signum, frame: self._reload.set())

    def stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> None:
        notify("STOPPING=1")
        self._stop.set()
        if self._collector is not None:
            self._collector.join(5.0)
        if self._obd is not None:
            self._obd.join(5.0)
        if self.pipeline is not None:
            with self._lock:
                self._flush(self.pipeline.due(1, 0, force=True))
        self._audit_quota_drops(force=True)
        self._guarded(self.manager.flush_rejections, force=True)
        if self.uplink.state == "connected":
            self.uplink.drain(SHUTDOWN_SEND_S)  # best effort; what is not acknowledged stays in the outbox
        self.uplink.publish_offline()
        self.uplink.stop()
        self._write_status()
        try:
            self.store.now()
            self.store.persist()
        except StorageError:
            pass
        self.outbox.close()
        self.lock_file.release()
        log.info("agent stopped")


def _source_name(can_cfg: Any) -> str:
    return f"replay {can_cfg.replay.name}" if can_cfg.replay else f"{can_cfg.interface}:{can_cfg.channel}"

def _catalogue_digest(cfg: Config) -> str:
    """A digest of the DBC and signal map files' bytes (a reload compares it; unreadable files count as changed)."""
    h = hashlib.sha256()
    for path in [*cfg.can.dbc, cfg.can.signal_map] if cfg.can is not None else []:
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"unreadable:" + str(path).encode())
    return h.hexdigest()


def run_agent(cfg: Config, early: list[int] | None = None) -> int:
    """Run the agent in the foreground. ``early`` holds signals already received while starting."""
    # systemd may stop us while we are still starting: remember the request and honour it right after the
    # agent exists, so a stop is still a clean exit 0 rather than death by SIGTERM.
    early = early if early is not None else []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: early.append(signum))
    try:
        agent = Agent(cfg)
    except can.CanError as exc:
        raise VgwError(str(exc)) from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    apply_config_level(cfg.log_level)
    if early:
        log.info("signal %d during start: stopping", early[0])
        agent.stop()
    return agent.run()
