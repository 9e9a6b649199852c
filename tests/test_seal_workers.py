"""``[agent] seal_workers = 1``: the envelopes sealed by a second process (vgw.daemon.seal_worker), with the
order, revocation and crash guarantees of the in-process writer (docs/performance.md "A second core").

Real parts throughout: the worker process, SQLite outboxes, the agent as a thread or as a `vgw run` child, a
private mosquitto and the reference cloud peer. Faults in the worker come from outside (SIGKILL, SIGSTOP) or,
for a revocation that must land while a group is at the worker, from a worker class of this test's own that
holds its answer back until the test lets it go.
"""

from __future__ import annotations

import json
import marshal
import os
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest
import vgw.daemon.writer as writer_mod
from vgw.base.errors import ConfigError
from vgw.config.settings import load_config
from vgw.daemon.counters import Counters
from vgw.daemon.seal_worker import Request, SealWorker
from vgw.daemon.timing import DEFAULT_TIMING, Timing
from vgw.daemon.writer import BatchWriter
from vgw.state.keys import new_data_key
from vgw.state.outbox import Outbox
from vgw_sim.cloud import RecipientKey, open_envelope

from tests.agentkit import AgentThread, Authority, agent_process, vgw, wait_until, write_config
from tests.faultkit import DEV, apply_offline, integrity, live_status, persistent_world, record_trace
from tests.test_writer import _grant, _job  # the grant and the seal job of the writer's own tests

# ---------------------------------------------------------------- the batch writer with a real worker


def _started_writer(tmp_path: Path, grants: tuple[str, ...] = ("g1", "g2"), timing: Timing = DEFAULT_TIMING
                    ) -> tuple[Outbox, dict[str, RecipientKey], Counters, BatchWriter]:
    """An outbox with ``grants`` active, a recipient key per grant, and a started writer with one seal worker."""
    outbox = Outbox(tmp_path / "o.sqlite", new_data_key(), DEV)
    outbox.set_active_grants(set(grants))
    keys = {gid: RecipientKey.generate() for gid in grants}
    counters = _counters()
    writer = _writer(outbox, counters, timing)
    writer.start()
    return outbox, keys, counters, writer


def _writer(outbox: Outbox, counters: Counters, timing: Timing = DEFAULT_TIMING) -> BatchWriter:
    return BatchWriter(device=DEV, outbox=outbox, counters=counters, quota_bytes=64 << 20,
                       audit=lambda *_a, **_k: None, on_stored=lambda: None, seal_workers=1, timing=timing)


def _counters() -> Counters:
    return Counters(("batches", "batches_discarded", "batches_failed", "store_failures", "quota_dropped"))


def _stored(outbox: Outbox, keys: dict[str, RecipientKey]) -> dict[str, list[tuple[int, float]]]:
    """Per grant, (seq, first speed) of every row in the outbox, in row order; each envelope opened and its
    plaintext's seq checked against the row's."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in outbox.pending(10_000):
        doc = open_envelope(row.payload, keys[row.grant_id], DEV, row.grant_id)
        assert doc["seq"] == row.seq, "the envelope was sealed for another seq than the outbox gave it"
        out.setdefault(row.grant_id, []).append((row.seq, doc["samples"][0]["value"]))
    return out


def _gone(pid: int) -> bool:
    """The process ended (reaped, or a zombie waiting for its parent)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _worker_pid(writer: BatchWriter) -> int | None:
    pid = writer.seal_status()["pid"]
    return int(pid) if pid is not None else None


def test_the_worker_seals_every_batch_in_order_with_contiguous_seqs(tmp_path: Path) -> None:
    outbox, keys, counters, writer = _started_writer(tmp_path)
    pid = _worker_pid(writer)
    assert pid is not None and psutil.Process(pid).ppid() == os.getpid()
    for i in range(60):
        gid = "g1" if i % 3 else "g2"
        writer.submit(_job(_grant(gid, keys[gid]), keys[gid], [float(i), i + 0.5]))
    assert writer.wait_idle(30)
    status = writer.seal_status()
    writer.close()
    assert counters["batches"] == 60 and status["mode"] == "worker" and status["sealed_by_worker"] == 60
    stored = _stored(outbox, keys)
    for gid, want in (("g1", [float(i) for i in range(60) if i % 3]), ("g2", [float(i) for i in range(0, 60, 3)])):
        assert [s for s, _ in stored[gid]] == list(range(1, len(want) + 1))
        assert [v for _, v in stored[gid]] == want  # the order they were collected in
    assert _gone(pid)
    outbox.close()


class HeldWorker(SealWorker):
    """A real seal worker whose answer the test holds back (``release``), so a revocation can land while a group
    is at the worker. Records what was sent to it."""

    instances: ClassVar[list[HeldWorker]] = []

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.release = threading.Event()
        self.sent: list[bytes] = []
        HeldWorker.instances.append(self)

    def send(self, requests: list[Request]) -> None:
        self.sent.append(marshal.dumps(requests))
        super().send(requests)

    def receive(self) -> list[bytes | None]:
        assert self.release.wait(20)
        return super().receive()


def test_a_grant_revoked_while_its_batch_is_at_the_worker_stores_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(writer_mod, "SealWorker", HeldWorker)
    HeldWorker.instances.clear()
    storage_key = new_data_key()
    outbox = Outbox(tmp_path / "o.sqlite", storage_key, DEV)
    outbox.set_active_grants({"g1", "g2"})
    keys = {"g1": RecipientKey.generate(), "g2": RecipientKey.generate()}
    outbox.commit_batch("g1", lambda seq: b"earlier", 1.0, 1)  # g1 has a data key in the outbox now
    counters = _counters()
    writer = _writer(outbox, counters)
    writer.start()
    [worker] = HeldWorker.instances
    writer.submit(_job(_grant("g1", keys["g1"]), keys["g1"], [1.0]))
    writer.submit(_job(_grant("g2", keys["g2"]), keys["g2"], [2.0]))
    assert wait_until(lambda: worker.sent, 10)  # the group is at the worker
    # The revocation in memory (what the agent lock's revoke does); the outbox still lists g1 as active.
    assert writer.drop(frozenset({"g1"})) == 0
    worker.release.set()
    assert writer.wait_idle(20)
    writer.close()
    assert counters["batches_discarded"] == 1 and counters["batches"] == 1
    assert [r.grant_id for r in outbox.pending(10)] == ["g1", "g2"]  # g1: only the batch stored before
    assert [r.payload for r in outbox.pending(10) if r.grant_id == "g1"] == [b"earlier"]
    # The worker was never given a secret: no storage key, no data key, only public recipient keys.
    data_key = outbox._data_keys["g1"]
    for sent in worker.sent:
        assert storage_key not in sent and data_key not in sent
    outbox.close()


def test_a_grant_granted_again_stores_while_the_worker_stays_busy(tmp_path: Path, monkeypatch) -> None:
    # Revoked, then granted again under the same id (the explorer's kept schedule 209 does this) while groups
    # keep the writer busy: only the batches taken before the revocation are discarded, not the new grant's.
    monkeypatch.setattr(writer_mod, "SealWorker", HeldWorker)
    monkeypatch.setattr(writer_mod, "GROUP_BATCHES", 1)
    HeldWorker.instances.clear()
    outbox, keys, counters, writer = _started_writer(tmp_path)
    [worker] = HeldWorker.instances
    with outbox.exclusive():  # the writer takes the first group and waits for the outbox (next seq)
        writer.submit(_job(_grant("g1", keys["g1"]), keys["g1"], [1.0]))
        assert wait_until(lambda: writer._busy, 5)
        writer.submit(_job(_grant("g2", keys["g2"]), keys["g2"], [2.0]))  # the next group, taken behind it
    assert wait_until(lambda: len(worker.sent) == 2, 10)  # both at the worker, the first answer held back
    writer.drop(frozenset({"g1"}))
    writer.submit(_job(_grant("g1", keys["g1"]), keys["g1"], [3.0]))  # g1 granted again
    worker.release.set()
    assert writer.wait_idle(20)
    writer.close()
    assert counters["batches_discarded"] == 1 and counters["batches"] == 2
    stored = _stored(outbox, keys)
    assert stored == {"g1": [(1, 3.0)], "g2": [(1, 2.0)]}
    outbox.close()


def test_a_killed_worker_is_replaced_and_no_batch_is_lost(tmp_path: Path) -> None:
    outbox, keys, counters, writer = _started_writer(tmp_path, ("g1",), Timing(seal_restart_s=2.0))
    grant = _grant("g1", keys["g1"])
    n = 0

    def submit(k: int) -> None:
        nonlocal n
        for _ in range(k):
            writer.submit(_job(grant, keys["g1"], [float(n)]))
            n += 1

    submit(5)
    assert writer.wait_idle(20) and writer.seal_status()["sealed_by_worker"] == 5
    first = _worker_pid(writer)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: _gone(first), 10)
    submit(5)  # the writer finds it dead: these are sealed in-process, and status says so
    assert writer.wait_idle(20)
    status = writer.seal_status()
    assert status["mode"] == "in-process" and "exited" in (status["error"] or "")
    assert wait_until(lambda: (submit(1), writer.wait_idle(20), writer.seal_status()["mode"] == "worker")[-1], 10)
    assert writer.seal_status()["restarts"] == 1 and _worker_pid(writer) != first
    # A hung worker (stopped, not dead) is given up after seal_reply_s and replaced the same way.
    writer.close()
    writer = _writer(outbox, counters, Timing(seal_restart_s=0.3, seal_reply_s=0.5))
    writer.start()
    hung = _worker_pid(writer)
    assert hung is not None
    os.kill(hung, signal.SIGSTOP)
    submit(3)
    assert writer.wait_idle(20)
    assert writer.seal_status()["mode"] == "in-process" and "timed out" in (writer.seal_status()["error"] or "")
    writer.close()
    assert _gone(hung)
    assert counters["batches"] == n and counters["batches_failed"] == 0
    assert [s for s, _ in _stored(outbox, keys)["g1"]] == list(range(1, n + 1))
    assert [v for _, v in _stored(outbox, keys)["g1"]] == [float(i) for i in range(n)]
    outbox.close()


# ---------------------------------------------------------------- the config switch


def test_seal_workers_is_0_by_default_1_on_request_and_nothing_else(tmp_path: Path, pki, broker) -> None:
    auth = Authority(tmp_path)
    plain = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": "x"})
    assert load_config(plain).agent.seal_workers == 0
    one = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": "x"}, agent={"seal_workers": 1})
    assert load_config(one).agent.seal_workers == 1
    for bad, rule in ((2, "expected 0 or 1"), (-1, "must be >= 0"), (True, "expected an integer")):
        cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": "x"}, agent={"seal_workers": bad})
        with pytest.raises(ConfigError, match=rule):
            load_config(cfg)


# ---------------------------------------------------------------- the whole agent


GRANTS = {"g-speed": ["read_speedometer"], "g-fleet": ["read_odometer", "read_fuel"]}


def test_the_agent_seals_at_its_worker_publishes_in_order_and_a_revocation_stops_the_grant(
        tmp_path: Path, pki, broker, cloud) -> None:
    auth = Authority(tmp_path)
    for gid in GRANTS:
        cloud.add_recipient(gid, auth.recipient(gid))
    trace = record_trace(tmp_path, 20.0)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                       can={"replay": str(trace), "replay_rate": 5.0, "replay_loop": True},
                       batch={"max_interval_s": 0.05}, agent={"seal_workers": 1})
    apply_offline(cfg, auth, GRANTS, tmp_path)
    state = tmp_path / "state"
    with AgentThread(cfg, timing=Timing(status_every_s=0.1)) as a:
        assert wait_until(lambda: all(len(cloud.seqs(DEV, g)) >= 5 for g in GRANTS), 30)
        seal = a.agent.status()["seal"]
        assert seal["mode"] == "worker" and seal["sealed_by_worker"] > 0
        assert psutil.Process(seal["pid"]).ppid() == os.getpid()
        # ... and `vgw status` says so to the installer
        assert wait_until(lambda: f"sealing: worker, worker pid {seal['pid']}" in vgw("status", "--config",
                                                                                     str(cfg)).stdout, 10)
        # Revoke g-speed over MQTT, as the cloud does.
        cloud.publish_consent(DEV, auth.doc(DEV, {"g-fleet": GRANTS["g-fleet"]}))
        assert wait_until(lambda: [g.id for g in a.agent.manager.active_grants()] == ["g-fleet"], 20)
        # One connection publishes in order: once the cloud has more g-fleet batches sealed after the revocation,
        # every g-speed batch published before it has arrived too.
        fleet_then = len(cloud.seqs(DEV, "g-fleet"))
        assert wait_until(lambda: len(cloud.seqs(DEV, "g-fleet")) >= fleet_then + 5, 20)  # still collecting
        assert a.agent.outbox.stats().get("g-speed") is None  # nothing of it stored
        assert wait_until(lambda: not a.agent.outbox.has_key("g-speed"), 10)  # its data key destroyed
        at_revocation = set(cloud.seqs(DEV, "g-speed"))
        fleet_then = len(cloud.seqs(DEV, "g-fleet"))
        assert wait_until(lambda: len(cloud.seqs(DEV, "g-fleet")) >= fleet_then + 5, 20)
    assert set(cloud.seqs(DEV, "g-speed")) == at_revocation  # nothing of it published after the revocation
    for gid in GRANTS:
        seqs = cloud.seqs(DEV, gid)
        assert sorted(seqs) == list(range(1, max(seqs) + 1)), f"{gid}: gaps {cloud.gaps(DEV, gid)}"
    assert cloud.undecryptable == 0
    status = json.loads((state / "status.json").read_text())
    assert status["seal"]["workers"] == 1


def test_kill9_of_the_agent_ends_its_worker_and_loses_no_stored_batch(tmp_path: Path, pki) -> None:
    auth = Authority(tmp_path)
    trace = record_trace(tmp_path, 20.0)
    outbox = tmp_path / "state" / "outbox.sqlite"
    with persistent_world(pki, auth, *GRANTS, client_id="cloud-seal-workers") as (broker, cloud):
        cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                           can={"replay": str(trace), "replay_rate": 10.0, "replay_loop": True},
                           batch={"max_interval_s": 0.05}, mqtt_extra={"drain_rate": 3.0, "max_inflight": 4},
                           agent={"seal_workers": 1})
        apply_offline(cfg, auth, GRANTS, tmp_path)
        for life in range(3):
            with agent_process(cfg) as proc:
                def sealing(p: Any = proc) -> Any:
                    st = live_status(outbox.parent, p.pid) or {}
                    seal = st.get("seal") or {}
                    return seal.get("mode") == "worker" and seal.get("sealed_by_worker", 0) >= 3 and seal["pid"]

                worker = wait_until(sealing, 30)
                assert worker, f"life {life + 1}: the worker did not seal"
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            # The worker's stdin closed with the agent: it exits by itself (no orphan left sealing).
            assert wait_until(lambda w=worker: _gone(w), 10), "the seal worker outlived the agent"
            assert integrity(outbox) == "ok"
        cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                           can={"replay": str(trace), "replay_rate": 10.0, "replay_loop": True},
                           batch={"max_interval_s": 0.05}, mqtt_extra={"drain_rate": 1000.0, "max_inflight": 20},
                           agent={"seal_workers": 1})
        with agent_process(cfg) as proc:
            assert wait_until(lambda: (live_status(outbox.parent, proc.pid) or {}).get("link") == "connected", 20)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        db = sqlite3.connect(outbox)
        try:
            rows = {g: {int(s) for (s,) in db.execute("SELECT seq FROM batches WHERE grant_id = ?", (g,))}
                    for g in GRANTS}
            nxt = {str(g): int(n) for g, n in db.execute("SELECT grant_id, next_seq FROM seqs")}
        finally:
            db.close()
        for gid in GRANTS:
            def covered(g: str = gid) -> bool:
                return set(range(1, nxt[g])) <= set(cloud.seqs(DEV, g)) | rows[g]

            # Every committed seq reached the cloud or is still on disk: no stored batch was lost to a kill.
            assert wait_until(covered, 10), f"{gid}: gaps {cloud.gaps(DEV, gid)}"
        assert cloud.undecryptable == 0
