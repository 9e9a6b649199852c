"""Erasure, checked the way a forensic examiner would: raw bytes of every file in the state directory.

A grant holding read_vin (so the VIN is a searchable plaintext), read_location and read_speedometer stores real
batches from simulated traffic next to a grant that stays. After its revocation, and again after a restart,
no file in the state directory (the SQLite file, its -wal and -shm, the cache, the audit log, anything else)
holds its wrapped data key, its data key, any stored row, any sealed envelope, or the VIN; and the SQL view
agrees. The kept grant's key is still found by the same scan, which proves the scan can see.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vgw.contract.envelope import batch_plaintext, load_recipient_key, seal
from vgw.pipeline.catalogue import load_catalogue
from vgw.pipeline.router import Pipeline
from vgw.state import keys
from vgw_sim.can_sim import CanSimulator
from vgw_sim.paths import default_dbc, default_signal_map
from vgw_sim.vehicle import DEFAULT_VIN, VehicleModel

from tests.consentkit import Authority, State
from tests.faultkit import file_query, file_write

DEVICE = "dev-0001"
GONE, KEPT = "g-vin", "g-keep"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _where(needle: bytes, files: dict[str, bytes]) -> list[str]:
    return [name for name, data in files.items() if needle in data]


@pytest.fixture
def world(tmp_path: Path, pki: Any) -> Iterator[dict[str, Any]]:
    auth = Authority(tmp_path)
    s = State(tmp_path, pki, auth)
    now = int(time.time())
    v1 = auth.doc(DEVICE, 1, [auth.grant(GONE, ["read_vin", "read_location", "read_speedometer"]),
                              auth.grant(KEPT, ["read_odometer"])], iat=now - 10)
    assert s.manager.apply(v1, source="mqtt").status == "applied"
    consent = s.manager.in_force
    assert consent is not None
    # Real traffic through the real pipeline, sealed and stored exactly as the runtime does (not sent).
    pipeline = Pipeline(load_catalogue([default_dbc()], default_signal_map()))
    pipeline.swap(consent.grants)
    recipients = {g.id: load_recipient_key(g.recipient.kem, g.recipient.pk) for g in consent.grants}
    sim = CanSimulator(default_dbc(), VehicleModel(seed=5, start_time=now))
    next_flush = now + 1.0
    vin_samples = 0
    for msg in sim.frames(8.0, start_time=now):
        pipeline.process(msg.arbitration_id, bytes(msg.data), msg.timestamp)
        if msg.timestamp >= next_flush:
            next_flush += 1.0
            for batch in pipeline.batches.values():
                samples = batch.take()
                vin_samples += sum(1 for x in samples if x["value"] == DEFAULT_VIN)
                if samples:
                    g = batch.grant
                    s.outbox.commit_batch(g.id, lambda seq, _s=samples, _g=g: seal(
                        _g.recipient.kem, recipients[_g.id], DEVICE, _g.id, batch_plaintext(DEVICE, _g.id, seq, _s,
                                                                                 epoch=s.outbox.epoch)),
                        batch.first_t, len(samples))
    assert vin_samples > 0
    db = s.outbox.path
    wrapped = {gid: bytes(w) for gid, w in file_query(db, "SELECT grant_id, wrapped FROM grant_keys")}
    blobs = [bytes(b) for (b,) in file_query(db, "SELECT blob FROM batches WHERE grant_id = ?", (GONE,))]
    envelopes = [r.payload for r in s.outbox.pending(10_000) if r.grant_id == GONE]
    assert set(wrapped) == {GONE, KEPT} and len(blobs) >= 5 and len(envelopes) == len(blobs)
    secrets = {
        "wrapped key": wrapped[GONE],
        "data key": keys.unwrap(load_storage_key(s), wrapped[GONE]),
        **{f"row {i}": b[:48] for i, b in enumerate(blobs)},  # a 48-byte fragment of each ciphertext row
        **{f"envelope {i}": e[1:49] for i, e in enumerate(envelopes)},
        "VIN": DEFAULT_VIN.encode(),
    }
    try:
        yield {"auth": auth, "state": s, "now": now, "secrets": secrets, "kept_key": wrapped[KEPT],
               "batches": len(blobs)}
    finally:
        s.close()


def load_storage_key(s: State) -> bytes:
    return keys.load_or_create_storage_key(s.dir / "storage.key", create=False)


def _assert_erased(s: State, secrets: dict[str, bytes], kept_key: bytes) -> None:
    files = _files(s.dir)
    assert any(name.startswith("outbox.sqlite") for name in files)
    found = {what: _where(needle, files) for what, needle in secrets.items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    # The same scan still finds what must stay: the scan is able to see.
    assert _where(kept_key, files)
    db = s.outbox.path
    assert file_query(db, "SELECT COUNT(*) FROM batches WHERE grant_id = ?", (GONE,)) == [(0,)]
    assert file_query(db, "SELECT COUNT(*) FROM grant_keys WHERE grant_id = ?", (GONE,)) == [(0,)]
    assert GONE not in s.outbox.active_grants() and not s.outbox.has_key(GONE)
    assert s.outbox.integrity_ok()


def test_plaintext_never_on_disk_even_before_revocation(world: dict[str, Any]) -> None:
    files = _files(world["state"].dir)
    assert not _where(DEFAULT_VIN.encode(), files)
    assert not _where(world["secrets"]["data key"], files)  # only the wrapped form is stored


def test_revocation_leaves_no_key_row_or_plaintext_and_survives_restart(world: dict[str, Any]) -> None:
    s: State = world["state"]
    auth: Authority = world["auth"]
    files = _files(s.dir)
    assert _where(world["secrets"]["wrapped key"], files), "precondition: the wrapped key is on disk"
    v2 = auth.doc(DEVICE, 2, [auth.grant(KEPT, ["read_odometer"])], iat=world["now"])
    result = s.manager.apply(v2, source="mqtt")
    assert result.status == "applied" and [e.grant_id for e in result.revoked] == [GONE]
    assert result.revoked[0].batches_deleted == world["batches"] and result.revoked[0].key_destroyed
    assert s.revoked_hook == [frozenset({GONE})]  # memory first
    _assert_erased(s, world["secrets"], world["kept_key"])
    # (the -wal file was checkpointed and truncated by the erasure; the receipt queued after it wrote new,
    # unrelated pages there, which the scan above covered)

    # The erasure receipt: after key and rows went, with what was deleted.
    erasures = s.receipts("erasure")
    assert [(r["grant"], r["ver"], r["batches_deleted"], r["key_destroyed"]) for r in erasures] == [
        (GONE, 2, world["batches"], True)]
    events = [e["event"] for e in s.events() if e.get("grant") == GONE]
    assert events == ["grant-stopped", "key-destroyed", "erasure-done"]

    s.reopen()  # restart: nothing comes back, nothing is re-created
    _assert_erased(s, world["secrets"], world["kept_key"])
    assert s.manager.in_force is not None and s.manager.in_force.grant_ids == {KEPT}
    s.close()
    _assert_erased_files_only(s, world["secrets"])


def _assert_erased_files_only(s: State, secrets: dict[str, bytes]) -> None:
    files = _files(s.dir)
    found = {what: _where(needle, files) for what, needle in secrets.items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


def test_crash_before_erasure_is_finished_on_restart(world: dict[str, Any]) -> None:
    # `vgw consent apply` wrote v2 to the cache while the agent was dying: on restart the agent erases the
    # grant it finds on disk that no grant in force covers, and sends the erasure receipt then.
    s: State = world["state"]
    auth: Authority = world["auth"]
    v2 = auth.doc(DEVICE, 2, [auth.grant(KEPT, ["read_odometer"])], iat=world["now"])
    s.store.write_token(v2)
    s.reopen()
    _assert_erased(s, world["secrets"], world["kept_key"])
    assert [(r["grant"], r["reason"]) for r in s.receipts("erasure")] == [(GONE, "not-in-force")]


def test_crash_after_key_destroyed_before_rows_deleted(world: dict[str, Any]) -> None:
    # The key goes in its own transaction first; a crash right after it leaves unreadable rows, which the
    # restart deletes (orphans) before anything else happens.
    s: State = world["state"]
    auth: Authority = world["auth"]
    v2 = auth.doc(DEVICE, 2, [auth.grant(KEPT, ["read_odometer"])], iat=world["now"])
    s.store.write_token(v2)
    file_write(s.outbox.path, "DELETE FROM grant_keys WHERE grant_id = ?", (GONE,))
    file_write(s.outbox.path, "DELETE FROM active_grants WHERE id = ?", (GONE,))
    s.reopen(load=False)  # the crash: memory (and any cached data key) is gone
    assert s.outbox.stats()[GONE]["rows"] == world["batches"]
    assert all(r.grant_id != GONE for r in s.outbox.pending(10_000))  # unreadable: never published
    s.manager.load_cached()
    _assert_erased(s, world["secrets"], world["kept_key"])


# -- every file that may hold the grant: quarantined copies, and a WAL another process keeps busy ----------------


def _corrupt_keeping_keys(path: Path) -> None:
    """Smash cell pointers of pages in the second half of the file (batch rows): integrity_check fails, while
    the small grant_keys table near the start keeps the wrapped keys readable in the raw bytes. Every page, not
    every third: which pages hold b-tree cells (not overflow content) depends on the rows' sizes."""
    data = bytearray(path.read_bytes())
    page = 4096
    for off in range(len(data) // 2 // page * page, len(data) - page, page):  # page-aligned
        data[off + 8:off + 200] = b"\xff" * 192
    path.write_bytes(bytes(data))


def test_erasure_after_quarantine_leaves_no_copy_anywhere(world: dict[str, Any]) -> None:
    from vgw.state.outbox import integrity_problem, open_checked

    s: State = world["state"]
    auth: Authority = world["auth"]
    outbox_path = s.dir / "outbox.sqlite"
    s.outbox.close()  # the last connection checkpoints: everything is in the main file now
    _corrupt_keeping_keys(outbox_path)
    assert integrity_problem(outbox_path)
    assert _where(world["secrets"]["wrapped key"], _files(s.dir)), "precondition: the corrupt file holds the key"
    checked, quarantined = open_checked(outbox_path, load_storage_key(s), DEVICE)  # what `vgw run` does at start
    checked.close()
    assert quarantined is not None
    s.reopen()
    v2 = auth.doc(DEVICE, 2, [auth.grant(KEPT, ["read_odometer"])], iat=world["now"])
    result = s.manager.apply(v2, source="mqtt")
    assert result.status == "applied"
    assert [r["grant"] for r in s.receipts("erasure")] == [GONE]
    # The receipt says the data are gone: no file in the state directory may hold the key, a row or the VIN.
    files = _files(s.dir)
    found = {what: _where(needle, files) for what, needle in world["secrets"].items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


_READER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN")
db.execute("SELECT COUNT(*) FROM batches").fetchone()  # a read snapshot, held until stdin closes
print("ready", flush=True)
sys.stdin.read()
db.execute("COMMIT")
"""


@pytest.fixture
def reader(world: dict[str, Any]) -> Iterator[Any]:
    """Another process (as `vgw status` or a backup tool would) holding a read snapshot of the outbox."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _READER, str(world["state"].dir / "outbox.sqlite")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _release(proc: Any) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


def test_busy_reader_means_no_erasure_receipt_until_the_copy_is_gone(world: dict[str, Any], reader: Any) -> None:
    s: State = world["state"]
    auth: Authority = world["auth"]
    v2 = auth.doc(DEVICE, 2, [auth.grant(KEPT, ["read_odometer"])], iat=world["now"])
    result = s.manager.apply(v2, source="mqtt")
    assert result.status == "applied" and [e.grant_id for e in result.revoked] == [GONE]
    # The snapshot keeps the old pages in the files: the scan sees the key, so nobody may claim it destroyed.
    assert _where(world["secrets"]["wrapped key"], _files(s.dir))
    assert not result.revoked[0].key_destroyed
    assert s.receipts("erasure") == []
    assert [e["event"] for e in s.events() if e.get("grant") == GONE] == ["grant-stopped", "erasure-pending"]
    assert s.manager.finish_pending_erasures() == []  # still held: still pending

    _release(reader)
    done = s.manager.finish_pending_erasures()  # the agent's main loop calls this every few seconds
    assert [(e.grant_id, e.batches_deleted, e.key_destroyed) for e in done] == [(GONE, world["batches"], True)]
    _assert_erased(s, world["secrets"], world["kept_key"])
    assert [(r["grant"], r["batches_deleted"], r["key_destroyed"]) for r in s.receipts("erasure")] == [
        (GONE, world["batches"], True)]
    assert [e["event"] for e in s.events() if e.get("grant") == GONE] == [
        "grant-stopped", "erasure-pending", "key-destroyed", "erasure-done"]


def test_pending_erasure_survives_a_restart(world: dict[str, Any], reader: Any) -> None:
    s: State = world["state"]
    auth: Authority = world["auth"]
    v2 = auth.doc(DEVICE, 2, [auth.grant(KEPT, ["read_odometer"])], iat=world["now"])
    assert not s.manager.apply(v2, source="mqtt").revoked[0].key_destroyed
    s.close()  # the agent stops (or dies) while the reader still holds its snapshot
    _release(reader)
    s.reopen()  # the restart finishes the erasure and only then sends its receipt
    _assert_erased(s, world["secrets"], world["kept_key"])
    assert [(r["grant"], r["reason"], r["key_destroyed"]) for r in s.receipts("erasure")] == [
        (GONE, "revoked", True)]
    assert not (s.dir / "erasures.pending.json").exists()


# -- narrowing: a grant that stays in force loses a scope (README "Narrowing applies to stored data") ---------


def _narrow(world: dict[str, Any]) -> tuple[dict[str, bytes], Any]:
    """Drop read_vin from GONE (it stays with location and speed); returns what must be gone, and the result."""
    s: State = world["state"]
    auth: Authority = world["auth"]
    db = s.outbox.path
    old = {"old wrapped key": world["secrets"]["wrapped key"], "old data key": world["secrets"]["data key"]}
    # Every row of the grant is withdrawn or sealed anew: no fragment of any old ciphertext may stay.
    old.update({f"old row {i}": bytes(b)[:48] for i, (b,) in enumerate(
        file_query(db, "SELECT blob FROM batches WHERE grant_id = ?", (GONE,)))})
    v2 = auth.doc(DEVICE, 2, [auth.grant(GONE, ["read_location", "read_speedometer"]),
                              auth.grant(KEPT, ["read_odometer"])], iat=world["now"])
    result = s.manager.apply(v2, source="mqtt")
    assert result.status == "applied" and [w.grant_id for w in result.narrowed] == [GONE]
    assert result.narrowed[0].batches_deleted > 0
    return old, result


def test_narrowing_receipt_says_key_destroyed_only_when_no_copy_is_in_any_file(world: dict[str, Any]) -> None:
    """The narrowing receipt said key_destroyed: true from the key row alone, while the replaced wrapped key
    and the deleted rows were still in the outbox's main file (the WAL had not been checkpointed)."""
    s: State = world["state"]
    old, result = _narrow(world)
    receipts = [r for r in s.receipts("erasure") if r["grant"] == GONE]
    assert [(r["reason"], r["key_destroyed"]) for r in receipts] == [("narrowed", True)]
    assert receipts[0]["scopes"] == ["read_vin"]
    assert receipts[0]["batches_deleted"] == result.narrowed[0].batches_deleted
    files = _files(s.dir)
    found = {what: _where(needle, files) for what, needle in old.items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    assert _where(world["kept_key"], files)  # the scan can see
    assert not (s.dir / "erasures.pending.json").exists()


def test_narrowing_with_a_busy_reader_is_pending_until_verified(world: dict[str, Any], reader: Any) -> None:
    """While another process held a read snapshot, the narrowing receipt still said key_destroyed: true with the
    replaced wrapped key in the file: now no receipt until the raw bytes are clean, then one that says so."""
    s: State = world["state"]
    old, result = _narrow(world)
    w = result.narrowed[0]
    assert _where(old["old wrapped key"], _files(s.dir))  # the snapshot keeps the old pages
    assert not w.key_destroyed
    assert [r for r in s.receipts("erasure") if r["grant"] == GONE] == []
    pending = json.loads((s.dir / "erasures.pending.json").read_text())
    assert [(p["grant"], p["reason"], p["batches_deleted"]) for p in pending] == [
        (GONE, "narrowed", w.batches_deleted)]
    assert s.manager.finish_pending_erasures() == []  # still held: still pending

    _release(reader)
    done = s.manager.finish_pending_erasures()
    assert [(e.grant_id, e.batches_deleted, e.key_destroyed) for e in done] == [(GONE, w.batches_deleted, True)]
    receipts = [r for r in s.receipts("erasure") if r["grant"] == GONE]
    assert [(r["reason"], r["key_destroyed"], r["scopes"], r["narrowing"], r["samples_deleted"])
            for r in receipts] == [("narrowed", True, ["read_vin"], ["scope-removed"], w.samples_deleted)]
    files = _files(s.dir)
    found = {what: _where(needle, files) for what, needle in old.items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    assert not (s.dir / "erasures.pending.json").exists()
    # The grant stays in force with its new key: its kept rows are still readable and sendable.
    assert s.outbox.has_key(GONE) and s.outbox.pending(10_000)
