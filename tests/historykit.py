"""A car driven through a consent history, and the cloud that receives what it sends (tests only).

:class:`Car` is one device's state directory with the agent's own parts over it: the consent manager (real
signed documents, real erasures and receipts), the pipeline guard and batch writer (the real routing, rules,
limits, HPKE seal and encrypted outbox). ``restart()`` stores what is open, closes everything and opens it again
as a new ``vgw run`` would. :class:`Cloud` takes what the outbox would publish, opens each envelope with the
app's key, de-duplicates on (grant, epoch, seq) and acknowledges it (``mark_sent``), as the broker's PUBACK does.
No MQTT here: the uplink's own tests cover the wire; these histories need hundreds of documents per second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgw.cloud.envelopes import open_envelope
from vgw.config.settings import BatchConfig
from vgw.daemon.counters import Counters
from vgw.daemon.locked_pipeline import PipelineGuard
from vgw.daemon.writer import BatchWriter
from vgw.pipeline.catalogue import Catalogue, load_catalogue
from vgw_sim.pki import TestPKI

from tests.consentkit import Authority, State

ROOT = Path(__file__).resolve().parents[1]
_CATALOGUE: list[Catalogue] = []
_TRACE: list[list[tuple[float, int, bool, bytes, int]]] = []
TRACE_START = 1_795_920_000.0
TRACE_S = 240.0


def trace() -> list[tuple[float, int, bool, bytes, int]]:
    """A recorded drive of the demo vehicle (candump -L, TRACE_S seconds from TRACE_START), replayed: its frames
    as python-can's reader gives them back, in the agent's frame tuples (t, id, extended, data, kind)."""
    if not _TRACE:
        import tempfile

        import can
        from vgw.tools.bench.trace import write_trace
        from vgw_sim.can_sim import CanSimulator
        from vgw_sim.vehicle import VehicleModel

        sim = CanSimulator(ROOT / "dbc" / "vehicle.dbc", VehicleModel(seed=7))
        frames = ((m.timestamp, m.arbitration_id, m.is_extended_id, bytes(m.data))
                  for m in sim.frames(TRACE_S, start_time=TRACE_START))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "drive.log"
            write_trace(path, frames, 10**9)
            _TRACE.append([(m.timestamp, m.arbitration_id, m.is_extended_id, bytes(m.data), 0)
                           for m in can.LogReader(str(path))])
    return _TRACE[0]


def catalogue() -> Catalogue:
    if not _CATALOGUE:
        _CATALOGUE.append(load_catalogue([ROOT / "dbc" / "vehicle.dbc"], ROOT / "dbc" / "signals.toml"))
    return _CATALOGUE[0]


class Car:
    """One device: its state directory, consent manager, pipeline and writer. Not thread-safe (one test)."""

    def __init__(self, root: Path, pki: TestPKI, auth: Authority, device: str = "dev-0001") -> None:
        self.state = State(root, pki, auth, device)
        self.device = device
        self._parts()
        self.state.manager.load_cached()

    def _parts(self) -> None:
        self.writer = BatchWriter(device=self.device, outbox=self.state.outbox, counters=Counters(()),
                                  quota_bytes=1 << 30, audit=lambda *_a, **_k: None, on_stored=lambda: None)
        self.guard = PipelineGuard(catalogue=catalogue(), obd=False, writer=self.writer,
                                   batch=BatchConfig(max_samples=10_000, max_interval_s=3600))
        self.guard.pipeline.seed_marks(self.state.outbox.rate_marks())
        m = self.state.manager

        def on_revoke(ids: frozenset[str]) -> None:
            self.guard.revoke(ids, tuple(g for g in m.active_grants() if g.id not in ids))

        m.on_revoke = on_revoke
        m.on_change = lambda: self.guard.set_grants(m.active_grants())

    def apply(self, token: str) -> str:
        """Apply a document as if it came from the broker; what was collected before it is stored first (the
        agent stores every 0.2 s, so a document finds at most that much in memory)."""
        self.flush()
        return self.state.manager.apply(token, source="mqtt").status

    def feed(self, samples: list[tuple[str, str, float, Any]]) -> None:
        """Samples (path, scope, frame time, value), routed through the consent policy as a source's are."""
        self.guard.offer_samples(samples)

    def play(self, frames: list[tuple[float, int, bool, bytes, int]]) -> None:
        """Frames through the pipeline as the collector hands them over (one chunk, under the agent lock)."""
        def failed(exc: Exception) -> None:
            raise exc

        with self.guard.lock:
            self.guard.pipeline.process_frames(frames, failed)

    def flush(self) -> None:
        """Store every open batch, as the agent does every 0.2 s (rule windows stay open)."""
        with self.guard.lock:
            self.guard.flush(self.guard.pipeline.due(1, 0.0))
        self.guard.store_rule_counts(self.state.outbox.count_many)  # as the agent's main loop does

    def restart(self) -> None:
        """What a stop and a start of `vgw run` does: open batches stored (rule windows closed, as at shutdown),
        everything closed and opened again."""
        self.guard.flush_all()
        self.guard.store_rule_counts(self.state.outbox.count_many)
        self.state.reopen(load=False)
        self._parts()
        self.state.manager.load_cached()
        self.guard.set_grants(self.state.manager.active_grants())

    def report(self, generated: float | None = None) -> dict[str, Any]:
        """`vgw report --json` of this state directory, read as the command reads it (files only)."""
        from vgw.ops.report import ConsentView, build_report
        from vgw.state.outbox import OUTBOX_FILE, read_figures

        figures = read_figures(self.state.dir / OUTBOX_FILE)
        m = self.state.manager
        view = None
        if m.in_force is not None:
            view = ConsentView(ver=m.in_force.ver, exp=m.in_force.exp, expired=m.expired,
                               grants=tuple(m.in_force.summary()["grants"]))  # type: ignore[arg-type]
        return build_report(device=self.device, entries=self.state.audit.entries(), counters=figures.counters,
                            outbox=figures.stats, consent=view, generated=generated, sent_log=figures.sent_log)

    def close(self) -> None:
        self.state.close()


@dataclass
class Cloud:
    """What the apps received: per grant, the de-duplicated samples, each with the batch it came in."""

    auth: Authority
    device: str = "dev-0001"
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    acked_at: list[tuple[str, float, int]] = field(default_factory=list)  # (grant, wall time, samples)
    _seen: set[tuple[str, str, int]] = field(default_factory=set)

    def drain(self, car: Car) -> int:
        """Take every batch the outbox would publish now, open it, acknowledge it. Returns how many."""
        outbox = car.state.outbox
        n = 0
        while rows := outbox.pending(100):
            for row in rows:
                doc = open_envelope(row.payload, self.auth.recipient(row.grant_id), self.device, row.grant_id)
                key = (row.grant_id, str(doc.get("epoch", "")), int(doc["seq"]))
                if key not in self._seen:
                    self._seen.add(key)
                    self.samples.setdefault(row.grant_id, []).extend(doc["samples"])
                    self.batches[row.grant_id] = self.batches.get(row.grant_id, 0) + 1
                    self.acked_at.append((row.grant_id, time.time(), len(doc["samples"])))
                outbox.mark_sent(row)
                n += 1
        return n
