"""`vgw bench` phase 5: revocation with a full outbox; the time until the grant's data key is gone."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from vgw.tools.bench.options import DEVICE
from vgw.tools.bench.report import Progress

# ---------------------------------------------------------------- phase 5: revocation


def bench_revocation(cfg_path: Path, docs: tuple[str, str], rows: int, progress: Progress) -> dict[str, Any]:
    """Fill the outbox with ``rows`` rows of one grant, revoke it; time until its key row is gone."""
    from vgw.config.settings import load_config
    from vgw.contract.envelope import batch_plaintext, load_recipient_key, seal
    from vgw.daemon.agent import Agent

    cfg = load_config(cfg_path)
    agent = Agent(cfg)
    try:
        agent.manager.apply(docs[0], source="bench")
        grant = next(g for g in agent.manager.active_grants() if g.id == "g-insurer")
        recipient = load_recipient_key(grant.recipient.kem, grant.recipient.pk)
        samples = [{"t": 1.7e9 + i / 50, "path": "Vehicle.Speed", "value": 50.0 + i % 7} for i in range(100)]
        epoch = agent.outbox.epoch
        agent.outbox.commit_batch(grant.id, lambda seq: seal(grant.recipient.kem, recipient, DEVICE, grant.id,
                                  batch_plaintext(DEVICE, grant.id, seq, samples, epoch=epoch)), 1.7e9, len(samples))
        db_path = agent.outbox.path
        fill = sqlite3.connect(db_path, timeout=30, isolation_level=None)
        blob_len = fill.execute("SELECT LENGTH(blob) FROM batches WHERE grant_id = ?", (grant.id,)).fetchone()[0]
        step = 10_000
        for base in range(2, rows + 1, step):
            n = min(step, rows + 1 - base)
            # Copies of the real sealed row (distinct seq): the erasure cost depends on count and size only.
            fill.execute("BEGIN IMMEDIATE")
            fill.execute(
                "WITH RECURSIVE s(k) AS (SELECT ? UNION ALL SELECT k + 1 FROM s WHERE k < ?) "
                "INSERT INTO batches (grant_id, seq, created, first_t, samples, blob) "
                "SELECT grant_id, k, created, first_t, samples, blob FROM s, "
                "(SELECT * FROM batches WHERE grant_id = ? AND seq = 1)",
                (base, base + n - 1, grant.id))
            fill.execute("COMMIT")
            progress.update(base / rows * 0.9, f"{base + n - 1} rows")
        buffered = fill.execute("SELECT COUNT(*) FROM batches WHERE grant_id = ?", (grant.id,)).fetchone()[0]
        gone, ready = threading.Event(), threading.Event()
        seen: list[float] = []

        def watch() -> None:
            # Its own connection, as any other reader of the file would see it (WAL: sees each commit).
            conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
            try:
                ready.set()
                while not gone.is_set():
                    row = conn.execute("SELECT 1 FROM grant_keys WHERE grant_id = ?", (grant.id,)).fetchone()
                    if row is None:
                        seen.append(time.perf_counter())
                        return
                    time.sleep(0.0005)
            finally:
                conn.close()

        watcher = threading.Thread(target=watch, name="bench-key-watch", daemon=True)
        watcher.start()
        ready.wait(5)
        t0 = time.perf_counter()
        agent.manager.apply(docs[1], source="bench")
        t_done = time.perf_counter()
        gone.set()
        watcher.join(5)
        rows_after = fill.execute("SELECT COUNT(*) FROM batches WHERE grant_id = ?", (grant.id,)).fetchone()[0]
        fill.close()
        progress.update(1.0)
        return {
            "rows": int(buffered),
            "row_bytes": int(blob_len),
            "key_destroyed_ms": round((seen[0] - t0) * 1000.0, 1) if seen else None,
            "all_erased_ms": round((t_done - t0) * 1000.0, 1),
            "rows_after": int(rows_after),
        }
    finally:
        agent.outbox.close()
        agent.lock_file.release()
