"""The batch writer (vgw.daemon.writer) and the outbox's grouped commit: batches are judged one by one inside one
transaction, a revocation takes queued batches back before they reach the disk, and counters added to from
several threads lose nothing."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from vgw.contract.consent.model import KEM_X25519, Grant, Recipient
from vgw.contract.envelope import load_recipient_key, to_us
from vgw.daemon.counters import Counters
from vgw.daemon.writer import BatchWriter, SealJob
from vgw.state.keys import new_data_key
from vgw.state.outbox import Committed, GrantNotActive, NewBatch, Outbox
from vgw_sim.cloud import RecipientKey, open_envelope

from tests.agentkit import wait_until

DEV = "dev-w"


def _grant(gid: str, key: RecipientKey) -> Grant:
    return Grant(id=gid, controller="c", purpose="p", scopes=("read_speedometer",),
                 recipient=Recipient(KEM_X25519, key.public_raw))


def _job(grant: Grant, key: RecipientKey, speeds: list[float]) -> SealJob:
    ts = [1_795_920_000.0 + i * 0.02 for i in range(len(speeds))]
    return SealJob(grant, load_recipient_key(KEM_X25519, key.public_raw), {"Vehicle.Speed": (to_us(ts), speeds)},
                   len(speeds), ts[0], {"read_speedometer": len(speeds)}, None)


def _writer(outbox: Outbox, counters: Counters, audits: list[Any]) -> BatchWriter:
    return BatchWriter(device=DEV, outbox=outbox, counters=counters, quota_bytes=64 << 20,
                       audit=lambda event, **kw: audits.append(event), on_stored=lambda: None)


def _counters() -> Counters:
    return Counters(("batches", "batches_discarded", "batches_failed", "store_failures", "quota_dropped"))


def test_grouped_commit_judges_each_batch_alone(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", new_data_key(), DEV)
    outbox.set_active_grants({"g1", "g2"})
    ok = NewBatch("g1", lambda seq: b"one", 1.0, 1)
    gone = NewBatch("g3", lambda seq: b"three", 1.0, 1)

    def broken(seq: int) -> bytes:
        raise ValueError("cannot seal")

    results = outbox.commit_batches([ok, gone, NewBatch("g2", broken, 1.0, 1), NewBatch("g2", lambda s: b"2", 1.0, 1)])
    assert isinstance(results[0], Committed) and results[0].seq == 1
    assert isinstance(results[1], GrantNotActive) and isinstance(results[2], ValueError)
    assert isinstance(results[3], Committed) and results[3].seq == 1  # the failed batch used no seq
    assert sorted((r.grant_id, r.seq, r.payload) for r in outbox.pending(10)) == [("g1", 1, b"one"), ("g2", 1, b"2")]
    outbox.close()


def test_writer_seals_v2_and_counts(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", new_data_key(), DEV)
    outbox.set_active_grants({"g1"})
    key = RecipientKey.generate()
    counters, audits = _counters(), []
    writer = _writer(outbox, counters, audits)
    writer.start()
    writer.submit(_job(_grant("g1", key), key, [50.0, 51.5, 52.0]))
    writer.submit(_job(_grant("g9", key), key, [1.0]))  # revoked meanwhile: refused at commit
    assert writer.wait_idle(10)
    writer.close()
    assert counters["batches"] == 1 and counters["batches_discarded"] == 1
    [row] = outbox.pending(10)
    doc = open_envelope(row.payload, key, DEV, "g1")
    assert doc["v"] == 2 and [s["value"] for s in doc["samples"]] == [50.0, 51.5, 52.0]
    outbox.close()


def test_revocation_takes_queued_batches_back(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", new_data_key(), DEV)
    outbox.set_active_grants({"g1", "g2"})
    key = RecipientKey.generate()
    counters, audits = _counters(), []
    writer = _writer(outbox, counters, audits)
    writer.start()
    with outbox.exclusive():  # the writer takes the first batch and waits for the outbox
        writer.submit(_job(_grant("g2", key), key, [1.0]))
        assert wait_until(lambda: writer._busy, 5)
        writer.submit(_job(_grant("g1", key), key, [2.0]))
        writer.submit(_job(_grant("g1", key), key, [3.0]))
        assert writer.drop(frozenset({"g1"})) == 2
    assert writer.wait_idle(10)
    writer.close()
    assert [r.grant_id for r in outbox.pending(10)] == ["g2"] and counters["batches"] == 1
    outbox.close()


def test_counters_from_four_threads_lose_nothing() -> None:
    counters = Counters(("n",))

    def work() -> None:
        for _ in range(20_000):
            counters.add("n")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counters["n"] == 80_000 and counters.snapshot() == {"n": 80_000}
