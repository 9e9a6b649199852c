"""Collection rules in the pipeline: before limits, per grant, and gone from memory on revocation."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vgw.contract.consent.model import Grant
from vgw.contract.consent.verifier import verify_consent
from vgw.pipeline.router import Pipeline
from vgw.state.consent.manager import load_trust_keys

from tests.consentkit import Authority

DEVICE = "dev-0001"
SPEED, LAT, LON, TEMP = ("Vehicle.Speed", "Vehicle.CurrentLocation.Latitude", "Vehicle.CurrentLocation.Longitude",
                         "Vehicle.Exterior.AirTemperature")
SCOPE = {SPEED: "read_speedometer", LAT: "read_location", LON: "read_location", TEMP: "read_thermometer"}
T0 = 1_795_920_000.0

_AUTH: dict[str, Authority] = {}


def grants(tmp: Path, *specs: dict[str, Any]) -> tuple[Grant, ...]:
    """Grants as the real verifier makes them from a signed document."""
    if str(tmp) not in _AUTH:
        _AUTH[str(tmp)] = Authority(tmp)
    auth = _AUTH[str(tmp)]
    docs = []
    for spec in specs:
        g = auth.grant(spec["id"], spec["scopes"], limits=spec.get("limits"))
        if "collect" in spec:
            g["collect"] = spec["collect"]
        docs.append(g)
    consent = verify_consent(auth.doc(DEVICE, 1, docs), trust_keys=load_trust_keys(auth.trust), device=DEVICE,
                             now=time.time())
    return consent.grants


def feed(p: Pipeline, samples: list[tuple[str, float, Any]]) -> None:
    for path, t, v in samples:
        p.offer(path, SCOPE[path], t, v)


def sent(p: Pipeline, gid: str) -> list[dict[str, Any]]:
    return list(p.batches[gid].samples)


def test_grant_without_rules_takes_every_sample_as_before(tmp_path: Path) -> None:
    p = Pipeline(None)
    p.swap(grants(tmp_path, {"id": "g-raw", "scopes": ["read_speedometer"]},
                  {"id": "g-rules", "scopes": ["read_speedometer"],
                   "collect": [{"scope": "read_speedometer", "mode": "on_change", "deadband": 5}]}))
    assert p.batches["g-raw"].rules is None
    traffic = [(SPEED, T0 + i * 0.1, 50.0 + (i % 3)) for i in range(50)]
    feed(p, traffic)
    assert sent(p, "g-raw") == [{"t": round(t, 6), "path": SPEED, "value": v} for _, t, v in traffic]
    assert len(sent(p, "g-rules")) == 1  # never moves more than 5 km/h, no heartbeat due
    assert p.batches["g-rules"].rule_counts == {"read_speedometer": [50, 1]}


def test_rules_apply_before_limits(tmp_path: Path) -> None:
    # The rule lets through every change above 1 km/h; max_hz 0.5 then thins what it let through.
    p = Pipeline(None)
    p.swap(grants(tmp_path, {"id": "g", "scopes": ["read_speedometer"],
                             "limits": {"read_speedometer": {"max_hz": 0.5}},
                             "collect": [{"scope": "read_speedometer", "mode": "on_change", "deadband": 1}]}))
    feed(p, [(SPEED, T0 + i, float(i * 10)) for i in range(10)])
    assert [s["t"] for s in sent(p, "g")] == [T0 + i for i in range(0, 10, 2)]


def test_aggregate_of_location_is_coarsened_to_the_grid(tmp_path: Path) -> None:
    p = Pipeline(None)
    p.swap(grants(tmp_path, {"id": "g", "scopes": ["read_location"],
                             "limits": {"read_location": {"max_hz": 10, "precision_m": 1000}},
                             "collect": [{"path": LAT, "mode": "aggregate", "window_s": 60}]}))
    feed(p, [(LAT, T0 + i, 48.123456 + i * 1e-5) for i in range(30)])
    p.close_windows()
    lat = [s for s in sent(p, "g") if s["path"] == LAT]
    assert len(lat) == 1
    step = 1000 / 111_320.0
    summary = lat[0]["value"]
    assert summary["n"] == 30
    for k in ("min", "max", "mean", "last"):
        assert abs(summary[k] / step - round(summary[k] / step)) < 1e-4  # on the 1 km grid (to 7 decimals)


def test_revocation_drops_the_pre_trigger_history(tmp_path: Path) -> None:
    spec = {"id": "g", "scopes": ["read_location", "read_speedometer"],
            "limits": {"read_location": {"max_hz": 100, "precision_m": 1}},
            "collect": [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 100", "pre_s": 60}]}
    p = Pipeline(None)
    p.swap(grants(tmp_path, spec))
    feed(p, [(LAT, T0 + i, 48.0 + i * 1e-3) for i in range(30)])
    engine = p.batches["g"].rules
    assert engine is not None and engine.held() == 30
    assert all(s["path"] != LAT for s in sent(p, "g"))  # held in memory, not sent

    assert p.swap(()) == ["g"]
    assert engine.held() == 0  # revoked: the history is gone from memory at once

    p.swap(grants(tmp_path, spec))  # granted again: a trigger must release nothing from before
    feed(p, [(SPEED, T0 + 31, 120.0)])
    assert [s["path"] for s in sent(p, "g")] == [SPEED]


def test_new_terms_for_the_same_grant_start_a_new_engine(tmp_path: Path) -> None:
    p = Pipeline(None)
    p.swap(grants(tmp_path, {"id": "g", "scopes": ["read_location", "read_speedometer"],
                             "collect": [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 9",
                                          "pre_s": 60}]}))
    feed(p, [(LAT, T0 + i, 48.0) for i in range(5)])
    old = p.batches["g"].rules
    p.swap(grants(tmp_path, {"id": "g", "scopes": ["read_location", "read_speedometer"],
                             "collect": [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 10",
                                          "pre_s": 60}]}))
    assert old is not None and old.held() == 0 and p.batches["g"].rules is not old


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_sent_sample_satisfies_rules_limits_and_grant(tmp_path: Path, data: st.DataObject) -> None:
    mode = data.draw(st.sampled_from(["on_change", "periodic", "trigger", "aggregate"]))
    max_hz = data.draw(st.sampled_from([None, 0.5, 2.0]))
    # A condition may not read a scope the grant limits (vgw.contract.rules.rules): with a speed limit the trigger
    # watches the outside temperature instead, which the grant then holds, unlimited.
    watched = "Vehicle.Exterior.AirTemperature" if max_hz else "Vehicle.Speed"
    params = {"on_change": {"deadband": 2.0, "heartbeat_s": 10}, "periodic": {"period_s": 5},
              "aggregate": {"window_s": 5}, "trigger": {"when": f"rising({watched} < 5)", "pre_s": 3,
                                                         "post_s": 2}}[mode]
    limits = {"read_speedometer": {"max_hz": max_hz}} if max_hz else None
    p = Pipeline(None)
    scopes = ["read_speedometer", "read_location"] + (["read_thermometer"] if max_hz and mode == "trigger" else [])
    p.swap(grants(tmp_path, {"id": "g", "scopes": scopes, "limits": limits,
                             "collect": [{"scope": "read_speedometer", "mode": mode, **params}]},
                  {"id": "g-temp", "scopes": ["read_thermometer"]}))
    t = T0
    for _ in range(data.draw(st.integers(0, 80))):
        t += data.draw(st.sampled_from([0.0, 0.2, 1.0, 3.0]))
        path = data.draw(st.sampled_from([SPEED, LAT, TEMP]))
        p.offer(path, SCOPE[path], t, data.draw(st.floats(0, 150, allow_nan=False)))
    p.close_windows()
    out = sent(p, "g")
    # Nothing outside the grant: the thermometer went only to g-temp (and to g when it holds it).
    assert {s["path"] for s in out} <= {SPEED, LAT} | ({TEMP} if "read_thermometer" in scopes else set())
    speeds = [s for s in out if s["path"] == SPEED]
    # The limit holds on what the rule let through.
    if max_hz:
        assert all(b["t"] - a["t"] >= 1 / max_hz - 1e-6 for a, b in itertools.pairwise(speeds))
    if mode == "aggregate":
        assert all(isinstance(s["value"], dict) and s["t"] % 5 == 0 for s in speeds)
    if mode == "periodic":
        periods = [math.floor(s["t"] / 5) for s in speeds]
        assert len(periods) == len(set(periods))  # at most one sample per aligned period


def test_released_history_dates_the_batch_from_its_oldest_sample(tmp_path: Path) -> None:
    # Retention (retention_s) counts from the batch's first_t: a pre-trigger sample 60 s old must set it.
    p = Pipeline(None)
    p.swap(grants(tmp_path, {"id": "g", "scopes": ["read_location", "read_speedometer"],
                             "limits": {"read_location": {"max_hz": 100, "precision_m": 1}},
                             "collect": [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 100",
                                          "pre_s": 60}]}))
    feed(p, [(LAT, T0 + i, 48.0) for i in range(30)] + [(SPEED, T0 + 30, 50.0)]
         + [(LAT, T0 + i, 48.0) for i in range(30, 60)] + [(SPEED, T0 + 60, 120.0)])
    batch = p.batches["g"]
    # The speed sample opened the batch; the latitude history released after it is older (samples: time order).
    assert {"t": T0 + 30, "path": SPEED, "value": 50.0} in batch.samples
    assert batch.samples[0] == {"t": T0, "path": LAT, "value": 48.0} and batch.first_t == T0
