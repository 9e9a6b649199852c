"""The agent daemon (`vgw run`): wires source -> pipeline -> outbox -> uplink under the consent manager.

Threads (each part is a module of vgw.daemon whose docstring names the thread that owns it and the lock it
takes; ``Agent`` below only builds and wires them, starts them in ``run`` and stops them in ``_shutdown``):
  collector  vgw-collector (vgw.daemon.collector.Collector): reads the source in chunks (``recv_many``),
             routes/decodes/batches each chunk under the agent lock (one lock per chunk), hands full or due
             batches to the writer. Owns the source.
  pipeline   vgw.daemon.locked_pipeline.PipelineGuard: the pipeline, recipients and frame filters behind the
             agent lock (``self._lock``); every thread that touches the pipeline comes in through it.
  writer     vgw-writer (vgw.daemon.writer.BatchWriter): seals (README "Telemetry envelope" v2) and stores
             batches in grouped outbox transactions, off the collector, so fsync never stalls collection; owns
             the storage-fault state. Its queue has its own lock; a revocation empties it under the agent lock.
  uplink     vgw-uplink (vgw.uplink.link.Uplink): the one owner of the MQTT client and its socket; it drives paho
             itself (select on the socket and a doorbell; paho starts no thread) and sleeps until a packet, the
             doorbell or one of its timers. Others never call the client: they ring the doorbell (``wake`` for
             new rows or receipts, ``publish_status``, ``stop``) and read ``view()``, an immutable snapshot. It
             calls in only through the consent intake (its own lock: offer, and settled before stored batches go
             out after a connect) and the public status (reads).
  OBD        the OBD-II poller (vgw.sources.obd.poller), when configured: offers samples under the agent lock.
  main       the supervisor (vgw.daemon.supervisor): consent documents (MQTT intake, the inbox file written by
             `vgw consent apply`), expiry, retention, pending erasures, quota audits, the status file
             (vgw.daemon.status), the clock floor, health and the systemd watchdog (vgw.daemon.health), reload.
  signals    vgw.daemon.signals.DaemonSignals, the one place handlers are installed: `vgw` installs them before
             it parses its arguments, ``run`` routes them to this agent's stop and reload events.
  ``counters`` is a vgw.daemon.counters.Counters: every thread adds with ``add`` under its lock, never ``+=``.

A revocation takes the agent lock: once it holds it no chunk is half-processed; it swaps the router, drops the
grant's open batch and its batches queued for the writer; then the manager erases the grant on disk (a batch
the writer is storing at that moment is refused at commit or deleted by the erasure).

Faults (what each costs is in docs/guarantees.md; tests/test_faults_*.py prove it):
  corrupt outbox      integrity_check at start; quarantined, audited, fresh file with the salvaged seqs.
  outbox over quota   the committing grant's oldest batches go, counted ``dropped_quota:<g>``, audited
                      (one entry per grant per minute at most) and shown by `vgw status`.
  disk full/read-only batches are counted in ``store_failures`` and not stored; logged and audited once when
                      it starts and once when it recovers; ``storage`` in status.json says which. A consent
                      document whose disk part fails stays pending (vgw.state.consent.pending): stopped in memory,
                      retried every second, its record kept in space reserved at start.
  bus down/bus-off    SourceReadError: close, wait ``[can] reopen_s``, reopen; error frames are counted.
  bad frame           malformed input (SourceFrameError) or a frame the pipeline fails on: counted in
                      ``frames_malformed``/``frames_failed``, skipped, logged at most once a minute;
                      BAD_FRAMES_REOPEN in a row reopen the source.
  stalled collector   the collector beats once per loop (a quiet bus still beats); no beat for
                      ``timing.collector_stall_s`` (vgw.daemon.timing), or a dead thread: health not ok in
                      status.json, no WATCHDOG=1, so systemd restarts the agent.
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

import logging
import threading
import time
from typing import Any

import can

from vgw.base.errors import StorageError, VgwError
from vgw.base.fsutil import ensure_private_dir
from vgw.base.logs import apply_config_level
from vgw.config.settings import Config
from vgw.contract.consent.model import version_text
from vgw.daemon.collector import BAD_FRAMES_REOPEN, CHUNK_FRAMES, FRAME_ERROR_LOG_EVERY_S, Collector
from vgw.daemon.counters import Counters
from vgw.daemon.health import COLLECTOR_STALL_S, Health
from vgw.daemon.locked_pipeline import PipelineGuard
from vgw.daemon.sdnotify import notify
from vgw.daemon.signals import DaemonSignals
from vgw.daemon.status import StatusView
from vgw.daemon.supervisor import INTAKE_ROUNDS, QUOTA_AUDIT_EVERY_S, Supervisor
from vgw.daemon.timing import DEFAULT_TIMING, Timing
from vgw.daemon.writer import BatchWriter
from vgw.pipeline.catalogue import Catalogue, load_catalogue
from vgw.state.consent.intake import ConsentIntake
from vgw.state.consent.manager import ConsentManager, load_trust_keys
from vgw.state.outbox.startup import room_fault
from vgw.state.statedir import LOCK_FILE, OUTBOX_FILE, STATUS_FILE, AgentLock, open_state
from vgw.uplink.link import Uplink
from vgw.uplink.renewal import Renewal

# Names other modules and tests import from here (the parts moved to vgw.daemon).
__all__ = ["BAD_FRAMES_REOPEN", "CHUNK_FRAMES", "COLLECTOR_STALL_S", "FRAME_ERROR_LOG_EVERY_S", "INTAKE_ROUNDS",
           "LOCK_FILE", "OUTBOX_FILE", "QUOTA_AUDIT_EVERY_S", "SHUTDOWN_SEND_S", "STATUS_FILE", "Agent",
           "AgentLock", "Timing", "open_state", "run_agent"]

log = logging.getLogger(__name__)

SHUTDOWN_SEND_S = DEFAULT_TIMING.shutdown_send_s  # on SIGTERM, how long a live link may take to send what was flushed
ROOM_RETRY_FIRST_S = 1.0  # a full or read-only state file system at start: first retry, then doubling
ROOM_RETRY_MAX_S = 10.0


class Agent:
    """The daemon's owner: builds its parts (vgw.daemon), wires them, runs them, stops them.

    Constructed and run on one thread (the main thread under `vgw run`); :meth:`stop` may be called from any
    thread. ``_lock`` is the agent lock (:class:`vgw.daemon.locked_pipeline.PipelineGuard`); the consent manager's hooks
    below run on whichever thread applies a document (the main loop) and take it through the guard.
    """

    def __init__(self, cfg: Config, signals: DaemonSignals | None = None, *, timing: Timing = DEFAULT_TIMING) -> None:
        self.cfg = cfg
        self.timing = timing  # the main loop's periods (vgw.daemon.timing): the defaults, or shorter in tests
        self.device = cfg.device.id
        self.signals = signals if signals is not None else DaemonSignals()
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
        self._obd: Any = None
        self._stop = threading.Event()
        self._reload = threading.Event()  # set by SIGHUP, handled by the main loop
        self.manager = ConsentManager(device=self.device, store=self.store, outbox=self.outbox, audit=self.audit,
                                      signer=self.signer, trust_keys=trust, on_revoke=self._on_revoke,
                                      on_change=self._on_consent_change)
        # Documents from MQTT are judged on arrival and the newest verified one always survives (intake.py).
        self.intake = ConsentIntake(trust_keys=trust, device=self.device,
                                    clock=lambda: max(time.time(), self.store.floor),
                                    floor_ver=lambda: self.store.max_ver)
        self.renewal = Renewal(cfg.mqtt, self.device, cfg.state_dir, audit=self._audit, on_renewed=self.signer.use_key)
        self.uplink = Uplink(cfg.mqtt, self.device, self.outbox, on_consent=self.intake.offer,
                             status_payload=self._public_status, consent_settled=self.intake.settled,
                             renewal=self.renewal)
        self.outbox.on_receipt = self.uplink.wake  # receipts the consent manager queues go out without a poll
        # Added to by the collector, the writer, the main loop and the OBD poller: a thread-safe object.
        self.counters = Counters(("batches", "batches_discarded", "store_failures", "consent_superseded",
                                  "source_errors", "batches_failed", "error_frames", "remote_frames", "rx_overflow",
                                  "quota_dropped", "frames_malformed", "frames_failed"))
        self.writer = BatchWriter(device=self.device, outbox=self.outbox, counters=self.counters,
                                  quota_bytes=cfg.outbox.quota_bytes, audit=self._audit, on_stored=self.uplink.wake,
                                  seal_workers=cfg.agent.seal_workers, timing=timing)
        self.guard = PipelineGuard(catalogue=self.catalogue, obd=cfg.obd is not None, writer=self.writer,
                                   batch=cfg.batch)
        self.pipeline = self.guard.pipeline
        # Limits hold across restarts: when each path last sent under a max_hz limit (README "Limits hold across
        # updates").
        self.pipeline.seed_marks(self.outbox.rate_marks())
        self._lock = self.guard.lock
        self.collector: Collector | None = None
        if cfg.can is not None:
            self.collector = Collector(can_cfg=cfg.can, batch=cfg.batch, guard=self.guard, counters=self.counters,
                                       writer=self.writer, stop=self._stop)
        self.health = Health(collector=self.collector, writer=self.writer, uplink=self.uplink, obd=self._get_obd,
                             can_cfg=cfg.can, timing=timing)
        self.status_view = StatusView(cfg=cfg, manager=self.manager, guard=self.guard, collector=self.collector,
                                      uplink=self.uplink, outbox=self.outbox, writer=self.writer,
                                      counters=self.counters, health=self.health, obd=self._get_obd, timing=timing)
        self.supervisor = Supervisor(cfg=cfg, stop=self._stop, reload=self._reload, intake=self.intake,
                                     manager=self.manager, store=self.store, outbox=self.outbox, audit=self.audit,
                                     audit_event=self._audit, uplink=self.uplink, writer=self.writer,
                                     counters=self.counters, guard=self.guard, collector=self.collector,
                                     health=self.health, status=self.status_view, timing=timing)

    # -- what tests, tools and `vgw status` read ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.status_view.snapshot()

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    @property
    def storage_error(self) -> str | None:
        """Why the outbox cannot store now (None: it can)."""
        return self.writer.storage_error

    @property
    def exit_code(self) -> int:
        return max(self.collector.exit_code if self.collector is not None else 0, self.supervisor.exit_code)

    def _get_obd(self) -> Any:
        return self._obd

    def _public_status(self) -> dict[str, Any]:
        return self.status_view.public()

    # -- consent hooks (the thread applying a document: the main loop) ----------------------------------

    def _on_revoke(self, grant_ids: frozenset[str]) -> None:
        remaining = tuple(g for g in self.manager.active_grants() if g.id not in grant_ids)
        self.guard.revoke(grant_ids, remaining)

    def _on_consent_change(self) -> None:
        self.intake.set_in_force(self.manager.in_force)
        self.guard.set_grants(self.manager.active_grants())
        self.uplink.publish_status()  # the retained status names the consent in force (README "Topics")
        self.uplink.wake()

    def _audit(self, event: str, **fields: Any) -> None:
        try:
            self.audit.append(event, **fields)
        except StorageError as exc:  # the same full disk: the counters and the log still tell
            log.debug("audit entry %s not written: %s", event, exc)

    # -- OBD-II (the poller's thread) -----------------------------------------------------------------

    def granted_scopes(self) -> frozenset[str]:
        return self.guard.granted_scopes()

    def offer_samples(self, samples: list[tuple[str, str, float, Any]]) -> None:
        """Samples (path, scope, t, value) from a non-CAN source, routed through the same consent policy."""
        self.guard.offer_samples(samples)

    def _start_obd(self) -> None:
        from vgw.sources.obd.poller import ObdPoller  # imported only when [obd] is configured

        assert self.cfg.obd is not None
        self._obd = ObdPoller(self.cfg.obd, wanted_scopes=self.guard.granted_scopes, sink=self.guard.offer_samples,
                              stop=self._stop)
        self._obd.start()

    # -- run and stop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or the end of a replay with replay_exit). Returns the exit code."""
        if self.signals.install():  # the main thread only: an agent run in another thread is stopped by stop()
            self.signals.attach(self._stop, self._reload)
        try:
            try:
                # Room for a pending consent document's record, taken while there is room (vgw.state.consent.pending).
                self.store.pending_apply.reserve()
            except StorageError as exc:
                log.warning("no room reserved for a pending consent document: %s", exc)
            try:
                self.manager.load_cached()
            except StorageError as exc:  # a full or read-only disk at start: run, say so, retry (guarantees.md)
                self.writer.storage_failed(exc)
            self._on_consent_change()
            self.uplink.start()
            self.writer.start()
            if self.collector is not None:
                self.collector.start()
            if self.cfg.obd is not None:
                self._start_obd()
            notify("READY=1")
            in_force = self.manager.in_force
            log.info("agent %s running (%s)", self.device,
                     f"{version_text(in_force.ver)} in force" if in_force else version_text(None))
            self.supervisor.run()
        finally:
            self._shutdown()
        return self.exit_code

    def stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> None:
        notify("STOPPING=1")
        self._stop.set()
        if self.collector is not None and self.collector.thread is not None:
            self.collector.thread.join(5.0)
        if self._obd is not None:
            self._obd.join(5.0)
        self.guard.flush_all()
        self.writer.close()
        self.supervisor.guarded(self.supervisor.store_rule_counts)
        self.supervisor.audit_quota_drops(force=True)
        self.supervisor.guarded(self.manager.flush_rejections, force=True)
        if self.uplink.view().state == "connected":
            self.uplink.drain(self.timing.shutdown_send_s)  # best effort; what is not acknowledged stays in the outbox
        self.uplink.stop()  # the owner thread publishes the offline status first (the will covers crashes)
        self.status_view.write()
        try:
            self.store.now()
            self.store.persist()
        except StorageError:
            pass
        self.outbox.close()
        self.lock_file.release()
        log.info("agent stopped")


def run_agent(cfg: Config, signals: DaemonSignals | None = None) -> int:
    """Run the agent in the foreground. ``signals``: the handlers `vgw` installed while starting (a stop
    requested meanwhile is honoured as soon as the agent exists); without them they are installed here."""
    signals = signals if signals is not None else DaemonSignals()
    signals.install()
    agent = _open_agent(cfg, signals)
    if agent is None:
        return 0  # stopped while it waited for room
    apply_config_level(cfg.log_level)
    return agent.run()


def _open_agent(cfg: Config, signals: DaemonSignals) -> Agent | None:
    """The agent, once its state directory can be opened. A full or read-only state file system at start is
    waited out (one error line, a retry every few seconds, systemd's start timeout extended meanwhile): exiting
    would let systemd's start limit (systemd/vgw-agent.service) leave the car without an agent once space is
    back. None if a stop signal came while it waited (docs/guarantees.md, "What can be lost")."""
    delay = ROOM_RETRY_FIRST_S
    said = False
    while True:
        try:
            return Agent(cfg, signals)
        except can.CanError as exc:
            raise VgwError(str(exc)) from exc
        except StorageError as exc:
            fault = room_fault(cfg.state_dir)
            if fault is None:
                raise
            if not said:
                log.error("%s; waiting for space (the state file system is %s), retrying every %g s at most",
                          exc, fault, ROOM_RETRY_MAX_S)
                said = True
        notify(f"EXTEND_TIMEOUT_USEC={int((delay + ROOM_RETRY_MAX_S) * 1_000_000)}")
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if signals.early:
                log.info("signal %d while waiting for space: stopping", signals.early[0])
                return None
            time.sleep(0.1)
        delay = min(delay * 2, ROOM_RETRY_MAX_S)
