"""A limit that stays or tightens holds across consent updates and agent restarts; a looser one starts afresh.

Seen: with ``read_speedometer`` limited to ``max_hz = 0.5`` ("at most one reading every 2 s"), 18 documents 0.7 s
apart that add or remove ``read_thermometer`` and keep the speed limit let 20 speed samples through in 13 s,
18 gaps under 2 s: every new document reset the limit. The time each path last kept a sample is now carried
to the next document with the same or a stricter limit, and kept on disk with the batch for the next start.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from vgw_sim.pki import TestPKI

from tests.consentkit import Authority
from tests.historykit import Car, Cloud

DEVICE = "dev-0001"
SPEED = ("Vehicle.Speed", "read_speedometer")
TEMP = ("Vehicle.Exterior.AirTemperature", "read_thermometer")


def _gaps(cloud: Cloud, gid: str, path: str) -> list[float]:
    ts = sorted(s["t"] for s in cloud.samples.get(gid, []) if s["path"] == path)
    return [round(b - a, 3) for a, b in itertools.pairwise(ts)]


def _doc(auth: Authority, ver: int, scopes: list[str], hz: float | None = 0.5) -> str:
    limits = {"read_speedometer": {"max_hz": hz}} if hz else {}
    return auth.doc(DEVICE, ver, [auth.grant("g-fleet", scopes, limits=limits)], iat=int(time.time()) - 10)


def _drive(car: Car, t0: float, seconds: float, step: float = 0.1) -> float:
    n = round(seconds / step)
    car.feed([(p, s, t0 + i * step, 50.0 + i) for i in range(n) for p, s in (SPEED, TEMP)])
    return t0 + n * step


def test_limit_holds_across_updates_that_keep_it(tmp_path: Path, pki: TestPKI) -> None:
    auth = Authority(tmp_path)
    cloud = Cloud(auth)
    car = Car(tmp_path, pki, auth)
    try:
        t = 1_795_920_000.0
        assert car.apply(_doc(auth, 1, ["read_speedometer"])) == "applied"
        for ver in range(2, 20):  # 18 documents 0.7 s apart, adding or removing the thermometer
            t = _drive(car, t, 0.7)
            scopes = ["read_speedometer", "read_thermometer"] if ver % 2 else ["read_speedometer"]
            assert car.apply(_doc(auth, ver, scopes)) == "applied"
        t = _drive(car, t, 0.7)
        car.flush()
        cloud.drain(car)
        gaps = _gaps(cloud, "g-fleet", "Vehicle.Speed")
        assert gaps and min(gaps) >= 2.0 - 1e-6, gaps
    finally:
        car.close()


def test_limit_holds_across_a_restart_and_a_stricter_document(tmp_path: Path, pki: TestPKI) -> None:
    auth = Authority(tmp_path)
    cloud = Cloud(auth)
    car = Car(tmp_path, pki, auth)
    try:
        t = 1_795_920_000.0
        assert car.apply(_doc(auth, 1, ["read_speedometer"])) == "applied"
        t = _drive(car, t, 3.0)
        car.restart()  # the mark of the last kept speed sample comes back from the disk
        t = _drive(car, t, 1.5)
        assert car.apply(_doc(auth, 2, ["read_speedometer", "read_thermometer"], hz=0.25)) == "applied"  # stricter
        t = _drive(car, t, 9.0)
        car.restart()
        t = _drive(car, t, 3.0)
        car.flush()
        cloud.drain(car)
        ts = sorted(s["t"] for s in cloud.samples["g-fleet"] if s["path"] == "Vehicle.Speed")
        gaps = _gaps(cloud, "g-fleet", "Vehicle.Speed")
        assert min(gaps) >= 2.0 - 1e-6, gaps
        stricter = [b - a for a, b in itertools.pairwise(ts) if b >= 1_795_920_000.0 + 4.5]
        assert stricter and min(stricter) >= 4.0 - 1e-6, (ts, stricter)
    finally:
        car.close()


def test_a_looser_limit_starts_afresh(tmp_path: Path, pki: TestPKI) -> None:
    auth = Authority(tmp_path)
    cloud = Cloud(auth)
    car = Car(tmp_path, pki, auth)
    try:
        t = 1_795_920_000.0
        assert car.apply(_doc(auth, 1, ["read_speedometer"], hz=0.1)) == "applied"  # one every 10 s
        t = _drive(car, t, 1.0)
        assert car.apply(_doc(auth, 2, ["read_speedometer"], hz=1.0)) == "applied"  # looser: one a second
        _drive(car, t, 1.05)
        car.flush()
        cloud.drain(car)
        ts = sorted(s["t"] for s in cloud.samples["g-fleet"] if s["path"] == "Vehicle.Speed")
        assert ts[0] == 1_795_920_000.0 and ts[1] == t  # the first sample under the new terms is not held back
    finally:
        car.close()


def test_a_new_limit_counts_from_the_last_reading_sent(tmp_path: Path, pki: TestPKI) -> None:
    """No limit, then "at most one every 2 s": the first reading under the new terms came 0.25 s after the last
    one sent under the old (found by tests/test_history_properties.py)."""
    auth = Authority(tmp_path)
    cloud = Cloud(auth)
    car = Car(tmp_path, pki, auth)
    try:
        t = 1_795_920_000.0
        assert car.apply(_doc(auth, 1, ["read_speedometer"], hz=None)) == "applied"
        t = _drive(car, t, 1.0)
        car.restart()  # and the time of the last reading sent survives a restart too
        cloud.drain(car)  # sent before the new limit (a stricter limit deletes what is still stored)
        assert car.apply(_doc(auth, 2, ["read_speedometer"], hz=0.5)) == "applied"
        _drive(car, t, 5.0)
        car.flush()
        cloud.drain(car)
        ts = sorted(s["t"] for s in cloud.samples["g-fleet"] if s["path"] == "Vehicle.Speed")
        before = [x for x in ts if x < t]
        after = [x for x in ts if x >= t]
        assert len(before) == 10 and after and after[0] - before[-1] >= 2.0 - 1e-6, (before[-1:], after)
    finally:
        car.close()


def test_a_periodic_rule_sends_one_reading_per_period_across_a_restart(tmp_path: Path, pki: TestPKI) -> None:
    """A restart mid-period sent the partial window at shutdown, and the engine that started afresh sent the same
    period again (two readings where the rule promises one; found by tests/test_history_properties.py)."""
    auth = Authority(tmp_path)
    cloud = Cloud(auth)
    car = Car(tmp_path, pki, auth)
    try:
        g = auth.grant("g-fleet", ["read_speedometer"])
        g["collect"] = [{"scope": "read_speedometer", "mode": "periodic", "period_s": 10}]
        assert car.apply(auth.doc(DEVICE, 1, [g], iat=int(time.time()) - 10)) == "applied"
        t = _drive(car, 1_795_920_000.0, 3.0)
        car.restart()
        _drive(car, t, 19.0)
        car.flush()
        cloud.drain(car)
        ts = sorted(s["t"] for s in cloud.samples["g-fleet"] if s["path"] == "Vehicle.Speed")
        windows = [int(x // 10) for x in ts]
        assert ts and len(windows) == len(set(windows)), ts
    finally:
        car.close()


def test_a_trace_replayed_again_after_a_restart_is_a_new_time_line(tmp_path: Path, pki: TestPKI) -> None:
    """The carried mark must not hold back a trace that starts over (frame times far before the mark): the limit
    counts afresh in the new time line, and still holds within it."""
    auth = Authority(tmp_path)
    cloud = Cloud(auth)
    car = Car(tmp_path, pki, auth)
    try:
        t0 = 1_795_920_000.0
        assert car.apply(_doc(auth, 1, ["read_speedometer"])) == "applied"
        _drive(car, t0, 20.0)
        car.restart()
        _drive(car, t0, 10.0)  # the same trace from its start
        car.flush()
        cloud.drain(car)
        ts = [s["t"] for s in cloud.samples["g-fleet"] if s["path"] == "Vehicle.Speed"]
        second = ts[10:]
        assert len(ts[:10]) == 10 and len(second) == 5, ts
        assert all(b - a >= 2.0 - 1e-6 for a, b in itertools.pairwise(second))
    finally:
        car.close()


def test_limit_holds_while_documents_arrive_over_mqtt(tmp_path: Path, pki: TestPKI, broker: Any, cloud: Any,
                                                      channel: str, vehicle: Any) -> None:
    """End to end (virtual CAN -> agent -> mosquitto -> cloud peer): the speed limited to one reading every 2 s,
    then 18 documents 0.7 s apart that add or remove the thermometer and keep that limit; every gap the app
    sees is still at least 2 s."""
    from vgw_sim.cloud import consent_claims, grant, sign_consent

    from tests.agentkit import AgentThread, write_config
    from tests.agentkit import Authority as AgentAuthority

    auth = AgentAuthority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    cloud.add_recipient("g-fleet", auth.recipient("g-fleet"))

    def doc(ver: int, scopes: list[str]) -> str:
        g = grant("g-fleet", scopes, auth.recipient("g-fleet"), limits={"read_speedometer": {"max_hz": 0.5}})
        return sign_consent(consent_claims(DEVICE, ver, [g]), auth.key)

    def speeds() -> list[float]:
        return sorted(s.t for s in cloud.samples(DEVICE, "g-fleet") if s.path == "Vehicle.Speed")

    with AgentThread(cfg) as agent:
        assert agent.wait_link()
        cloud.publish_consent(DEVICE, doc(1, ["read_speedometer"]))
        assert cloud.wait_for(lambda: len(speeds()) >= 1, 15)
        for ver in range(2, 20):
            time.sleep(0.7)  # the pace of the documents is the point here, not a wait for a condition
            cloud.publish_consent(DEVICE, doc(ver, ["read_speedometer", "read_thermometer"] if ver % 2 else
                                               ["read_speedometer"]))
        assert cloud.wait_for(lambda: any(r.claims.get("ver") == 19
                                          for r in cloud.receipts(DEVICE, "consent-applied")), 15)
        n = len(speeds())
        assert cloud.wait_for(lambda: len(speeds()) >= n + 2, 15)
    gaps = [b - a for a, b in itertools.pairwise(speeds())]
    assert len(gaps) >= 5 and min(gaps) >= 2.0 - 1e-3, gaps


def test_a_withdrawn_scope_or_grant_leaves_no_rate_mark(tmp_path: Path, pki: TestPKI) -> None:
    """When each path last sent is timing data about the drive: it goes with the scope narrowed away, and with
    the grant revoked (the one erasure routine)."""
    auth = Authority(tmp_path)
    car = Car(tmp_path, pki, auth)
    try:
        t = 1_795_920_000.0
        assert car.apply(_doc(auth, 1, ["read_speedometer", "read_thermometer"])) == "applied"
        t = _drive(car, t, 3.0)
        car.flush()
        assert set(car.state.outbox.rate_marks()["g-fleet"]) == {SPEED[0], TEMP[0]}
        assert car.apply(_doc(auth, 2, ["read_speedometer"])) == "applied"
        assert set(car.state.outbox.rate_marks()["g-fleet"]) == {SPEED[0]}
        _drive(car, t, 1.0)
        assert car.apply(auth.doc(DEVICE, 3, [], iat=int(time.time()) - 10)) == "applied"
        assert car.state.outbox.rate_marks() == {}
    finally:
        car.close()
