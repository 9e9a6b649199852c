"""The agent's status: status.json for `vgw status` and the retained public status on MQTT (README "Topics").

Owned by the main loop, which writes status.json (every half second, on a bus-silence change and at shutdown)
and is the only writer of the cached quota view. Read from other threads too: :meth:`StatusView.public` runs on
the uplink's thread, :meth:`StatusView.snapshot` wherever a caller asks (tests, the bench). Both only read: plain
attributes, the uplink's immutable view, the counters' snapshot (under the counters' own lock) and the outbox
(under the outbox's lock).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vgw.base.errors import StorageError
from vgw.base.fsutil import atomic_write
from vgw.config.settings import Config
from vgw.daemon.collector import Collector
from vgw.daemon.counters import Counters
from vgw.daemon.health import Health
from vgw.daemon.locked_pipeline import PipelineGuard
from vgw.daemon.timing import DEFAULT_TIMING, Timing
from vgw.daemon.writer import BatchWriter
from vgw.state.consent.manager import ConsentManager
from vgw.state.outbox import Outbox
from vgw.state.statedir import STATUS_FILE
from vgw.uplink.link import Uplink

log = logging.getLogger(__name__)



class StatusView:
    """Builds and writes the status (thread: main; reads only what other threads own, see the module doc)."""

    def __init__(self, *, cfg: Config, manager: ConsentManager, guard: PipelineGuard, collector: Collector | None,
                 uplink: Uplink, outbox: Outbox, writer: BatchWriter, counters: Counters, health: Health,
                 obd: Callable[[], Any], timing: Timing = DEFAULT_TIMING) -> None:
        self.cfg = cfg
        self.timing = timing
        self.device = cfg.device.id
        self.path: Path = cfg.state_dir / STATUS_FILE
        self.manager = manager
        self.guard = guard
        self.collector = collector
        self.uplink = uplink
        self.outbox = outbox
        self.writer = writer
        self.counters = counters
        self.health = health
        self._obd = obd
        self._quota_view: dict[str, int] = {"quota_bytes": cfg.outbox.quota_bytes, "used_bytes": 0}
        self._quota_view_at = 0.0

    def public(self) -> dict[str, Any]:
        """The retained status the uplink publishes (the uplink's thread)."""
        consent = self.manager.in_force
        return {"device": self.device, "consent_version": consent.ver if consent else None,
                "grants": [g.id for g in self.manager.active_grants()], "healthy": self.health.healthy}

    def _quota_status(self) -> dict[str, int]:
        now = time.monotonic()
        if now - self._quota_view_at >= self.timing.quota_view_every_s:
            self._quota_view_at = now
            try:
                self._quota_view = {"quota_bytes": self.cfg.outbox.quota_bytes, "used_bytes": self.outbox.total_bytes()}
            except Exception:  # a status view must never stop the agent
                log.debug("quota view unavailable", exc_info=True)
        return self._quota_view

    def snapshot(self) -> dict[str, Any]:
        """What status.json holds (`vgw status` reads it)."""
        consent = self.manager.in_force
        pipeline = dict(self.guard.pipeline.counters)
        source = self.guard.source
        live_overflow = source.overflow if source is not None else 0
        up = self.uplink.view()  # one consistent snapshot of the link
        obd = self._obd()
        storage_error = self.writer.storage_error
        pending = self.manager.pending
        if pending is not None:  # a consent document waits for the disk: storage is not ok, whatever stores now
            storage_error = f"consent v{pending.consent.ver} not yet stored: {pending.error or 'retrying'}"
        problem = self.health.problem
        return {
            "device": self.device,
            "pid": os.getpid(),
            "updated": time.time(),
            "link": up.state,
            "link_error": up.last_error,
            "consent_sync": up.consent_sync,  # what this connection knows of the retained consent (README "Topics")
            "endpoint": up.endpoint,  # [mqtt] host:port in use (or last tried), README "Configuration (TOML)"
            "last_publish": up.last_publish,
            # client certificate renewal (README "Enrollment"): state, not_after, renew_from, attempts, last_error
            "certificate": self.uplink.renewal.view() if self.uplink.renewal is not None else None,
            "consent_version": consent.ver if consent else None,
            "consent_expired": self.manager.expired,
            # a document applied in memory whose disk part waits (docs/guarantees.md "Revocation wins every race")
            "consent_pending": pending.summary() if pending is not None else None,
            "collect": self.guard.pipeline.rule_counts(),  # collection rules: decoded vs let through, per grant/scope
            "published": {"batches": up.published_batches, "receipts": up.published_receipts},
            "storage": {"ok": storage_error is None, "error": storage_error},
            "seal": self.writer.seal_status(),  # where batches are sealed ([agent] seal_workers)
            "health": {"ok": problem is None, "problem": problem},
            "quota": self._quota_status(),
            "obd": obd.health() if obd is not None else None,
            "bus": self.health.bus_status(),
            "counters": {**pipeline, **self.counters.snapshot(),
                         "rx_overflow": self.counters["rx_overflow"] + live_overflow,
                         "connect_attempts": up.connect_attempts, "connect_failures": up.connect_failures,
                         "mqtt_queue_full": up.queue_full, "ack_store_failures": up.ack_store_failures,
                         "mqtt_oversized_dropped": up.oversized_dropped,
                         "replayed_batches": up.replayed_batches,  # README "Replay after failover"
                         "replayed_receipts": up.replayed_receipts,
                         "consent_subscribe_refused": up.subscribe_refused,
                         "consent_rejections_coalesced": self.manager.coalesced_rejections},
        }

    def write(self) -> None:
        """Write status.json atomically; a full or read-only disk skips it (the storage state says why)."""
        try:
            atomic_write(self.path, json.dumps(self.snapshot()).encode(), mode=0o600)
        except StorageError:
            pass
