"""Power loss and process death: kill -9 at random moments, SIGTERM, a corrupt outbox on start.

The agent runs as a `vgw run` child process on a looping replay trace (a source that survives restarts)
against a broker and a cloud peer that both keep their MQTT sessions.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from vgw_sim.broker import free_port

from tests.agentkit import AgentThread, Authority, agent_process, wait_until, write_config
from tests.faultkit import (
    DEV,
    apply_offline,
    integrity,
    live_status,
    outbox_rows,
    persistent_world,
    record_trace,
)

GRANTS = {"g-speed": ["read_speedometer"], "g-fleet": ["read_odometer", "read_fuel"]}


@pytest.fixture
def auth(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def _disk_seqs(outbox: Path) -> tuple[dict[str, set[int]], dict[str, int]]:
    """(seqs of the rows on disk, next seq) per grant, read straight from the file."""
    db = sqlite3.connect(outbox, timeout=10.0)
    try:
        rows: dict[str, set[int]] = {}
        for g, s in db.execute("SELECT grant_id, seq FROM batches"):
            rows.setdefault(g, set()).add(int(s))
        nxt = {str(g): int(n) for g, n in db.execute("SELECT grant_id, next_seq FROM seqs")}
    finally:
        db.close()
    return rows, nxt


def _next_seqs(outbox: Path) -> dict[str, int]:
    """The next seq per grant, read straight from the file ({} while it cannot be read)."""
    if not outbox.exists():
        return {}
    try:
        db = sqlite3.connect(outbox, timeout=2.0)
        try:
            return {str(g): int(n) for g, n in db.execute("SELECT grant_id, next_seq FROM seqs")}
        finally:
            db.close()
    except sqlite3.Error:
        return {}


def _kill_loop(tmp_path: Path, pki, auth: Authority, kills: int, seed: int) -> dict[str, int]:
    trace = record_trace(tmp_path, 20.0)
    rng = random.Random(seed)
    with persistent_world(pki, auth, *GRANTS) as (broker, cloud):
        def config(drain_rate: float, inflight: int) -> Path:
            # Batches are made faster than they may drain, so a kill also hits a backlog being published
            # (rows handed to the broker, PUBACKs on their way, rows being deleted).
            return write_config(tmp_path, pki, broker.port, auth.trust,
                                can={"replay": str(trace), "replay_rate": 10.0, "replay_loop": True},
                                batch={"max_interval_s": 0.05},
                                mqtt_extra={"drain_rate": drain_rate, "max_inflight": inflight})

        cfg = config(3.0, 4)
        apply_offline(cfg, auth, GRANTS, tmp_path)
        outbox = tmp_path / "state" / "outbox.sqlite"
        killed_with_rows = 0
        collecting_lives = 0
        for i in range(kills):
            before = _next_seqs(outbox)
            starting = rng.random() < 0.25
            with agent_process(cfg) as proc:
                # A random moment: starting (one life in four), else once this life collects (each grant has
                # committed a batch: a loaded machine may take seconds to start) collecting, committing,
                # publishing, deleting on PUBACK.
                if starting:
                    time.sleep(rng.uniform(0.05, 0.6))
                else:
                    def collecting(p=proc, b=before) -> bool:
                        now = _next_seqs(outbox)
                        return p.poll() is not None or all(now.get(g, 1) > b.get(g, 1) for g in GRANTS)

                    assert wait_until(collecting, 30) and proc.poll() is None, f"life {i + 1} did not collect"
                    collecting_lives += 1
                    time.sleep(rng.uniform(0.0, 1.2))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            assert integrity(outbox) == "ok", f"outbox corrupt after kill {i + 1}"
            rows, nxt = _disk_seqs(outbox)
            killed_with_rows += bool(rows)
            for gid in GRANTS:
                committed = set(range(1, nxt.get(gid, 1)))

                on_disk = rows.get(gid, set())

                def covered(g: str = gid, want: set[int] = committed, disk: set[int] = on_disk) -> bool:
                    return want <= set(cloud.seqs(DEV, g)) | disk

                # Every committed seq is at the cloud or still on disk: only the uncommitted batch was lost,
                # and since seq is assigned at commit that batch never had a seq, so no gap can open.
                lost = committed - set(cloud.seqs(DEV, gid)) - on_disk
                assert wait_until(covered, 5.0), f"kill {i + 1}: {gid} seqs lost: {sorted(lost)}"
                assert all(s < nxt.get(gid, 1) for s in cloud.seqs(DEV, gid)), "a seq above the committed range"
        # One more run drains what the kills left (while still collecting), then stops cleanly.
        cfg = config(1000.0, 20)
        with agent_process(cfg) as proc:
            assert wait_until(lambda: (live_status(outbox.parent, proc.pid) or {}).get("link") == "connected", 20)
            assert wait_until(lambda: outbox_rows(outbox) <= 4, 30)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        assert integrity(outbox) == "ok"
        rows, nxt = _disk_seqs(outbox)
        totals = {}
        for gid in GRANTS:
            seqs = set(cloud.seqs(DEV, gid)) | rows.get(gid, set())
            assert seqs == set(range(1, nxt[gid])), f"{gid}: gaps {cloud.gaps(DEV, gid)}"
            assert len(cloud.seqs(DEV, gid)) == len(set(cloud.seqs(DEV, gid)))  # de-duplicated stream
            totals[gid] = nxt[gid] - 1
        assert cloud.undecryptable == 0
        totals["kills_with_rows_on_disk"] = killed_with_rows
        totals["collecting_lives"] = collecting_lives
        totals["duplicates_dropped"] = cloud.duplicates(DEV)
        return totals


def test_kill9_at_random_moments_loses_only_the_uncommitted_batch(tmp_path, pki, auth):
    totals = _kill_loop(tmp_path, pki, auth, kills=20, seed=20)
    # Data flowed: every life that reached collecting committed at least one batch per grant before its kill.
    assert totals["collecting_lives"] >= 10, totals
    assert all(totals[g] > totals["collecting_lives"] for g in GRANTS), totals
    assert totals["kills_with_rows_on_disk"] >= 10, totals  # most kills hit a backlog being published
    print("kill -9 x20:", json.dumps(totals))


@pytest.mark.slow
def test_kill9_fifty_times(tmp_path, pki, auth):
    totals = _kill_loop(tmp_path, pki, auth, kills=50, seed=50)
    print("kill -9 x50:", json.dumps(totals))


@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_sigterm_flushes_open_batch_publishes_offline_and_exits_0(tmp_path, pki, broker, cloud, auth):
    trace = record_trace(tmp_path, 30.0)
    # Batches would close only after 60 s: whatever reaches the cloud was flushed by the SIGTERM handler.
    cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                       can={"replay": str(trace), "replay_rate": 1.0, "replay_loop": True},
                       batch={"max_interval_s": 60.0, "max_samples": 1_000_000})
    apply_offline(cfg, auth, {"g-speed": ["read_speedometer"]}, tmp_path)
    cloud.add_recipient("g-speed", auth.recipient("g-speed"))
    status = tmp_path / "state" / "status.json"

    def ready() -> bool:
        try:
            st = json.loads(status.read_text())
        except (OSError, ValueError):
            return False
        return st.get("link") == "connected" and st["counters"].get("samples", 0) > 20

    with agent_process(cfg) as proc:
        assert wait_until(ready, 20), proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
        assert cloud.batches(DEV, "g-speed") == []
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
        took = time.monotonic() - t0
        stderr = proc.stderr.read() if proc.stderr else ""
    assert rc == 0, stderr
    assert took < 8.0, f"shutdown took {took:.1f} s"
    outbox = tmp_path / "state" / "outbox.sqlite"
    assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-speed")) + outbox_rows(outbox) == 1, 5)
    assert cloud.wait_for(lambda: (cloud.status(DEV) or {}).get("state") == "offline", 5)
    if cloud.batches(DEV, "g-speed"):
        assert len(cloud.batches(DEV, "g-speed")[0].samples) > 20
    assert integrity(outbox) == "ok"


def _fill_and_corrupt(cfg: Path, auth: Authority, tmp_path: Path, *, header: bool) -> Path:
    apply_offline(cfg, auth, {"g-odo": ["read_odometer"]}, tmp_path)
    outbox = tmp_path / "state" / "outbox.sqlite"
    db = sqlite3.connect(outbox, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("INSERT OR REPLACE INTO seqs (grant_id, next_seq) VALUES ('g-odo', 42)")
    for i in range(200):
        db.execute("INSERT INTO batches (grant_id, seq, created, first_t, samples, blob) VALUES (?, ?, ?, ?, ?, ?)",
                   ("g-odo", 1000 + i, time.time(), 0.0, 1, bytes([i % 251]) * 3000))
    db.close()
    data = bytearray(outbox.read_bytes())
    if header:
        data[0:100] = b"\xa5" * 100
    else:
        page = 4096
        for off in range(len(data) // 2 // page * page, len(data) - page, page * 7):  # page-aligned
            data[off + 8:off + 200] = b"\xff" * 192  # smash cell pointers of pages holding batch rows
    outbox.write_bytes(bytes(data))
    return outbox


@pytest.mark.parametrize("header", [False, True], ids=["pages", "header"])
def test_corrupt_outbox_is_quarantined_audited_and_seq_continues(tmp_path, pki, auth, header):
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": f"vgw-q-{header}"})
    outbox = _fill_and_corrupt(cfg, auth, tmp_path, header=header)
    assert integrity_problem_of(outbox)
    runner = AgentThread(cfg)  # the constructor opens the outbox: the check runs here
    try:
        # Quarantine keeps no copy: the corrupt file (and its -wal/-shm) would keep revoked grants' data.
        assert not list(outbox.parent.glob("outbox.sqlite.corrupt-*"))
        assert runner.agent.outbox.integrity_ok()
        events = [e for e in runner.agent.audit.entries() if e.get("event") == "outbox-quarantined"]
        assert len(events) == 1 and events[0]["file"].startswith("outbox.sqlite.corrupt-")
        runner.start()
        assert wait_until(lambda: runner.agent.manager.in_force is not None, 5)
        if not header:  # the seqs table was readable: the grant's sequence goes on from 42, no reuse
            assert events[0]["seqs_recovered"] == 1
            assert runner.agent.outbox.next_seq("g-odo") == 42
        runner.stop()
    finally:
        if runner.thread.is_alive():
            runner.stop()
        elif not runner.thread.ident:
            runner.agent.outbox.close()
            runner.agent.lock_file.release()


def integrity_problem_of(path: Path) -> str | None:
    from vgw.state.outbox import integrity_problem

    return integrity_problem(path)
