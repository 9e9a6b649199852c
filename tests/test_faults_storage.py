"""Disk full and read-only outbox: keep running, stop storing, count, say so once, recover when it can store.

The faults come from the test kit's :class:`tests.faultkit.FaultyOutbox` (SQLite-level: ``max_page_count`` for
SQLITE_FULL, ``query_only`` for SQLITE_READONLY), which the agent opens in place of its outbox.
"""

from __future__ import annotations

import json
import logging

import pytest

from tests.agentkit import AgentThread, Authority, vgw, wait_until, write_config
from tests.faultkit import DEV, apply_offline, persistent_world, record_trace, use_faulty_outbox


@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
def test_outbox_unwritable_keeps_running_counts_and_recovers(tmp_path, pki, caplog, fault, monkeypatch):
    auth = Authority(tmp_path)
    trace = record_trace(tmp_path, 20.0)
    # The cloud subscribes (a persistent session) before the agent runs, so it misses nothing the agent
    # publishes once the broker is back; the broker stays away until then.
    with persistent_world(pki, auth, "g-1", client_id="cloud-storage") as (broker, cloud):
        cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                           can={"replay": str(trace), "replay_rate": 2.0, "replay_loop": True},
                           batch={"max_interval_s": 0.1})
        apply_offline(cfg, auth, {"g-1": ["read_speedometer", "read_odometer"]}, tmp_path)
        broker.stop()
        opened = use_faulty_outbox(monkeypatch)
        caplog.set_level(logging.INFO, logger="vgw")
        with AgentThread(cfg) as runner:
            agent = runner.agent
            faulty = opened[-1]
            assert wait_until(lambda: agent.outbox.stats().get("g-1", {}).get("rows", 0) >= 3, 10)
            if fault == "disk-full":
                faulty.fill_disk()
            else:
                faulty.make_read_only()
            assert wait_until(lambda: agent.counters["store_failures"] >= 10, 15)
            rows = agent.outbox.stats()["g-1"]["rows"]
            st = agent.status()
            assert st["storage"]["ok"] is False
            assert ("full" if fault == "disk-full" else "read") in st["storage"]["error"]
            assert wait_until(lambda: json.loads(vgw("status", "--config", str(cfg), "--json").stdout)
                              ["storage"]["ok"] is False, 5)
            assert runner.thread.is_alive() and agent.healthy  # still running, still collecting
            assert agent.outbox.stats()["g-1"]["rows"] == rows  # nothing stored meanwhile
            failures = agent.counters["store_failures"]

            # Space comes back.
            faulty.repair()
            assert wait_until(lambda: agent.storage_error is None, 5)
            assert wait_until(lambda: agent.outbox.stats()["g-1"]["rows"] > rows + 3, 10)

            # The link comes up too: everything stored goes out, and no seq is missing (a batch that could not
            # be stored never got a seq: the loss shows in store_failures, not as a gap).
            broker.start()
            assert runner.wait_link(10)
            last = agent.outbox.next_seq("g-1") - 1
            assert cloud.wait_for(lambda: max(cloud.seqs(DEV, "g-1"), default=0) >= last, 20)
        assert cloud.missing(DEV, "g-1") == []
        assert min(cloud.seqs(DEV, "g-1")) == 1
    errors = [r.getMessage() for r in caplog.records if "outbox cannot store" in r.getMessage()]
    assert len(errors) == 1, errors  # once when it starts, not once per batch
    assert sum("outbox stores again" in r.getMessage() for r in caplog.records) == 1
    events = [e["event"] for e in runner.agent.audit.entries()]
    assert "outbox-unwritable" in events and "outbox-recovered" in events
    assert failures >= 10
