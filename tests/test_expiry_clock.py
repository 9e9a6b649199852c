"""Expiry and the device's monotonic clock (README "Consent document").

When ``exp`` passes every grant stops as if revoked, with erasure receipts. The device's now is
``max(wall clock, floor)``; the floor (newest accepted ``iat`` and latest time seen) is persisted in
``clock.json``, so a clock rolled back (flat RTC battery, an attacker) after a restart neither revives an
expired grant nor makes an expired document acceptable. Only the consent store's clock is moved here: receipts
and the audit log keep real time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vgw.state.consent.store as store_module

from tests.consentkit import Authority, State

DEVICE = "dev-0001"


class Clock:
    """Stands in for the ``time`` module inside vgw.state.consent.store only."""

    def __init__(self, t: float) -> None:
        self.t = t

    def time(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(time.time())
    monkeypatch.setattr(store_module, "time", c)
    return c


@pytest.fixture
def world(tmp_path: Path, pki: Any, clock: Clock) -> Iterator[dict[str, Any]]:
    auth = Authority(tmp_path)
    s = State(tmp_path, pki, auth)
    now = int(clock.t)
    v1 = auth.doc(DEVICE, 1, [auth.grant("g-a", ["read_odometer"]), auth.grant("g-b", ["read_fuel"])],
                  iat=now - 10, exp=now + 3600)
    assert s.manager.apply(v1, source="mqtt").status == "applied"
    for gid in ("g-a", "g-b"):
        s.outbox.commit_batch(gid, lambda seq: b"envelope", float(now), 1)
    try:
        yield {"auth": auth, "state": s, "now": now, "v1": v1, "exp": now + 3600}
    finally:
        s.close()


def _floor(s: State) -> float:
    return float(json.loads((s.dir / "clock.json").read_text())["floor"])


def test_expiry_stops_every_grant_with_erasure_receipts(world: dict[str, Any], clock: Clock) -> None:
    s: State = world["state"]
    assert s.manager.check_expiry() == []  # not yet
    clock.t = world["exp"] + 1
    erasures = s.manager.check_expiry()
    assert sorted(e.grant_id for e in erasures) == ["g-a", "g-b"]
    assert all(e.batches_deleted == 1 and e.key_destroyed for e in erasures)
    assert s.revoked_hook[-1] == frozenset({"g-a", "g-b"})  # collection stopped before disk erasure
    assert s.manager.expired and s.manager.active_grants() == ()
    assert s.outbox.active_grants() == set() and s.outbox.stats() == {}
    assert not s.outbox.has_key("g-a") and not s.outbox.has_key("g-b")
    receipts = s.receipts("erasure")
    assert sorted((r["grant"], r["ver"], r["reason"], r["key_destroyed"]) for r in receipts) == [
        ("g-a", 1, "expired", True), ("g-b", 1, "expired", True)]
    events = [e["event"] for e in s.events()]
    assert "consent-expired" in events and events.count("erasure-done") == 2
    assert s.manager.check_expiry() == []  # once


def test_clock_rolled_back_after_expiry_and_restart_cannot_revive(world: dict[str, Any], clock: Clock) -> None:
    s: State = world["state"]
    clock.t = world["exp"] + 5
    s.manager.check_expiry()
    # The agent dies right away (no periodic floor write), then the wall clock is set back an hour.
    assert _floor(s) >= world["exp"]
    clock.t = world["now"]
    s.reopen()
    assert s.manager.expired and s.manager.active_grants() == ()
    assert s.store.now() >= world["exp"]
    # The same document delivered again (retained message): still the expired one, nothing restarts.
    again = s.manager.apply(world["v1"], source="mqtt")
    assert again.status == "duplicate" and s.manager.active_grants() == ()
    # A newer document that expired between the rolled-back wall clock and the floor: rejected.
    auth: Authority = world["auth"]
    stale = auth.doc(DEVICE, 2, [auth.grant("g-a", ["read_odometer"])], iat=world["now"] - 10,
                     exp=world["exp"] + 1)
    r = s.manager.apply(stale, source="mqtt")
    assert r.status == "rejected" and r.error is not None and r.error.reason == "expired"
    assert s.receipts("consent-rejected")[-1]["reason"] == "expired"


def test_newest_iat_is_persisted_and_never_undercut(world: dict[str, Any], clock: Clock) -> None:
    s: State = world["state"]
    auth: Authority = world["auth"]
    future_iat = world["now"] + 250  # within the 300 s skew: accepted
    v2 = auth.doc(DEVICE, 2, [auth.grant("g-a", ["read_odometer"])], iat=future_iat, exp=future_iat + 100)
    assert s.manager.apply(v2, source="mqtt").status == "applied"
    assert _floor(s) >= future_iat
    clock.t = world["now"] - 7200  # clock set back two hours, then a restart
    s.reopen()
    assert s.store.now() >= future_iat
    # A document that would be valid at the rolled-back wall clock but expired before the accepted iat.
    old = auth.doc(DEVICE, 3, [auth.grant("g-a", ["read_odometer"])], iat=world["now"] - 7300,
                   exp=world["now"] - 7000)
    r = s.manager.apply(old, source="mqtt")
    assert r.status == "rejected" and r.error is not None and r.error.reason == "expired"


def test_now_never_runs_backwards(tmp_path: Path, clock: Clock) -> None:
    st = store_module.ConsentStore(tmp_path)
    clock.t = 2_000_000_000.0
    assert st.now() == 2_000_000_000.0
    clock.t = 1_000_000_000.0
    assert st.now() == 2_000_000_000.0
    st.persist()
    clock.t = 1_500_000_000.0
    assert store_module.ConsentStore(tmp_path).now() == 2_000_000_000.0


def test_expiry_while_switched_off_is_enforced_at_start(world: dict[str, Any], clock: Clock) -> None:
    s: State = world["state"]
    s.close()
    clock.t = world["exp"] + 600  # the car stood parked past exp
    s.reopen()
    assert s.manager.expired and s.manager.active_grants() == ()
    assert s.outbox.stats() == {} and not s.outbox.has_key("g-a") and not s.outbox.has_key("g-b")
    assert sorted((r["grant"], r["reason"]) for r in s.receipts("erasure")) == [("g-a", "expired"),
                                                                               ("g-b", "expired")]


def test_corrupt_clock_file_falls_back_to_wall_time(world: dict[str, Any], clock: Clock) -> None:
    s: State = world["state"]
    (s.dir / "clock.json").write_text("{not json")
    s.reopen()
    assert s.store.now() == clock.t  # loses only rollback protection, never blocks the agent
    assert s.manager.in_force is not None and not s.manager.expired
