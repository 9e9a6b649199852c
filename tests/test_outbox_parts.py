"""The outbox's parts: a read only reads, every write is one transaction, faults are told by SQLite's code."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from vgw.base.errors import OutboxUnwritable, StorageFault
from vgw.state.keys import new_data_key
from vgw.state.outbox import Outbox

from tests.faultkit import DEV, FaultyOutbox


def _rows(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [int(r[0]) for r in db.execute("SELECT seq FROM batches ORDER BY seq")]
    finally:
        db.close()


def test_pending_only_reads_and_the_owner_drops_undecryptable_rows(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, new_data_key(), DEV)
    try:
        outbox.set_active_grants({"g1"})
        for _ in range(3):
            outbox.commit_batch("g1", lambda seq: f"envelope {seq}".encode(), 1.0, 1)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("UPDATE batches SET blob = zeroblob(64) WHERE seq = 2")  # damaged on disk
        other.close()

        assert [r.seq for r in outbox.pending(10)] == [1, 3]
        assert _rows(path) == [1, 2, 3]  # a read never writes: the damaged row is still there
        assert "undecryptable_rows" not in outbox.counters()
        assert [r.seq for r in outbox.pending(10)] == [1, 3]  # skipped again, cheaply

        assert outbox.drop_undecryptable() == 1
        assert _rows(path) == [1, 3]
        assert outbox.counters()["undecryptable_rows"] == 1
        assert outbox.drop_undecryptable() == 0
    finally:
        outbox.close()


@pytest.mark.parametrize(("fault", "expected"), [("fill_disk", StorageFault.FULL),
                                                  ("make_read_only", StorageFault.READ_ONLY)])
def test_a_failed_write_is_classified_by_sqlite_result_code(tmp_path: Path, fault: str,
                                                           expected: StorageFault) -> None:
    outbox = FaultyOutbox(tmp_path / "outbox.sqlite", new_data_key(), DEV)
    try:
        outbox.set_active_grants({"g1"})
        outbox.commit_batch("g1", lambda seq: b"first", 1.0, 1)
        getattr(outbox, fault)()
        with pytest.raises(OutboxUnwritable) as info:
            outbox.commit_batch("g1", lambda seq: os.urandom(64 * 1024), 1.0, 1)
        assert info.value.fault is expected and info.value.kind == expected.value
        assert isinstance(info.value.__cause__, sqlite3.Error)
        if expected is StorageFault.READ_ONLY:  # (a counter may still fit in a page of a full file)
            with pytest.raises(OutboxUnwritable):
                outbox.count("drops")  # counters are written in the transaction helper too
        outbox.repair()
        outbox.commit_batch("g1", lambda seq: b"again", 1.0, 1)
        assert outbox.next_seq("g1") == 3  # the failed batch never used a seq
    finally:
        outbox.close()


def test_quota_evicts_the_oldest_batches_not_in_flight_and_counts_each(tmp_path: Path) -> None:
    """The eviction policy (docs/guarantees.md "outbox past quota"): oldest first, never a batch in flight.

    Batches handed to the broker whose PUBACK has not come may have arrived, so they stay; the victims are the
    oldest of the rest, so the dropped seqs need not be one run. Every dropped seq is counted exactly once.
    """
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, new_data_key(), DEV)
    try:
        outbox.set_active_grants({"g1"})
        payload = os.urandom(1000)
        for _ in range(6):
            outbox.commit_batch("g1", lambda seq: payload, 1.0, 1)
        one = outbox.total_bytes() // 6
        quota = 6 * one
        in_flight = [r for r in outbox.pending(10) if r.seq in (1, 2, 4)]
        for row in in_flight:  # the uplink handed seqs 1, 2 and 4 to the broker; no PUBACK yet
            outbox.mark_attempted(row.id)

        first = outbox.commit_batch("g1", lambda seq: payload, 1.0, 1, quota_bytes=quota)
        assert first.dropped == {"g1": 1}
        assert _rows(path) == [1, 2, 4, 5, 6, 7]  # seq 3: the oldest not in flight
        outbox.commit_batch("g1", lambda seq: payload, 1.0, 1, quota_bytes=quota)
        outbox.commit_batch("g1", lambda seq: payload, 1.0, 1, quota_bytes=quota)
        assert _rows(path) == [1, 2, 4, 7, 8, 9]  # then 5 and 6, never 1, 2, 4
        assert outbox.counters()["dropped_quota:g1"] == 3
        assert outbox.total_bytes() <= quota

        outbox.mark_sent(in_flight[0])  # seq 1 acknowledged: it leaves, and is not a drop
        outbox.commit_batch("g1", lambda seq: payload, 1.0, 1, quota_bytes=quota)
        assert _rows(path) == [2, 4, 7, 8, 9, 10]
        assert outbox.counters()["dropped_quota:g1"] == 3
    finally:
        outbox.close()


def test_quota_passes_over_a_largest_grant_whose_batches_are_all_in_flight(tmp_path: Path) -> None:
    """Step 2 of the policy: when the committing grant has nothing older to give, the largest grant with a
    batch not in flight gives way; one whose batches are all in flight cannot, and must not stop the search."""
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, new_data_key(), DEV)
    try:
        outbox.set_active_grants({"g-big", "g-small", "g-new"})
        payload = os.urandom(1000)
        for gid in ("g-big",) * 4 + ("g-small",) * 2:
            outbox.commit_batch(gid, lambda seq: payload, 1.0, 1)
        quota = outbox.total_bytes()  # six rows of the same size: full
        for row in outbox.pending(10):
            if row.grant_id == "g-big":
                outbox.mark_attempted(row.id)  # all of g-big is in flight

        new = outbox.commit_batch("g-new", lambda seq: payload, 1.0, 1, quota_bytes=quota)
        assert new.dropped == {"g-small": 1}  # g-small's oldest, not g-big's (in flight), not the new batch
        assert outbox.total_bytes() <= quota
        assert {(r.grant_id, r.seq) for r in outbox.pending(10)} == {
            ("g-big", 1), ("g-big", 2), ("g-big", 3), ("g-big", 4), ("g-small", 2), ("g-new", 1)}
        assert outbox.counters()["dropped_quota:g-small"] == 1
    finally:
        outbox.close()
