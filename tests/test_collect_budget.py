"""Budgets of collection rules (docs/guarantees.md "Budgets"): the work and memory a signed document within
every size limit can cause are bounded per agent, at verification and at run time.

The work is counted, not timed: the engine adds each evaluation's cost (its condition's nodes after constant
folding, plus a fixed cost per evaluation) to ``RuleEngine.work``, in the units the verifier budgets. What
that costs in CPU on a given machine is what `vgw bench` measures (README "Performance").
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
from vgw.base.errors import ClaimsError
from vgw.contract.consent.verifier import verify_consent
from vgw.contract.rules import limits
from vgw.contract.rules.budget import document_usage, rule_held, rule_work
from vgw.contract.rules.expr import parse_condition
from vgw.contract.rules.rules import RuleReason, parse_rules
from vgw.contract.rules.vss import VSS_SCOPES
from vgw.contract.scopes import SCOPES
from vgw.pipeline.router import Pipeline
from vgw.pipeline.rule_engine import RuleEngine
from vgw.state.consent.manager import load_trust_keys
from vgw_sim.paths import default_dbc, default_signal_map

from tests.consentkit import Authority, State

DEVICE = "dev-0001"
ALL = sorted(SCOPES)
RPM = "Vehicle.Powertrain.CombustionEngine.Speed"  # EngineStatus, 10 ms cycle on the demo vehicle: 100 Hz
SPEED = "Vehicle.Speed"
LAT = "Vehicle.CurrentLocation.Latitude"
# Every target a grant holding every scope may have a rule for: one per scope and one per path.
TARGETS: list[dict[str, str]] = [{"scope": s} for s in ALL] + [{"path": p} for p in sorted(VSS_SCOPES)]
T0 = 1_795_920_000.0


def padded(head: str, unit: str, limit: int = limits.MAX_CHARS) -> str:
    """``head`` followed by as many ``unit`` as fit in ``limit`` characters."""
    return head + unit * ((limit - len(head)) // len(unit))


def triggers(targets: list[dict[str, str]], when: str, **params: float) -> list[dict[str, Any]]:
    return [{**t, "mode": "trigger", "when": when, **params} for t in targets]


@pytest.fixture
def auth(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def verify(auth: Authority, grants: list[dict[str, Any]], ver: int = 1) -> Any:
    token = auth.doc(DEVICE, ver, grants)
    return verify_consent(token, trust_keys=load_trust_keys(auth.trust), device=DEVICE, now=time.time())


def grant(auth: Authority, gid: str, rules: list[dict[str, Any]], scopes: list[str] = ALL) -> dict[str, Any]:
    g = auth.grant(gid, scopes)
    g["collect"] = rules
    return g


# -- constant folding: padding costs nothing --------------------------------------------------------------


def test_constant_padding_folds_away() -> None:
    text = padded(f"{RPM}>1", "+1", 255)
    assert len(text) >= 250
    condition = parse_condition(text)
    assert condition.cost == parse_condition(f"{RPM} > 3").cost == 3  # compare, path, number
    # Folding keeps the meaning: the same value on either side of the folded bound.
    from vgw.contract.rules.expr import Evaluator

    bound = 1 + (len(text) - len(f"{RPM}>1")) // 2
    assert Evaluator(condition)({RPM: bound + 0.5}) is True
    assert Evaluator(parse_condition(text))({RPM: float(bound)}) is False
    # What cannot fold is counted: a path in every term.
    assert parse_condition(padded(f"{SPEED}>{SPEED}", f"+{SPEED}", 255)).cost > 30


# -- Seen: the CPU bomb within every size limit was accepted and took a core --------------------------------


def test_the_reported_cpu_bomb_folds_and_its_work_stays_within_the_budget(auth: Authority) -> None:
    # As reported: 2 grants, 104 trigger rules, each `RPM>1+1+...` (255 characters) on a 100 Hz signal.
    when = padded(f"{RPM}>1", "+1", 255)
    grants = [grant(auth, gid, triggers(TARGETS[:52], when)) for gid in ("g-a", "g-b")]
    token = auth.doc(DEVICE, 1, grants)
    assert limits.MAX_CHARS >= len(when) and len(token) > 40_000  # within every size limit
    consent = verify(auth, grants)  # the budget decides: folded, each rule costs 3 nodes
    assert document_usage([g.collect for g in consent.grants]).work <= limits.MAX_WORK
    engines = [RuleEngine(g.collect) for g in consent.grants]
    seconds = 10
    for i in range(seconds * 100):  # 100 Hz, a new value every sample
        for e in engines:
            e.feed(RPM, "read_diagnostics", T0 + i / 100, 800.0 + i % 50)
    work = sum(e.work for e in engines)
    assert work > 0
    assert work <= limits.MAX_WORK * seconds


@pytest.mark.parametrize("padding", ["+1", "-1"], ids=["constants", "unfoldable"])
def test_demo_vehicle_document_is_accepted_or_refused_whole_by_its_work(tmp_path: Path, pki: Any, auth: Authority,
                                                                        padding: str) -> None:
    # As reported on the demo vehicle: one trigger rule per mapped path (25) in each of two grants, every
    # condition on Vehicle.Speed padded to the length limit.
    from vgw.pipeline.catalogue import load_catalogue

    catalogue = load_catalogue([default_dbc()], default_signal_map())
    paths = sorted({s.path for s in catalogue.specs})
    assert len(paths) == 25
    # `Speed>1+1+...` folds to `Speed>N`; `Speed>Speed-1-1-...` cannot fold (it subtracts from a path).
    when = padded(f"{SPEED}>{SPEED}" if padding == "-1" else f"{SPEED}>1", padding)
    rules = triggers([{"path": p} for p in paths], when)
    grants = [grant(auth, gid, rules) for gid in ("g-a", "g-b")]
    s = State(tmp_path, pki, auth)
    try:
        assert s.manager.apply(auth.doc(DEVICE, 1, [auth.grant("g-a", ALL)]), source="mqtt").status == "applied"
        before = s.snapshot()
        result = s.manager.apply(auth.doc(DEVICE, 2, grants), source="mqtt")
        if padding == "+1":
            assert result.status == "applied"
            pipeline = Pipeline(catalogue)
            pipeline.swap(s.manager.active_grants())
            frames = _demo_drive(seconds=20)
            pipeline.process_frames(frames, on_error=lambda exc: pytest.fail(str(exc)))
            span = frames[-1][0] - frames[0][0]
            work = sum(b.rules.work for b in pipeline.batches.values() if b.rules is not None)
            assert 0 < work <= limits.MAX_WORK * span
            return
        # 50 rules of about 230 nodes, each evaluated up to 100 times a second: over the budget.
        assert result.status == "rejected" and result.error is not None
        assert result.error.reason == RuleReason.CPU.value == "collect-cpu"
        assert "work" in str(result.error) and str(limits.MAX_WORK) in str(result.error).replace(",", "")
        assert s.snapshot() == before  # rejected whole: consent, cache, keys unchanged
        receipt = s.receipts("consent-rejected")[-1]
        assert receipt["reason"] == "collect-cpu" and receipt["ver"] == 2
    finally:
        s.close()


def _demo_drive(seconds: float) -> list[tuple[float, int, bool, bytes, int]]:
    """The demo vehicle's simulated drive as frame tuples (vgw.pipeline.frame)."""
    from vgw.tools.bench.trace import frame_source

    out: list[tuple[float, int, bool, bytes, int]] = []
    for t, ident, ext, data in frame_source(default_dbc(), demo=True, seed=3, start=T0):
        if t - T0 > seconds:
            return out
        out.append((t, ident, ext, data, 0))
    return out


def test_the_budget_is_per_agent_not_per_grant(auth: Authority) -> None:
    # Each grant alone within the budget; together over it: the document is refused, naming the total.
    when = padded(f"{SPEED}>{SPEED}", "-1")
    per_rule = rule_work(parse_rules(triggers([{"scope": "read_speedometer"}], when), ALL)[0])
    n = int(limits.MAX_WORK // per_rule)  # rules the whole agent can afford
    assert 1 <= n < 64
    one = [grant(auth, "g-0", triggers(TARGETS[:n], when))]
    verify(auth, one)
    two = [*one, grant(auth, "g-1", triggers(TARGETS[:1], when))]
    with pytest.raises(ClaimsError) as info:
        verify(auth, two)
    assert info.value.reason == "collect-cpu"


def test_an_engine_evaluates_only_when_an_input_changes() -> None:
    rules = parse_rules(triggers([{"scope": "read_location"}], "rising(Vehicle.Speed < 5)"), ALL)
    e = RuleEngine(rules)
    for i in range(1000):
        e.feed(SPEED, "read_speedometer", T0 + i / 100, 50.0)  # the same value for 10 s
    assert e.evaluations == 1
    e.feed(SPEED, "read_speedometer", T0 + 11, 3.0)
    assert e.evaluations == 2


def test_a_faster_signal_is_evaluated_at_the_budgeted_rate_and_no_change_is_lost() -> None:
    rules = parse_rules(triggers([{"path": LAT}], "Vehicle.Speed > 100", pre_s=1), ALL)
    e = RuleEngine(rules)
    seconds, hz = 5, 2000  # 20x the budgeted rate, a new value every sample
    for i in range(seconds * hz):
        e.feed(SPEED, "read_speedometer", T0 + i / hz, 50.0 + i % 7)
    assert e.evaluations <= limits.RATE_HZ * (seconds + limits.BURST_S) + 1
    assert e.work <= rule_work(rules[0]) * (seconds + limits.BURST_S) + limits.EVAL_COST + rules[0].when.cost
    # The condition turns true while the rule is over its rate: it is judged at a later sample, not lost.
    t = T0 + seconds
    e.feed(LAT, "read_location", t, 48.1)
    e.feed(SPEED, "read_speedometer", t + 1e-4, 120.0)
    out: list[Any] = []
    for i in range(1, 200):
        out += e.feed(SPEED, "read_speedometer", t + 1e-4 + i / hz, 120.0 + i)
    assert (LAT, t, 48.1) in out


# -- Seen: pre-trigger history was bounded per rule, not per agent ----------------------------------------


def test_forty_grants_of_never_firing_history_are_refused_at_verification(tmp_path: Path, pki: Any,
                                                                          auth: Authority) -> None:
    # As reported: 40 grants, each a never-firing trigger (pre_s = 60) on 6 scopes.
    six = ["read_location", "read_diagnostics", "read_tires", "read_battery", "read_security", "read_fuel"]
    never = f"{RPM} < -1"  # never true (and reads no location: a limited scope's paths are no trigger's input)
    grants = [grant(auth, f"g-{i}", triggers([{"scope": s} for s in six], never, pre_s=60), six) for i in range(40)]
    s = State(tmp_path, pki, auth)
    try:
        result = s.manager.apply(auth.doc(DEVICE, 1, grants), source="mqtt")
        assert result.status == "rejected" and result.error is not None
        assert result.error.reason == RuleReason.MEMORY.value == "collect-memory"
        assert str(limits.MAX_HELD_SAMPLES) in str(result.error).replace(",", "")
        assert s.manager.in_force is None
        assert s.receipts("consent-rejected")[-1]["reason"] == "collect-memory"
    finally:
        s.close()
    # One such grant alone is within the budget, and accepted.
    assert document_usage([parse_rules(grants[0]["collect"], six)]).held <= limits.MAX_HELD_SAMPLES
    verify(auth, grants[:1])


def test_held_samples_of_a_rule_follow_its_window_and_targets() -> None:
    lat, loc = (parse_rules(triggers([t], "Vehicle.Speed > 1", pre_s=10), ALL)[0]
                for t in ({"path": LAT}, {"scope": "read_location"}))
    assert rule_held(lat) == math.ceil(10 * limits.RATE_HZ) + 1
    assert rule_held(loc) == 3 * rule_held(lat)  # latitude, longitude, altitude
    zero = parse_rules(triggers([{"path": LAT}], "Vehicle.Speed > 1"), ALL)[0]
    assert rule_held(zero) == 1  # pre_s 0 still holds the samples of the very instant


def test_at_run_time_a_rule_never_holds_more_than_its_share() -> None:
    rules = parse_rules(triggers([{"scope": "read_location"}], "Vehicle.Speed < -1", pre_s=60), ALL)
    e = RuleEngine(rules)
    for i in range(60_000):  # 10 kHz for 6 s: 100x the rate the share was sized for
        e.feed(LAT, "read_location", T0 + i * 1e-4, 48.0)
    assert e.held() == rule_held(rules[0])
    assert e.held_dropped == 60_000 - rule_held(rules[0])


def test_an_accepted_document_fits_both_budgets(auth: Authority) -> None:
    example = [{"path": LAT, "mode": "trigger", "when": "Vehicle.Speed > 130 or rising(Vehicle.Speed < 5)",
                "pre_s": 10, "post_s": 5, "min_interval_s": 60}]
    consent = verify(auth, [grant(auth, f"g-{i}", example) for i in range(64)])  # every grant the same rule
    use = document_usage([g.collect for g in consent.grants])
    assert 0 < use.work <= limits.MAX_WORK and 0 < use.held <= limits.MAX_HELD_SAMPLES


def test_cloud_sign_refuses_a_document_over_the_budget(tmp_path: Path) -> None:
    from tests.agentkit import vgw

    keys = tmp_path / "keys"
    assert vgw("cloud", "keygen", "--dir", str(keys), "--recipient", "g-a").returncode == 0
    when = padded(f"{SPEED}>{SPEED}", "-1")
    blocks = "".join(f'\n[[grant.collect]]\n{key} = "{target}"\nmode = "trigger"\nwhen = "{when}"\n'
                     for t in TARGETS[:50] for key, target in t.items())
    scopes = ", ".join(f'"{s}"' for s in ALL)
    grants = tmp_path / "grants.toml"
    grants.write_text(f'[[grant]]\nid = "g-a"\nscopes = [{scopes}]\nrecipient = "keys/recipients/g-a.pub.json"\n'
                      + blocks)
    doc = tmp_path / "doc.jws"
    r = vgw("cloud", "sign", "--key", str(keys / "consent-signer.key"), "--grants", str(grants), "--device", DEVICE,
            "-o", str(doc))
    assert r.returncode == 1
    assert "collect" in r.stderr and "work" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not doc.exists()


def test_a_cached_document_over_the_budget_is_not_in_force_after_an_update(tmp_path: Path, pki: Any,
                                                                           auth: Authority) -> None:
    # A document an agent without budgets accepted, cached on disk: the updated agent re-verifies it at start.
    when = padded(f"{SPEED}>{SPEED}", "-1")
    over = auth.doc(DEVICE, 1, [grant(auth, "g-a", triggers(TARGETS[:50], when))])
    s = State(tmp_path, pki, auth)
    try:
        s.store.write_token(over)
        s.reopen()
        assert s.manager.in_force is None  # fail closed, as for any rule an update adds
        invalid = s.events("consent-cache-invalid")
        assert invalid and invalid[-1]["reason"] == "collect-cpu"
    finally:
        s.close()
