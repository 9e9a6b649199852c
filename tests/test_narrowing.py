"""A narrowed grant applies to stored data too (README "Telemetry envelope", README "Narrowing applies to stored data").

End to end: the real agent (live simulated vehicle on a virtual bus) stores batches while the broker
(mosquitto over mutual TLS) is down, the owner narrows a grant with `vgw consent apply`, the broker comes
back; nothing the new terms withdraw may reach the cloud, and an erasure receipt says what was deleted.
Below them, fast checks of the pure narrowing rule and of the outbox (schema migration, commit- and
publish-time checks).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from vgw.base.errors import StorageError
from vgw.contract.consent.model import Grant, Limits, Recipient
from vgw.contract.consent.narrowing import NarrowingKind, narrowing, terms_digest
from vgw.state.keys import new_data_key
from vgw.state.outbox import LEGACY_TERMS, SCHEMA_VERSION, GrantTerms, Outbox, TermsChanged
from vgw_sim.cloud import RecipientKey, consent_claims, grant, sign_consent

from tests.agentkit import AgentThread, Authority, vgw, wait_until, write_config
from tests.faultkit import DEV, file_query, file_write, persistent_world

G = "g"
ODO, SPEED = "Vehicle.TraveledDistance", "Vehicle.Speed"
LAT, LON = "Vehicle.CurrentLocation.Latitude", "Vehicle.CurrentLocation.Longitude"


def _sign(auth: Authority, scopes: list[str], **kw: Any) -> str:
    auth.ver += 1
    return sign_consent(consent_claims(DEV, auth.ver, [grant(G, scopes, auth.recipient(G), **kw)]), auth.key)


def _apply(cfg: Path, token: str, tmp: Path) -> None:
    doc = tmp / f"doc-{time.monotonic_ns()}.jws"
    doc.write_text(token)
    r = vgw("consent", "apply", "--config", str(cfg), str(doc))
    assert r.returncode == 0, r.stderr


def _arrived(cloud: Any) -> int:
    """Data messages of G the cloud got: opened, dropped as duplicates, or not opened (another key)."""
    return (len(cloud.batches(DEV, G)) + cloud.duplicates(DEV, G)
            + sum(1 for m in cloud.rejected() if m.topic.endswith(f"/data/{G}")))


# (before, after, paths the narrowing withdraws, expected kinds)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], set[str], list[str]]] = {
    # The "Seen": offline, g had speed and odometer; the new document keeps speed only.
    "scope-removed": ({"scopes": ["read_speedometer", "read_odometer"]},
                      {"scopes": ["read_speedometer"]}, {ODO}, ["scope-removed"]),
    "max-hz-lowered": ({"scopes": ["read_speedometer", "read_location"],
                        "limits": {"read_location": {"max_hz": 2.0}}},
                       {"scopes": ["read_speedometer", "read_location"],
                        "limits": {"read_location": {"max_hz": 0.5}}}, {LAT, LON}, ["limit-tightened"]),
    "precision-coarser": ({"scopes": ["read_speedometer", "read_location"],
                           "limits": {"read_location": {"max_hz": 2.0, "precision_m": 100}}},
                          {"scopes": ["read_speedometer", "read_location"],
                           "limits": {"read_location": {"max_hz": 2.0, "precision_m": 1000}}},
                          {LAT, LON}, ["limit-tightened"]),
    "new-limit": ({"scopes": ["read_speedometer", "read_odometer"]},
                  {"scopes": ["read_speedometer", "read_odometer"], "limits": {"read_odometer": {"max_hz": 0.5}}},
                  {ODO}, ["limit-tightened"]),
    "recipient-changed": ({"scopes": ["read_speedometer", "read_odometer"]},
                          {"scopes": ["read_speedometer", "read_odometer"]}, {SPEED, ODO}, ["recipient-changed"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_narrowing_while_offline_never_sends_withdrawn_stored_data(case, tmp_path, pki, channel, vehicle):
    before, after, withdrawn, kinds = CASES[case]
    auth = Authority(tmp_path)
    with persistent_world(pki, auth, G) as (broker, cloud):
        cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel},
                           batch={"max_interval_s": 0.5})
        _apply(cfg, _sign(auth, **before), tmp_path)
        with AgentThread(cfg) as runner:
            agent = runner.agent
            assert runner.wait_link()
            paths = set(withdrawn)
            assert cloud.wait_for(lambda: paths <= {s.path for s in cloud.samples(DEV, G)}, 15)

            broker.stop()
            down = time.time() + 1.0  # later samples cannot have been in flight when the link went
            assert wait_until(lambda: agent.outbox.stats().get(G, {}).get("rows", 0) >= 8, 15)
            stored = agent.outbox.stats()[G]["rows"]
            if case == "recipient-changed":
                # The cloud keeps the old key: a leaked old batch would open, and be caught below.
                auth.recipients[G] = RecipientKey.generate()
            applying = time.time()  # every sample before this was collected under the old terms
            _apply(cfg, _sign(auth, **after), tmp_path)
            assert wait_until(lambda: agent.manager.in_force is not None and agent.manager.in_force.ver == auth.ver,
                              2.0)
            narrowed = time.time()

            broker.start()
            assert runner.wait_link(10)
            if case != "recipient-changed":  # data collected under the new terms flow again
                assert cloud.wait_for(lambda: any(s.t > narrowed + 0.5 for s in cloud.samples(DEV, G)), 15)
                assert [m for m in cloud.rejected() if m.topic.endswith(f"/data/{G}")] == []
            assert wait_until(lambda: agent.uplink.drain(0.1), 20)
            assert cloud.wait_for(lambda: _arrived(cloud) >= agent.uplink.view().published_batches, 15)
            leaked = [(s.path, s.t) for s in cloud.samples(DEV, G) if s.path in withdrawn and down < s.t < applying]
            assert leaked == [], f"{len(leaked)} withdrawn sample(s) collected offline reached the cloud"
            assert cloud.wait_for(lambda: any(r.claims.get("reason") == "narrowed"
                                              for r in cloud.receipts(DEV, "erasure")), 15)
            counters = agent.outbox.counters()

        receipt = next(r for r in cloud.receipts(DEV, "erasure") if r.claims.get("reason") == "narrowed")
        claims = receipt.claims
        assert claims["grant"] == G and claims["ver"] == auth.ver and claims["narrowing"] == kinds
        assert claims["key_destroyed"] is True
        assert claims["batches_deleted"] >= min(stored, 3), (claims, stored)
        assert claims["samples_deleted"] >= claims["batches_deleted"]
        assert cloud.bad_receipts() == []
        assert counters[f"narrowed_batches:{G}"] == claims["batches_deleted"]
        events = [json.loads(line) for line in (tmp_path / "state" / "audit.log").read_text().splitlines()
                  if '"grant-narrowed"' in line]
        assert events and events[-1]["batches_deleted"] == claims["batches_deleted"]


def test_shortened_retention_deletes_older_stored_batches_with_a_receipt(tmp_path, pki, channel, vehicle):
    auth = Authority(tmp_path)
    with persistent_world(pki, auth, G) as (broker, cloud):
        cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel},
                           batch={"max_interval_s": 0.5})
        _apply(cfg, _sign(auth, ["read_speedometer"], retention_s=3600), tmp_path)
        with AgentThread(cfg) as runner:
            agent = runner.agent
            assert runner.wait_link()
            assert cloud.wait_for(lambda: len(cloud.batches(DEV, G)) >= 2, 15)
            broker.stop()
            down = time.time() + 1.0
            assert wait_until(lambda: agent.outbox.stats().get(G, {}).get("rows", 0) >= 8, 15)
            applying = time.time()
            _apply(cfg, _sign(auth, ["read_speedometer"], retention_s=1), tmp_path)
            assert wait_until(lambda: agent.manager.in_force is not None and agent.manager.in_force.ver == auth.ver,
                              2.0)
            broker.start()
            assert runner.wait_link(10)
            assert cloud.wait_for(lambda: any(r.claims.get("reason") == "narrowed"
                                              for r in cloud.receipts(DEV, "erasure")), 15)
            assert wait_until(lambda: agent.uplink.drain(0.1), 20)
        receipt = next(r for r in cloud.receipts(DEV, "erasure") if r.claims.get("reason") == "narrowed")
        assert receipt.claims["narrowing"] == ["retention-shortened"] and receipt.claims["batches_deleted"] >= 3
        old = [s.t for s in cloud.samples(DEV, G) if down < s.t < applying - 2.0]
        assert old == []


# -- the pure rule -------------------------------------------------------------------------------------


def _grant(scopes: tuple[str, ...] = ("read_speedometer", "read_odometer"), **kw: Any) -> Grant:
    base: dict[str, Any] = {"id": G, "controller": "c", "purpose": "p", "scopes": scopes,
                            "recipient": Recipient("X25519", b"\x01" * 32)}
    return Grant(**(base | kw))


def test_narrowing_rule_names_each_kind_and_loosening_withdraws_nothing():
    old = _grant(limits={"read_location": Limits(max_hz=1.0, precision_m=100.0)},
                 scopes=("read_speedometer", "read_odometer", "read_location"), retention_s=600)
    assert not narrowing(old, old)
    n = narrowing(old, _grant(limits=old.limits, scopes=("read_speedometer", "read_location"), retention_s=600))
    assert n.kinds == {NarrowingKind.SCOPE_REMOVED} and n.scopes == {"read_odometer"} and not n.withdraw_all
    n = narrowing(old, _grant(scopes=old.scopes, limits={"read_location": Limits(max_hz=1.0, precision_m=500.0)},
                              retention_s=600))
    assert n.kinds == {NarrowingKind.LIMIT_TIGHTENED} and n.scopes == {"read_location"}
    n = narrowing(old, _grant(scopes=old.scopes, limits=old.limits | {"read_speedometer": Limits(max_hz=1.0)},
                              retention_s=600))
    assert n.scopes == {"read_speedometer"}
    n = narrowing(old, _grant(scopes=old.scopes, limits=old.limits, retention_s=60))
    assert n.kinds == {NarrowingKind.RETENTION_SHORTENED} and n.retention_s == 60 and not n.scopes
    n = narrowing(old, _grant(scopes=old.scopes, limits=old.limits, retention_s=600,
                              recipient=Recipient("X25519", b"\x02" * 32)))
    assert n.withdraw_all and NarrowingKind.RECIPIENT_CHANGED in n.kinds
    n = narrowing(old, _grant(scopes=old.scopes, limits=old.limits, retention_s=600, purpose="marketing"))
    assert n.withdraw_all and n.kinds == {NarrowingKind.TERMS_CHANGED}
    # Loosening: a new scope, a higher max_hz, a finer precision than before is not asked for here, longer
    # retention, no retention at all.
    looser = _grant(scopes=(*old.scopes, "read_fuel"), limits={"read_location": Limits(max_hz=5.0,
                                                                                        precision_m=100.0)})
    assert not narrowing(old, looser)
    assert terms_digest(old) != terms_digest(looser) and terms_digest(old) == terms_digest(_grant(**{
        "scopes": old.scopes, "limits": dict(old.limits), "retention_s": 600}))


# -- the outbox ----------------------------------------------------------------------------------------


def _commit(outbox: Outbox, scopes: dict[str, int], terms: str | None = None) -> int:
    return outbox.commit_batch(G, lambda seq: b"sealed-%d" % seq, 1.0, sum(scopes.values()), scopes=scopes,
                               terms=terms).seq


def test_withdrawn_rows_are_never_pending_and_old_batches_are_refused(tmp_path):
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, new_data_key(), DEV)
    old, new = _grant(), _grant(scopes=("read_speedometer",))
    outbox.apply_terms({G: GrantTerms(terms_digest(old), frozenset(old.scopes))})
    _commit(outbox, {"read_speedometer": 5, "read_odometer": 1}, terms_digest(old))  # mixed
    _commit(outbox, {"read_speedometer": 5}, terms_digest(old))  # still permitted
    _commit(outbox, {"read_odometer": 2}, terms_digest(old))
    [(key_before,)] = file_query(path, "SELECT wrapped FROM grant_keys")

    [w] = outbox.apply_terms({G: GrantTerms(terms_digest(new), frozenset(new.scopes), narrowing(old, new),
                                            terms_digest(old))})
    assert (w.batches_deleted, w.samples_deleted, w.key_destroyed) == (2, 8, True)
    rows = outbox.pending(10)
    assert [(r.seq, r.payload) for r in rows] == [(2, b"sealed-2")]  # resealed under the new key, still opens
    assert file_query(path, "SELECT wrapped FROM grant_keys") != [(key_before,)]
    # A batch still in memory under the old terms when the narrowing landed is refused, not stored.
    with pytest.raises(TermsChanged):
        _commit(outbox, {"read_odometer": 1}, terms_digest(old))
    assert _commit(outbox, {"read_speedometer": 1}, terms_digest(new)) == 4
    # Publish-time check: a row whose terms are not the ones in force is never handed out, whatever else
    # happened (here: its stamp is changed behind the outbox's back).
    file_write(path, "UPDATE batches SET terms = 'stale' WHERE seq = 4")
    assert [r.seq for r in outbox.pending(10)] == [2]
    assert outbox.counters()[f"narrowed_samples:{G}"] == 8
    outbox.close()


def test_old_outbox_files_are_migrated_and_unjudgeable_rows_never_leave(tmp_path):
    path = tmp_path / "outbox.sqlite"
    storage = new_data_key()
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE active_grants (id TEXT PRIMARY KEY) WITHOUT ROWID;
        CREATE TABLE grant_keys (grant_id TEXT PRIMARY KEY, wrapped BLOB NOT NULL) WITHOUT ROWID;
        CREATE TABLE seqs (grant_id TEXT PRIMARY KEY, next_seq INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, grant_id TEXT NOT NULL, seq INTEGER NOT NULL,
            created REAL NOT NULL, first_t REAL NOT NULL, samples INTEGER NOT NULL, blob BLOB NOT NULL,
            UNIQUE (grant_id, seq));
        CREATE TABLE receipts (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, token TEXT NOT NULL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO active_grants VALUES ('g');
    """)
    db.commit()
    db.close()
    # The previous version: scopes recorded per batch, terms not yet.
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE batches ADD COLUMN scopes TEXT NOT NULL DEFAULT '{}'")
    for seq, scopes in ((1, {"read_speedometer": 3}), (2, {"read_odometer": 3}), (3, {})):
        db.execute("INSERT INTO batches (grant_id, seq, created, first_t, samples, blob, scopes) "
                   "VALUES ('g', ?, ?, 1.0, 3, x'00', ?)", (seq, time.time(), json.dumps(scopes)))
    db.commit()
    db.close()

    outbox = Outbox(path, storage, DEV)
    assert file_query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert {r[0] for r in file_query(path, "SELECT terms FROM batches")} == {LEGACY_TERMS}
    assert outbox.pending(10) == []  # nothing legacy leaves before it is judged
    g = _grant(scopes=("read_speedometer",))
    [w] = outbox.apply_terms({G: GrantTerms(terms_digest(g), frozenset(g.scopes))})
    # The odometer row (scope no longer granted) and the row with no recorded scopes are deleted.
    assert (w.batches_deleted, w.kinds) == (2, {NarrowingKind.TERMS_CHANGED})
    assert file_query(path, "SELECT seq FROM batches") == [(1,)]
    epoch = outbox.epoch
    outbox.close()
    again = Outbox(path, storage, DEV)
    assert again.epoch == epoch  # made once, kept for the outbox's life
    again.close()


# -- collection rules (README "Collection rules"; docs/privacy.md, "Narrowing and collection rules") -------------


def _ruled(*rules: dict[str, Any], scopes: tuple[str, ...] = ("read_speedometer", "read_odometer",
                                                                 "read_location")) -> Grant:
    from vgw.contract.rules.rules import parse_rules

    return _grant(scopes=scopes, collect=parse_rules(list(rules), scopes))


def test_terms_digest_of_rules_is_the_same_in_every_process_and_cheap():
    """Stored rows are stamped with their grant's terms digest, and a row stamped with another digest is deleted
    at start. The digest held the repr of the parsed rules: a condition reading two paths printed its path set in
    hash order, which changes with every process (PYTHONHASHSEED), so a restart could delete the stored batches
    of a grant whose terms had not changed; and the repr of a condition's whole tree, recomputed for every batch
    (about 2 ms for a grant of long conditions), took more CPU than evaluating them."""
    import subprocess
    import sys

    code = ("from vgw.contract.rules.rules import parse_rules\n"
            "from vgw.contract.consent.model import Grant, Recipient\n"
            "from vgw.contract.consent.narrowing import terms_digest\n"
            "s = ('read_location', 'read_speedometer', 'read_thermometer')\n"
            "r = parse_rules([{'scope': 'read_location', 'mode': 'trigger', 'when': "
            "'Vehicle.Speed > 5 and Vehicle.Exterior.AirTemperature < 0 or Vehicle.Speed < 1'}], s)\n"
            "print(terms_digest(Grant(id='g', controller='c', purpose='p', scopes=s, "
            "recipient=Recipient('X25519', bytes(32)), collect=r)))\n")
    digests = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": str(seed)}, capture_output=True,
                              text=True, check=True).stdout for seed in range(6)}
    assert len(digests) == 1
    # The rules as the document states them count, not how this agent holds them: the same rules in another
    # order are the same terms (as for narrowing), another condition is not.
    speed = {"scope": "read_speedometer", "mode": "aggregate", "window_s": 60}
    trig = {"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 1+1"}
    assert terms_digest(_ruled(speed, trig)) == terms_digest(_ruled(trig, speed))
    assert terms_digest(_ruled(speed, trig)) != terms_digest(_ruled(speed, {**trig, "when": "Vehicle.Speed > 3"}))
    # A grant without rules keeps the digest earlier versions stamped its stored rows with (else an update would
    # delete every unsent batch at start).
    plain = Grant(id="g", controller="c", purpose="p", scopes=("read_location", "read_speedometer"),
                  recipient=Recipient("X25519", bytes(32)))
    assert terms_digest(plain) == "764fc37d8a8f24e6b38b20f445c79e17"


def test_a_changed_rule_withdraws_only_the_stored_data_of_its_scope(tmp_path):
    """A change of the `collect` rules was `terms-changed`: every stored batch of the grant was deleted, the
    odometer rows collected under an untouched rule too. Now the stored data of each scope whose rule changed
    in any way (tighter, looser, another mode, added or removed) are withdrawn, and only those."""
    speed_agg = {"scope": "read_speedometer", "mode": "aggregate", "window_s": 60}
    odo = {"scope": "read_odometer", "mode": "periodic", "period_s": 60}
    old = _ruled(speed_agg, odo)
    assert not narrowing(old, _ruled(speed_agg, odo))
    assert not narrowing(old, _ruled(odo, speed_agg))  # the order of the rules means nothing
    cases = {
        "looser window": (_ruled({**speed_agg, "window_s": 10}, odo), {"read_speedometer"}),
        "tighter window": (_ruled({**speed_agg, "window_s": 600}, odo), {"read_speedometer"}),
        "rule removed": (_ruled(odo), {"read_speedometer"}),
        "rule added": (_ruled(speed_agg, odo, {"scope": "read_location", "mode": "periodic", "period_s": 5}),
                       {"read_location"}),
        "rule by path": (_ruled({"path": SPEED, "mode": "on_change", "deadband": 1}, odo), {"read_speedometer"}),
        "every rule removed": (_grant(scopes=old.scopes), {"read_speedometer", "read_odometer"}),
    }
    for name, (new, withdrawn) in cases.items():
        n = narrowing(old, new)
        assert (n.kinds, n.scopes, n.withdraw_all) == ({NarrowingKind.RULES_CHANGED}, withdrawn, False), name
    # A trigger whose condition changed withdraws the scope it collects, not the scopes its condition reads.
    trig = {"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 100", "pre_s": 10}
    n = narrowing(_ruled(trig), _ruled({**trig, "when": "Vehicle.Speed > 120"}))
    assert n.scopes == {"read_location"}
    # terms_digest is unchanged by this rule: rows stored by the previous version keep their stamp.
    assert terms_digest(old) != terms_digest(_ruled(odo))

    outbox = Outbox(tmp_path / "outbox.sqlite", new_data_key(), DEV)
    outbox.apply_terms({G: GrantTerms(terms_digest(old), frozenset(old.scopes))})
    _commit(outbox, {"read_speedometer": 2}, terms_digest(old))
    _commit(outbox, {"read_odometer": 3}, terms_digest(old))
    new = _ruled({**speed_agg, "window_s": 10}, odo)
    [w] = outbox.apply_terms({G: GrantTerms(terms_digest(new), frozenset(new.scopes), narrowing(old, new),
                                            terms_digest(old))})
    assert (w.kinds, w.batches_deleted, w.samples_deleted) == ({NarrowingKind.RULES_CHANGED}, 1, 2)
    assert [r.seq for r in outbox.pending(10)] == [2]  # the odometer batch stays
    outbox.close()



def test_a_narrowing_over_a_key_that_cannot_be_unwrapped_destroys_it_and_its_rows(tmp_path: Path) -> None:
    """README "Receipts": an erasure receipt says key_destroyed true; a key sealed under a replaced storage key
    cannot be re-sealed, so it goes with the rows it sealed (nobody could read or send them) instead of staying."""
    wide, narrow = _grant(), _grant(("read_speedometer",))
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, new_data_key(), DEV)
    outbox.apply_terms({wide.id: GrantTerms(terms_digest(wide), frozenset(wide.scopes))})
    outbox.commit_batch(wide.id, lambda seq: b"sealed", 1.0, 3, scopes={"read_odometer": 3})
    outbox.commit_batch(wide.id, lambda seq: b"sealed", 2.0, 2, scopes={"read_speedometer": 2})
    outbox.close()
    other = Outbox(path, new_data_key(), DEV)  # the storage key was replaced: the data key does not unwrap
    [w] = other.apply_terms({wide.id: GrantTerms(terms_digest(narrow), frozenset(narrow.scopes),
                                                 narrowing(wide, narrow), terms_digest(wide))})
    assert NarrowingKind.SCOPE_REMOVED in w.kinds
    assert w.key_destroyed and not w.pending
    assert not other.has_key(wide.id)
    assert other.stats().get(wide.id, {}).get("rows", 0) == 0
    assert other.counters().get(f"unreadable_deleted:{wide.id}") == 1
    other.close()


def test_a_narrowing_the_disk_refuses_leaves_every_row_readable_for_the_retry(tmp_path):
    # Found by the fault-schedule explorer (docs/guarantees.md): a narrowing replaces the grant's data key; when
    # its transaction rolled back (a full disk at COMMIT) the outbox still held the new key in memory, so the
    # retry could not open the rows sealed under the old one (InvalidTag) and the agent died.
    outbox = Outbox(tmp_path / "outbox.sqlite", new_data_key(), DEV)
    old, new = _grant(), _grant(scopes=("read_speedometer",))
    outbox.apply_terms({G: GrantTerms(terms_digest(old), frozenset(old.scopes))})
    _commit(outbox, {"read_speedometer": 5}, terms_digest(old))
    _commit(outbox, {"read_odometer": 2}, terms_digest(old))
    assert [r.seq for r in outbox.pending(10)] == [1, 2]
    narrowed = {G: GrantTerms(terms_digest(new), frozenset(new.scopes), narrowing(old, new), terms_digest(old))}
    # The last write of the transaction fails, after the key was replaced, as a full disk does at COMMIT.
    outbox._db.execute("CREATE TEMP TRIGGER full BEFORE INSERT ON counters BEGIN SELECT RAISE(ABORT, 'full'); END")
    with pytest.raises(StorageError):
        outbox.apply_terms(narrowed)
    outbox._db.execute("DROP TRIGGER full")
    assert [(r.seq, r.payload) for r in outbox.pending(10)] == [(1, b"sealed-1"), (2, b"sealed-2")]  # old terms
    [w] = outbox.apply_terms(narrowed)
    assert (w.batches_deleted, w.key_destroyed) == (1, True)
    assert [(r.seq, r.payload) for r in outbox.pending(10)] == [(1, b"sealed-1")]
    outbox.close()
