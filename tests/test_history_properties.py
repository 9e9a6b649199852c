"""Property tests over random consent histories: what the cloud received, what the report says, what the
receipts claim, all agree with the history (README "Privacy report", "Limits hold across updates", "Receipts").

A history is a random sequence of: grant (or grant again), add a scope, narrow a scope away, change a limit,
set or drop a periodic collection rule, revoke, restart the agent, a stretch of a replayed drive (the demo
vehicle's recorded trace, in steps of 0.25 s of frame time) with the link up or down. It runs through a real car
(tests/historykit.py: consent manager, pipeline, writer, encrypted outbox) and the cloud that opens what it
receives. Then:
(a) every sample the cloud received was covered, at its frame time, by a grant in force holding its scope, on
    the grant's precision grid, no closer to the previous sample of its path than the limit allows unless the
    limit loosened (or the grant or scope stopped) in between, and at most one per period of a periodic rule;
(b) the report's counts equal what the cloud received, per grant, per period and per scope, and its periods are
    the history's (each boundary within the moment its document was applied);
(c) every erasure receipt's claims hold on disk: no key and no row of the grant right after, the rows deleted
    are those it held, and the audit anchor names the entry that records it.

`make test` runs a few short histories; `make test-slow` (--runslow) runs many long ones.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vgw.contract.consent.model import DEFAULT_LIMITS
from vgw_sim.pki import TestPKI

from tests.consentkit import Authority, payload_of
from tests.historykit import TRACE_START, Car, Cloud, catalogue, trace

DEVICE = "dev-0001"
GRANTS = ("g-a", "g-b")
SCOPES = ("read_speedometer", "read_thermometer", "read_fuel", "read_location", "read_odometer")
SCOPE_OF = catalogue().scope_of_path()
HZ = (None, 0.5, 1.0, 2.0)
STEP = 0.25  # frame time of one step of driving

action = st.one_of(
    st.tuples(st.just("grant"), st.sampled_from(GRANTS), st.lists(st.sampled_from(SCOPES), min_size=1, max_size=3,
                                                                  unique=True)),
    st.tuples(st.just("add"), st.sampled_from(GRANTS), st.sampled_from(SCOPES)),
    st.tuples(st.just("narrow"), st.sampled_from(GRANTS), st.sampled_from(SCOPES)),
    st.tuples(st.just("limit"), st.sampled_from(GRANTS), st.sampled_from(SCOPES), st.sampled_from(HZ)),
    st.tuples(st.just("rule"), st.sampled_from(GRANTS), st.sampled_from(SCOPES), st.sampled_from((None, 1.0, 2.0))),
    st.tuples(st.just("revoke"), st.sampled_from(GRANTS)),
    st.tuples(st.just("restart"),),
    st.tuples(st.just("drive"), st.integers(1, 12), st.booleans()),
)


@dataclass
class Terms:
    """One grant's terms in the model: its scopes and each scope's max_hz (None: none set)."""

    scopes: list[str]
    hz: dict[str, float | None] = field(default_factory=dict)
    period: dict[str, float] = field(default_factory=dict)  # scope -> period_s of its periodic rule

    def interval(self, scope: str) -> float:
        hz = self.hz.get(scope)
        if hz is None:
            hz = DEFAULT_LIMITS.get(scope, (None, None))[0]
        return 1.0 / hz if hz else 0.0


@dataclass
class Change:
    """A document: the frame time from which it governs, the wall-clock window of its application, its terms."""

    t: float
    wall: tuple[float, float]
    grants: dict[str, Terms]


class History:
    def __init__(self, root: Path, pki: TestPKI) -> None:
        self.auth = Authority(root)
        self.car = Car(root, pki, self.auth)
        self.cloud = Cloud(self.auth)
        self.t = TRACE_START
        self.ver = 0
        self.grants: dict[str, Terms] = {}
        self.changes: list[Change] = []
        self.receipt_checks: list[tuple[str, int]] = []  # (grant, rows it held before the revoking document)

    def publish(self) -> None:
        docs = []
        for gid, terms in self.grants.items():
            limits = {s: {"max_hz": terms.hz[s]} for s in terms.scopes if terms.hz.get(s)}
            g = self.auth.grant(gid, terms.scopes, limits=limits)
            rules = [{"scope": s, "mode": "periodic", "period_s": p} for s, p in sorted(terms.period.items())]
            if rules:
                g["collect"] = rules
            docs.append(g)
        self.ver += 1
        token = self.auth.doc(DEVICE, self.ver, docs, iat=int(time.time()) - 10)
        outbox = self.car.state.outbox
        self.car.flush()
        held = {g: n["rows"] for g, n in outbox.stats().items()}
        keys = self._wrapped_keys()
        receipts_before = len(outbox.pending_receipts(100_000))
        wall0 = time.time()
        active = {g.id for g in self.car.state.manager.active_grants()}
        assert self.car.apply(token) == "applied"
        wall1 = time.time()
        after = {g: n["rows"] for g, n in outbox.stats().items()}
        for gid in sorted(active - set(self.grants)):
            self.receipt_checks.append((gid, held.get(gid, 0)))
            # (c) right after the erasure: no key and no row of the revoked grant on disk.
            assert not outbox.has_key(gid) and gid not in after
        # (c) a narrowing's receipt: the batches it deleted are those gone from the outbox, and the key it says is
        # destroyed is in no byte of the outbox's files.
        for _, token_ in outbox.pending_receipts(100_000)[receipts_before:]:
            r = payload_of(token_)
            if r["typ"] != "erasure" or r.get("reason") != "narrowed":
                continue
            gid = r["grant"]
            assert r["batches_deleted"] == held.get(gid, 0) - after.get(gid, 0), (r, held, after)
            if r["key_destroyed"] and gid in keys:
                assert not self._on_disk(keys[gid]), r
        self.changes.append(Change(self.t, (wall0, wall1),
                                   {g: Terms(list(t.scopes), dict(t.hz), dict(t.period))
                                    for g, t in self.grants.items()}))

    def _wrapped_keys(self) -> dict[str, bytes]:
        import sqlite3

        db = sqlite3.connect(f"{(self.car.state.dir / 'outbox.sqlite').as_uri()}?mode=ro", uri=True)
        try:
            return {str(g): bytes(k) for g, k in db.execute("SELECT grant_id, wrapped FROM grant_keys")}
        finally:
            db.close()

    def _on_disk(self, needle: bytes) -> bool:
        files = [self.car.state.dir / "outbox.sqlite", self.car.state.dir / "outbox.sqlite-wal"]
        return any(f.exists() and needle in f.read_bytes() for f in files)

    def run(self, a: tuple[Any, ...]) -> None:
        kind = a[0]
        if kind == "grant":
            self.grants[a[1]] = Terms(list(a[2]))
            self.publish()
        elif kind == "add" and a[1] in self.grants and a[2] not in self.grants[a[1]].scopes:
            self.grants[a[1]].scopes.append(a[2])
            self.publish()
        elif kind == "narrow" and a[1] in self.grants and a[2] in self.grants[a[1]].scopes \
                and len(self.grants[a[1]].scopes) > 1:
            self.grants[a[1]].scopes.remove(a[2])
            self.grants[a[1]].hz.pop(a[2], None)
            self.grants[a[1]].period.pop(a[2], None)
            self.publish()
        elif kind == "rule" and a[1] in self.grants and a[2] in self.grants[a[1]].scopes:
            if a[3] is None:
                self.grants[a[1]].period.pop(a[2], None)
            else:
                self.grants[a[1]].period[a[2]] = a[3]
            self.publish()
        elif kind == "limit" and a[1] in self.grants and a[2] in self.grants[a[1]].scopes:
            self.grants[a[1]].hz[a[2]] = a[3]
            self.publish()
        elif kind == "revoke" and a[1] in self.grants:
            del self.grants[a[1]]
            self.publish()
        elif kind == "restart":
            self.car.restart()
        elif kind == "drive":
            end = self.t + a[1] * STEP
            frames = [f for f in trace() if self.t <= f[0] < end]
            for i in range(0, len(frames), 64):  # chunks, as the collector hands them over
                self.car.play(frames[i:i + 64])
            self.t = end
            if a[2]:  # the link is up: what is stored goes, and is acknowledged
                self.car.flush()
                self.cloud.drain(self.car)

    def finish(self) -> dict[str, Any]:
        self.car.flush()
        self.cloud.drain(self.car)
        return self.car.report()

    # -- the checks ---------------------------------------------------------------------------------

    def terms_at(self, t: float) -> dict[str, Terms]:
        current: dict[str, Terms] = {}
        for c in self.changes:
            if c.t < t:
                current = c.grants
        return current

    def check_samples(self) -> None:
        """(a) every sample covered by the grant, scope and limits in force at its frame time."""
        for gid, samples in self.cloud.samples.items():
            by_path: dict[str, list[float]] = {}
            for s in samples:
                terms = self.terms_at(s["t"]).get(gid)
                scope = SCOPE_OF[s["path"]]
                assert terms is not None and scope in terms.scopes, (gid, s["t"], s["path"])
                if scope == "read_location":  # the privacy default grid (100 m), none of these grants sets one
                    step = 100.0 / 111_320.0
                    if s["path"].endswith("Latitude"):
                        assert math.isclose(s["value"] / step, round(s["value"] / step), abs_tol=1e-6)
                by_path.setdefault(s["path"], []).append(s["t"])
            for path, ts in by_path.items():
                ts.sort()
                scope = SCOPE_OF[path]
                for t1, t2 in itertools.pairwise(ts):
                    assert t2 > t1, (gid, path, t1)  # nothing twice
                    if self.loosened_between(gid, scope, t1, t2):
                        continue
                    terms = self.terms_at(t2)[gid]
                    need = terms.interval(scope)
                    assert t2 - t1 >= need - 1e-6, (gid, path, t1, t2, need)
                    period = terms.period.get(scope)
                    if period and self.terms_at(t1)[gid].period.get(scope) == period:
                        # at most one reading per aligned period (README "Collection rules")
                        assert math.floor(t1 / period) != math.floor(t2 / period), (gid, path, t1, t2, period)

    def loosened_between(self, gid: str, scope: str, t1: float, t2: float) -> bool:
        """A limit or rule that started afresh between two samples: the grant or scope stopped, the limit
        loosened, or the rule changed (a new rule starts its periods anew)."""
        prev = self.terms_at(t1).get(gid)
        for c in self.changes:
            if t1 <= c.t < t2:
                now = c.grants.get(gid)
                if prev is None or now is None or scope not in now.scopes or scope not in prev.scopes:
                    return True
                if now.interval(scope) < prev.interval(scope) - 1e-9:
                    return True
                if now.period.get(scope) != prev.period.get(scope):
                    return True
                prev = now
        return False

    def check_report(self, report: dict[str, Any]) -> None:
        """(b) the report's periods are the history's, and its counts are what the cloud received."""
        listed = {g["id"]: g for g in report["grants"]}
        for gid in GRANTS:
            intervals: list[tuple[Change, Change | None]] = []
            start: Change | None = None
            for c in self.changes:
                if gid in c.grants and start is None:
                    start = c
                elif gid not in c.grants and start is not None:
                    intervals.append((start, c))
                    start = None
            if start is not None:
                intervals.append((start, None))
            received = self.cloud.samples.get(gid, [])
            if not intervals:
                assert gid not in listed
                continue
            g = listed[gid]
            assert len(g["periods"]) == len(intervals), (gid, g["periods"], len(intervals))
            for p, (begin, end) in zip(g["periods"], intervals, strict=True):
                assert begin.wall[0] <= p["from"] <= begin.wall[1]
                if end is None:
                    assert p["to"] is None
                else:
                    assert end.wall[0] <= p["to"] <= end.wall[1]
                acks = sum(n for a, t, n in self.cloud.acked_at if a == gid and p["from"] <= t
                           and (p["to"] is None or t <= p["to"]))
                assert p["samples"] == acks, (gid, p, acks)
                if p["samples"]:
                    assert p["from"] <= p["first_sent"] <= p["last_sent"] <= (p["to"] or math.inf)
            assert (g["sent"]["samples"] or 0) == len(received)
            per_scope = {sc["scope"]: sc["samples_sent"] or 0 for sc in g["scopes"]}
            for scope in SCOPES:
                assert per_scope.get(scope, 0) == sum(1 for s in received if SCOPE_OF[s["path"]] == scope)
                # Each scope period holds what was acknowledged in it (the sent log, per scope and version).
            for sc in g["scopes"]:
                assert sum(p["samples_sent"] for p in sc["periods"]) == (sc["samples_sent"] or 0), sc

    def check_receipts(self) -> None:
        """(c) every erasure receipt of a revocation: what it deleted, its key, its audit anchor."""
        state = self.car.state
        entries = {e["n"]: e for e in state.audit.entries()}
        revoked = [payload_of(t) for _, t in state.outbox.pending_receipts(100_000)]
        revoked = [r for r in revoked if r["typ"] == "erasure" and r.get("reason") == "revoked"]
        assert [(r["grant"]) for r in revoked] == [g for g, _ in self.receipt_checks]
        for r, (gid, rows) in zip(revoked, self.receipt_checks, strict=True):
            assert r["key_destroyed"] is True and r["batches_deleted"] == rows, (r, rows)
            anchor = entries[r["audit"]["n"]]
            assert anchor["hash"] == r["audit"]["hash"] and anchor["event"] == "erasure-done"
            assert anchor["grant"] == gid


def _run(pki: TestPKI, actions: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        h = History(Path(tmp), pki, )
        try:
            for a in actions:
                h.run(a)
            report = h.finish()
            h.check_samples()
            h.check_report(report)
            h.check_receipts()
        finally:
            h.car.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(actions=st.lists(action, min_size=1, max_size=12))
def test_random_consent_histories(pki: TestPKI, actions: list[tuple[Any, ...]]) -> None:
    _run(pki, [("grant", "g-a", ["read_speedometer"]), *actions, ("drive", 4, True)])


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(actions=st.lists(action, min_size=5, max_size=60))
def test_long_random_consent_histories(pki: TestPKI, actions: list[tuple[Any, ...]]) -> None:
    _run(pki, [("grant", "g-a", ["read_speedometer"]), *actions, ("drive", 4, True)])
