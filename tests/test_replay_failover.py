"""Replay after failover (README "Replay after failover"): rows acknowledged by a node that then failed go out
again through the next node, and the replay window is an ordinary, bounded part of the outbox.

The end-to-end test uses two private mosquitto brokers as two "endpoints" of one cluster: broker A acknowledges
every batch but nobody reads it there (a node that acked and lost), the cloud peer reads on broker B only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vgw.config.settings import DEFAULT_REPLAY_WINDOW_S, load_config
from vgw.state.keys import new_data_key
from vgw.state.outbox import GrantTerms, Outbox, read_figures
from vgw_sim.broker import Mosquitto

from tests.agentkit import AgentThread, Authority, connected_cloud, wait_until, write_config
from tests.faultkit import DEV, apply_offline, record_trace

G = "g-speed"
GRANTS = {G: ["read_speedometer"]}


@contextlib.contextmanager
def _two_nodes(tmp_path: Path, pki, auth: Authority, mqtt_extra: dict[str, Any] | None = None
               ) -> Iterator[tuple[Mosquitto, Mosquitto, Any, Path]]:
    """Nodes A and B (two mosquittos) as the agent's two hosts, the cloud reading on B only, the grant applied;
    yields (A, B, cloud, config path)."""
    trace = record_trace(tmp_path, 20.0)
    with Mosquitto.from_pki(pki) as node_a, Mosquitto.from_pki(pki) as node_b, \
            connected_cloud(node_b, pki) as cloud:
        cloud.add_recipient(G, auth.recipient(G))
        cfg = write_config(tmp_path, pki, 0, auth.trust,
                           can={"replay": str(trace), "replay_rate": 2.0, "replay_loop": True},
                           mqtt_extra={"hosts": [f"localhost:{node_a.port}", f"localhost:{node_b.port}"],
                                       **(mqtt_extra or {})})
        apply_offline(cfg, auth, GRANTS, tmp_path)
        yield node_a, node_b, cloud, cfg


@pytest.mark.parametrize("window", [None, 5.0])
def test_batches_acked_by_a_node_that_failed_reach_the_cloud_through_the_next_node(tmp_path: Path, pki,
                                                                                  window: float | None) -> None:
    """``window`` None: the default for several hosts. 5 s: the second pass (5/3 s after the failover) is seen
    too: the rows A acknowledged go out twice, once in each pass."""
    auth = Authority(tmp_path)
    with _two_nodes(tmp_path, pki, auth, {} if window is None else {"replay_window_s": window}) as (
            node_a, node_b, cloud, cfg):
        with AgentThread(cfg) as runner:
            up = runner.agent.uplink
            assert runner.wait_link()
            assert up.view().endpoint == f"localhost:{node_a.port}"
            assert wait_until(lambda: up.view().published_batches >= 5, 15)  # acknowledged by A, read by nobody
            node_a.kill()  # the node that acknowledged them is gone
            acked_by_a = up.view().published_batches
            assert wait_until(lambda: (v := up.view()).state == "connected"
                              and v.endpoint == f"localhost:{node_b.port}",
                              15)
            newest = runner.agent.outbox.next_seq(G) - 1
            # Every seq from 1 arrives on B: the ones A acknowledged (replayed) and the ones after.
            assert cloud.wait_for(lambda: max(cloud.seqs(DEV, G), default=0) >= newest, 20)
            assert cloud.missing(DEV, G) == [], cloud.gaps(DEV, G)
            assert min(cloud.seqs(DEV, G)) == 1
            assert wait_until(lambda: up.view().replayed_batches >= acked_by_a - 1, 10), \
                (up.view().replayed_batches, acked_by_a)
            # Replayed before anything newer: the first seqs to arrive on B are the ones A had acknowledged.
            assert cloud.seqs(DEV, G)[:3] == [1, 2, 3]
            if window is not None:
                assert wait_until(lambda: up.view().replayed_batches >= 2 * acked_by_a, 10), \
                    (up.view().replayed_batches, acked_by_a)


def test_a_receipt_acked_by_a_node_that_failed_reaches_the_cloud_through_the_next_node(tmp_path: Path, pki) -> None:
    """A receipt acknowledged by node A (read by nobody: acked and lost) is published again on B after the
    failover. On the code that kept only batches for the window, the erasure receipt never reached B."""
    auth = Authority(tmp_path)
    with _two_nodes(tmp_path, pki, auth) as (node_a, node_b, cloud, cfg):
        with AgentThread(cfg) as runner:
            up = runner.agent.uplink
            assert runner.wait_link() and up.view().endpoint == f"localhost:{node_a.port}"
            assert wait_until(lambda: up.view().published_batches >= 2, 15)
            before = up.view().published_receipts
            apply_offline(cfg, auth, {}, tmp_path)  # the owner revokes on the device: an erasure receipt
            assert wait_until(lambda: up.view().published_receipts >= before + 2, 15)  # applied + erasure, acked by A
            node_a.kill()
            assert wait_until(lambda: (v := up.view()).state == "connected"
                              and v.endpoint == f"localhost:{node_b.port}",
                              15)
            assert cloud.wait_for(lambda: cloud.receipts(DEV, "erasure"), 15), cloud.receipts(DEV)
            erasure = cloud.receipts(DEV, "erasure")[0]
            assert erasure.claims["grant"] == G and erasure.claims["key_destroyed"] is True
            assert wait_until(lambda: up.view().replayed_receipts >= 2, 10), up.view().replayed_receipts
            assert runner.agent.outbox.receipt_count() == 0  # deleted on PUBACK as before; the copy is in memory


def test_a_single_host_deletes_on_puback_as_before(tmp_path: Path, pki) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, 1883, auth.trust, can={"channel": "x"})
    assert load_config(cfg).mqtt.replay_window == 0.0
    explicit = write_config(tmp_path, pki, 1883, auth.trust, can={"channel": "x"},
                            mqtt_extra={"replay_window_s": 5})
    assert load_config(explicit).mqtt.replay_window == 5.0
    several = write_config(tmp_path, pki, 0, auth.trust, can={"channel": "x"},
                           mqtt_extra={"hosts": ["a.example:8883", "b.example:8883"]})
    assert load_config(several).mqtt.replay_window == DEFAULT_REPLAY_WINDOW_S  # a cluster: on by default


# -- the outbox ----------------------------------------------------------------------------------------------


def _outbox(tmp_path: Path) -> Outbox:
    outbox = Outbox(tmp_path / "outbox.sqlite", new_data_key(), DEV)
    outbox.apply_terms({G: GrantTerms("t1", frozenset({"read_speedometer"}))})
    return outbox


def _commit(outbox: Outbox, n: int = 1, **kw) -> None:
    for _ in range(n):
        outbox.commit_batch(G, lambda seq: b"envelope %d" % seq + b"." * 200, 1.0, 1,
                            scopes={"read_speedometer": 1}, **kw)


def test_kept_rows_are_not_pending_replay_in_order_and_expire(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path)
    try:
        _commit(outbox, 3)
        for row in outbox.pending(2):
            outbox.mark_sent(row, keep=True)
        assert [r.seq for r in outbox.pending(10)] == [3]
        assert outbox.stats()[G]["rows"] == 1  # what waits for the broker; kept copies are not a backlog
        figures = read_figures(outbox.path)  # what `vgw status` shows
        assert figures.stats[G]["rows"] == 1 and figures.used_bytes == outbox.total_bytes()
        assert outbox.counters()[f"sent_batches:{G}"] == 2
        assert [r.seq for r in outbox.replayable(0.0, 0, 10)] == [1, 2]
        first = outbox.replayable(0.0, 0, 1)[0]
        assert [r.seq for r in outbox.replayable(0.0, first.id, 10)] == [2]  # the cursor moves on
        assert outbox.sweep_acked(0.0) == 0  # still within the window
        assert outbox.sweep_acked(float("inf")) == 2  # window passed: gone
        assert outbox.replayable(0.0, 0, 10) == [] and [r.seq for r in outbox.pending(10)] == [3]
    finally:
        outbox.close()


def test_quota_drops_kept_rows_first_and_does_not_count_them(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path)
    try:
        _commit(outbox, 4)
        for row in outbox.pending(2):
            outbox.mark_sent(row, keep=True)
        size = outbox.total_bytes() // 4
        c = outbox.commit_batch(G, lambda seq: b"envelope %d" % seq + b"." * 200, 1.0, 1,
                                scopes={"read_speedometer": 1}, quota_bytes=size * 4)
        assert c.dropped == {}  # a kept row made room, not an unsent batch
        assert [r.seq for r in outbox.pending(10)] == [3, 4, 5]
        assert [r.seq for r in outbox.replayable(0.0, 0, 10)] == [2]
        assert f"dropped_quota:{G}" not in outbox.counters()
    finally:
        outbox.close()


def test_erasure_and_narrowing_cover_kept_rows(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path)
    try:
        _commit(outbox, 2)
        for row in outbox.pending(10):
            outbox.mark_sent(row, keep=True)
        # Terms changed to ones that no longer permit the scope: the kept rows are withdrawn, never replayed.
        outbox.apply_terms({G: GrantTerms("t2", frozenset({"read_odometer"}), since="t1")})
        assert outbox.replayable(0.0, 0, 10) == []
        assert outbox.total_bytes() == 0  # no row at all, kept or not
        outbox.apply_terms({G: GrantTerms("t3", frozenset({"read_speedometer"}), since="t2")})
        _commit(outbox, 2)
        for row in outbox.pending(10):
            outbox.mark_sent(row, keep=True)
        erased = outbox.erase_grant(G)
        assert erased.batches_deleted == 2 and erased.key_destroyed
        assert outbox.replayable(0.0, 0, 10) == []
    finally:
        outbox.close()


def test_retention_deletes_kept_rows_but_counts_only_unsent_ones(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path)
    try:
        _commit(outbox, 3)
        outbox.mark_sent(outbox.pending(1)[0], keep=True)
        assert outbox.delete_older_than(G, float("inf")) == 2  # deleted unsent: the kept one had been sent
        assert outbox.total_bytes() == 0  # no row at all, kept or not
    finally:
        outbox.close()
