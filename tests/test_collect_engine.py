"""The per-grant rule engine (README "Collection rules (per grant)") over random traffic and random rules (hypothesis).

Each property is checked against the raw samples, computed independently of the engine: what the receiver
can reconstruct, what each window summarises, which samples lie in a trigger's window.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vgw.contract.rules.rules import parse_rules
from vgw.pipeline.rule_engine import RuleEngine, is_number

SPEED, FUEL, LAT, ODO = ("Vehicle.Speed", "Vehicle.Powertrain.FuelSystem.RelativeLevel",
                         "Vehicle.CurrentLocation.Latitude", "Vehicle.TraveledDistance")
SCOPE = {SPEED: "read_speedometer", FUEL: "read_fuel", LAT: "read_location", ODO: "read_odometer"}
GRANT_SCOPES = sorted(SCOPE.values())
T0 = 1_795_920_000.0

Sample = tuple[str, float, Any]


@st.composite
def traffic(draw: st.DrawFn, paths: tuple[str, ...] = tuple(SCOPE), text: bool = True) -> list[Sample]:
    """Samples in frame-time order: random gaps (ties included), numeric values with now and then a text."""
    n = draw(st.integers(min_value=0, max_value=60))
    t = T0 + draw(st.floats(min_value=0, max_value=100, allow_nan=False))
    out: list[Sample] = []
    value = st.floats(min_value=-200, max_value=200, allow_nan=False)
    values = st.one_of(value, st.integers(-5, 5), st.just("P")) if text else value
    for _ in range(n):
        t += draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0, 2.5, 7.0, 30.0]))
        out.append((draw(st.sampled_from(paths)), round(t, 6), draw(values)))
    return out


def run(engine: RuleEngine, samples: list[Sample]) -> list[Sample]:
    sent: list[Sample] = []
    for path, t, value in samples:
        sent += engine.feed(path, SCOPE[path], t, value)
    return sent + engine.flush()


def of(path: str, samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s[0] == path]


@settings(max_examples=60, deadline=None)
@given(samples=traffic(), deadband=st.sampled_from([0.0, 0.5, 2.0, 25.0]),
       heartbeat=st.sampled_from([0.5, 5.0, 60.0]))
def test_on_change_reconstruction_stays_within_deadband_between_heartbeats(
        samples: list[Sample], deadband: float, heartbeat: float) -> None:
    rules = parse_rules([{"scope": "read_speedometer", "mode": "on_change", "deadband": deadband,
                          "heartbeat_s": heartbeat}], GRANT_SCOPES)
    sent = run(RuleEngine(rules), samples)
    raw = of(SPEED, samples)
    out = of(SPEED, sent)
    # Every sent sample is a received one, unchanged, in order.
    it = iter(raw)
    assert all(any(s == r for r in it) for s in out)
    # Replay as the receiver does: hold the last value sent.
    sent_iter = iter(out)
    held: Sample | None = None
    pending = next(sent_iter, None)
    for sample in raw:
        if pending is not None and pending == sample:
            held, pending = sample, next(sent_iter, None)
            continue
        assert held is not None, "the first sample of a path is always sent"
        assert sample[1] - held[1] < heartbeat, "a heartbeat is due: the sample must have been sent"
        if is_number(sample[2]) and is_number(held[2]):
            assert abs(sample[2] - held[2]) <= deadband  # the receiver's picture is within the deadband
        else:
            assert sample[2] == held[2]  # text: "unchanged" means equal
    # Other paths pass unchanged (no rule for them).
    assert [s for s in sent if s[0] != SPEED] == [s for s in samples if s[0] != SPEED]


@settings(max_examples=60, deadline=None)
@given(samples=traffic(), period=st.sampled_from([0.7, 1.0, 10.0, 30.0]))
def test_periodic_sends_the_last_sample_of_each_aligned_period(samples: list[Sample], period: float) -> None:
    rules = parse_rules([{"scope": "read_fuel", "mode": "periodic", "period_s": period}], GRANT_SCOPES)
    sent = run(RuleEngine(rules), samples)
    last_of_period: dict[int, Sample] = {}
    for s in of(FUEL, samples):
        last_of_period[math.floor(s[1] / period)] = s  # aligned to multiples of period_s in Unix time
    assert of(FUEL, sent) == [last_of_period[k] for k in sorted(last_of_period)]


@settings(max_examples=60, deadline=None)
@given(samples=traffic(), window=st.sampled_from([1.0, 5.0, 60.0]))
def test_aggregate_equals_summaries_computed_from_raw(samples: list[Sample], window: float) -> None:
    rules = parse_rules([{"scope": "read_odometer", "mode": "aggregate", "window_s": window}], GRANT_SCOPES)
    sent = run(RuleEngine(rules), samples)
    windows: dict[int, list[float]] = {}
    for _, t, v in of(ODO, samples):
        if is_number(v):
            windows.setdefault(math.floor(t / window), []).append(v)
    expected = [(ODO, (k + 1) * window, {"n": len(vs), "min": min(vs), "max": max(vs), "mean": sum(vs) / len(vs),
                                         "last": vs[-1]}) for k, vs in sorted(windows.items())]
    got = of(ODO, sent)
    assert [(p, t) for p, t, _ in got] == [(p, t) for p, t, _ in expected]
    for (_, _, g), (_, _, e) in zip(got, expected, strict=True):
        assert g["n"] == e["n"] and g["min"] == e["min"] and g["max"] == e["max"] and g["last"] == e["last"]
        assert g["mean"] == pytest.approx(e["mean"], rel=1e-9, abs=1e-9)
    assert all(not isinstance(v, str) for p, _, v in got)  # no raw sample of the path leaves


def _reference_fires(samples: list[Sample], threshold: float, post: float, pause: float) -> list[float]:
    """When `Vehicle.Speed > threshold` becomes true, outside an open window and its quiet time."""
    fires: list[float] = []
    was_true, end, quiet = False, -math.inf, -math.inf
    for path, t, v in samples:
        if path != SPEED:
            continue
        now_true = is_number(v) and v > threshold
        if now_true and not was_true and not (fires and fires[-1] - 0 <= t <= end) and t >= quiet:
            fires.append(t)
            end, quiet = t + post, t + post + pause
        was_true = now_true if is_number(v) else False
    return fires


@settings(max_examples=80, deadline=None)
@given(samples=traffic(paths=(SPEED, LAT, FUEL)), threshold=st.sampled_from([0.0, 50.0, 150.0]),
       pre=st.sampled_from([0.0, 1.0, 10.0, 60.0]), post=st.sampled_from([0.0, 2.0, 5.0]),
       pause=st.sampled_from([0.0, 30.0]))
def test_trigger_window_holds_exactly_the_samples_inside_it(
        samples: list[Sample], threshold: float, pre: float, post: float, pause: float) -> None:
    rules = parse_rules([{"scope": "read_location", "mode": "trigger", "when": f"Vehicle.Speed > {threshold:g}",
                          "pre_s": pre, "post_s": post, "min_interval_s": pause}], GRANT_SCOPES)
    sent = run(RuleEngine(rules), samples)
    fires = _reference_fires(samples, threshold, post, pause)
    inside = [s for s in of(LAT, samples) if any(f - pre <= s[1] <= f + post for f in fires)]
    got = of(LAT, sent)
    assert sorted(got, key=lambda s: s[1]) == inside  # same samples, each once
    assert [s for s in sent if s[0] != LAT] == [s for s in samples if s[0] != LAT]


def test_trigger_sends_pre_history_at_the_moment_and_post_window_live() -> None:
    rules = parse_rules([{"path": LAT, "mode": "trigger", "when": "rising(Vehicle.Speed < 5)", "pre_s": 10,
                          "post_s": 5}], GRANT_SCOPES)
    e = RuleEngine(rules)
    assert e.feed(SPEED, SCOPE[SPEED], T0, 50.0) == [(SPEED, T0, 50.0)]
    for i in range(1, 21):
        assert e.feed(LAT, SCOPE[LAT], T0 + i, 48.0 + i) == []  # held in memory only
    assert e.held() == 11  # 10 s of history at 1 Hz (t-10 .. t inclusive)
    out = e.feed(SPEED, SCOPE[SPEED], T0 + 20, 3.0)  # braked to a near stop: the moment
    assert out == [(LAT, T0 + t, 48.0 + t) for t in range(10, 21)] + [(SPEED, T0 + 20, 3.0)]
    assert e.held() == 0
    assert e.feed(LAT, SCOPE[LAT], T0 + 25, 1.0) == [(LAT, T0 + 25, 1.0)]  # inside post_s
    assert e.feed(LAT, SCOPE[LAT], T0 + 25.5, 2.0) == []  # after it


@settings(max_examples=50, deadline=None)
@given(samples=traffic(paths=(SPEED, LAT, FUEL, ODO, "Vehicle.Exterior.AirTemperature")),
       modes=st.lists(st.sampled_from(["on_change", "periodic", "trigger", "aggregate", None]), min_size=4,
                      max_size=4))
def test_no_rule_sends_a_path_it_was_not_fed_or_invents_a_value(samples: list[Sample],
                                                                 modes: list[str | None]) -> None:
    params = {"on_change": {"deadband": 1.0}, "periodic": {"period_s": 5}, "aggregate": {"window_s": 5},
              "trigger": {"when": "Vehicle.Speed > 20", "pre_s": 5, "post_s": 5}}
    rules = parse_rules([{"scope": s, "mode": m, **params[m]} for s, m in zip(GRANT_SCOPES, modes, strict=True)
                         if m is not None], GRANT_SCOPES)
    scope_of = {**SCOPE, "Vehicle.Exterior.AirTemperature": "read_thermometer"}
    engine = RuleEngine(rules)
    # The router feeds a grant only its own scopes: read_thermometer never reaches this engine.
    fed = [s for s in samples if scope_of[s[0]] in GRANT_SCOPES]
    sent: list[Sample] = []
    for path, t, value in fed:
        sent += engine.feed(path, scope_of[path], t, value)
    sent += engine.flush()
    assert {p for p, _, _ in sent} <= {p for p, _, _ in fed}
    raw = set(map(repr, fed))
    for s in sent:
        assert isinstance(s[2], dict) or repr(s) in raw  # raw samples unchanged; summaries only by aggregate


def test_clear_forgets_history_windows_and_memory() -> None:
    rules = parse_rules([{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 100", "pre_s": 60},
                         {"scope": "read_odometer", "mode": "aggregate", "window_s": 60}], GRANT_SCOPES)
    e = RuleEngine(rules)
    for i in range(30):
        e.feed(LAT, SCOPE[LAT], T0 + i, 48.0)
        e.feed(ODO, SCOPE[ODO], T0 + i, 1000.0 + i)
    assert e.held() > 30
    e.clear()
    assert e.held() == 0
    assert e.flush() == []
    # A trigger after clear() releases nothing collected before it.
    assert e.feed(SPEED, SCOPE[SPEED], T0 + 31, 120.0) == [(SPEED, T0 + 31, 120.0)]


def test_windows_close_when_any_sample_of_the_grant_passes_their_end() -> None:
    rules = parse_rules([{"scope": "read_fuel", "mode": "periodic", "period_s": 30}], GRANT_SCOPES)
    e = RuleEngine(rules)
    assert e.feed(FUEL, SCOPE[FUEL], 60.0, 50.0) == []
    assert e.feed(FUEL, SCOPE[FUEL], 75.0, 49.0) == []
    # Fuel goes quiet; a speed sample at t=90 (the period's end) closes the fuel period [60, 90).
    assert e.feed(SPEED, SCOPE[SPEED], 90.0, 10.0) == [(FUEL, 75.0, 49.0), (SPEED, 90.0, 10.0)]


def test_history_is_bounded_in_samples_too() -> None:
    from vgw.contract.rules.budget import rule_held

    rules = parse_rules([{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 1", "pre_s": 60}],
                        GRANT_SCOPES)
    e = RuleEngine(rules)
    for i in range(rule_held(rules[0]) + 500):
        e.feed(LAT, SCOPE[LAT], T0 + i * 1e-4, 1.0)  # a flood within 60 s
    assert e.held() == rule_held(rules[0])  # its share of the agent's budget (docs/guarantees.md "Budgets")


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@given(samples=traffic(paths=(SPEED, LAT, FUEL)), threshold=st.sampled_from([0.0, 50.0, 150.0]),
       pre=st.sampled_from([0.0, 1.0, 10.0, 60.0]), post=st.sampled_from([0.0, 2.0, 5.0]),
       pause=st.sampled_from([0.0, 30.0]))
def test_trigger_window_long_run(samples: list[Sample], threshold: float, pre: float, post: float,
                                 pause: float) -> None:
    test_trigger_window_holds_exactly_the_samples_inside_it.hypothesis.inner_test(  # type: ignore[attr-defined]
        samples, threshold, pre, post, pause)
