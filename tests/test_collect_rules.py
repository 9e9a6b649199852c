"""Collection rules in signed consent documents (README "Collection rules (per grant)"), judged by the real verifier.

Each attack is a signed document with one bad rule: it must be rejected whole with a specific reason, and
through the manager leave the consent in force exactly as it was.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from vgw.base.errors import ClaimsError
from vgw.contract.consent.verifier import verify_consent
from vgw.contract.rules.limits import MAX_RULES
from vgw.contract.rules.rules import Mode, RuleError, RuleReason, parse_rules
from vgw.state.consent.manager import load_trust_keys

from tests.consentkit import Authority, State

DEVICE = "dev-0001"
SCOPES = ["read_speedometer", "read_fuel", "read_location", "read_odometer"]
EXAMPLE = [  # README "Collection rules (per grant)"'s own example
    {"scope": "read_speedometer", "mode": "on_change", "deadband": 1.0, "heartbeat_s": 60},
    {"scope": "read_fuel", "mode": "periodic", "period_s": 30},
    {"path": "Vehicle.CurrentLocation.Latitude", "mode": "trigger",
     "when": "Vehicle.Speed > 130 or rising(Vehicle.Speed < 5)", "pre_s": 10, "post_s": 5, "min_interval_s": 60},
    {"scope": "read_odometer", "mode": "aggregate", "window_s": 60},
]


@pytest.fixture
def auth(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def verify(auth: Authority, grants: list[dict[str, Any]], ver: int = 1) -> Any:
    token = auth.doc(DEVICE, ver, grants)
    return verify_consent(token, trust_keys=load_trust_keys(auth.trust), device=DEVICE, now=time.time())


def with_collect(auth: Authority, rules: Any, scopes: list[str] = SCOPES, gid: str = "g-ins") -> dict[str, Any]:
    g = auth.grant(gid, scopes)
    g["collect"] = rules
    return g


def test_contract_example_is_accepted_with_defaults(auth: Authority) -> None:
    consent = verify(auth, [with_collect(auth, EXAMPLE)])
    rules = consent.grants[0].collect
    assert [r.mode for r in rules] == [Mode.ON_CHANGE, Mode.PERIODIC, Mode.TRIGGER, Mode.AGGREGATE]
    assert rules[2].when is not None and rules[2].when.paths == {"Vehicle.Speed"}
    assert consent.summary()["grants"][0]["collect"][0] == {"scope": "read_speedometer", "mode": "on_change",
                                                            "deadband": 1.0, "heartbeat_s": 60.0}
    default = parse_rules([{"scope": "read_speedometer", "mode": "on_change"}], SCOPES)[0]
    assert (default.deadband, default.heartbeat_s) == (0.0, 60.0)


def test_without_collect_the_grant_has_no_rules(auth: Authority) -> None:
    consent = verify(auth, [auth.grant("g-ins", SCOPES)])
    assert consent.grants[0].collect == ()
    assert "collect" not in consent.summary()["grants"][0]


# -- Seen: an unknown key in a grant (e.g. "collect" on an older agent) was silently ignored --------------


@pytest.mark.parametrize(("where", "key"), [("grant", "collect_v2"), ("grant", "geofence"), ("limit", "max_hz_x"),
                                            ("recipient", "kid")])
def test_unknown_key_in_grant_limit_or_recipient_rejects_the_document(auth: Authority, where: str, key: str) -> None:
    g = auth.grant("g-ins", SCOPES, limits={"read_fuel": {"max_hz": 1}})
    target = {"grant": g, "limit": g["limits"]["read_fuel"], "recipient": g["recipient"]}[where]
    target[key] = 1
    with pytest.raises(ClaimsError) as info:
        verify(auth, [g])
    assert info.value.reason == "unknown-key"
    assert key in str(info.value)


# -- bad rules ---------------------------------------------------------------------------------------------

ON = {"scope": "read_speedometer", "mode": "on_change"}
BAD: list[tuple[str, Any, RuleReason]] = [
    ("not-a-list", {"scope": "read_fuel"}, RuleReason.SHAPE),
    ("rule-not-object", ["on_change"], RuleReason.SHAPE),
    ("too-many-rules", [ON] * (MAX_RULES + 1), RuleReason.SHAPE),
    ("unknown-mode", [{"scope": "read_fuel", "mode": "stream"}], RuleReason.MODE),
    ("missing-mode", [{"scope": "read_fuel"}], RuleReason.MODE),
    ("unknown-key", [{**ON, "deadband": 1, "smooth": True}], RuleReason.KEY),
    ("key-of-another-mode", [{**ON, "period_s": 10}], RuleReason.KEY),
    ("neither-scope-nor-path", [{"mode": "periodic", "period_s": 1}], RuleReason.TARGET),
    ("both-scope-and-path", [{**ON, "path": "Vehicle.Speed"}], RuleReason.TARGET),
    ("scope-not-in-grant", [{"scope": "read_vin", "mode": "periodic", "period_s": 1}], RuleReason.TARGET),
    ("path-of-scope-not-in-grant", [{"path": "Vehicle.Exterior.AirTemperature", "mode": "periodic", "period_s": 1}],
     RuleReason.TARGET),
    ("unknown-path", [{"path": "Vehicle.Secret.Thing", "mode": "periodic", "period_s": 1}], RuleReason.TARGET),
    ("not-a-path", [{"path": "Speed", "mode": "periodic", "period_s": 1}], RuleReason.TARGET),
    ("two-rules-one-scope", [ON, {"scope": "read_speedometer", "mode": "periodic", "period_s": 1}],
     RuleReason.DUPLICATE),
    ("two-rules-one-path", [{"path": "Vehicle.Speed", "mode": "periodic", "period_s": 1},
                            {"path": "Vehicle.Speed", "mode": "on_change"}], RuleReason.DUPLICATE),
    ("periodic-missing-period", [{"scope": "read_fuel", "mode": "periodic"}], RuleReason.PARAM),
    ("periodic-zero-period", [{"scope": "read_fuel", "mode": "periodic", "period_s": 0}], RuleReason.PARAM),
    ("aggregate-negative-window", [{"scope": "read_fuel", "mode": "aggregate", "window_s": -60}], RuleReason.PARAM),
    ("aggregate-window-over-a-day", [{"scope": "read_fuel", "mode": "aggregate", "window_s": 86401}],
     RuleReason.PARAM),
    ("deadband-negative", [{**ON, "deadband": -1}], RuleReason.PARAM),
    ("deadband-bool", [{**ON, "deadband": True}], RuleReason.PARAM),
    ("deadband-string", [{**ON, "deadband": "1"}], RuleReason.PARAM),
    ("heartbeat-zero", [{**ON, "heartbeat_s": 0}], RuleReason.PARAM),
    ("trigger-without-when", [{"scope": "read_location", "mode": "trigger", "pre_s": 1}], RuleReason.PARAM),
    # Memory bound: the pre-trigger history is held in RAM, at most 60 s of it.
    ("huge-pre_s", [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 1", "pre_s": 1e12}],
     RuleReason.PARAM),
    ("pre_s-just-over-60", [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 1",
                             "pre_s": 60.001}], RuleReason.PARAM),
    ("negative-post_s", [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 1", "post_s": -1}],
     RuleReason.PARAM),
    # A condition that reads a path of another grant's scope (here read_thermometer, not held by this grant).
    ("condition-reads-other-grants-path",
     [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Exterior.AirTemperature < 0"}],
     RuleReason.CONDITION),
    ("condition-reads-unknown-path",
     [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 1 or Vehicle.Cabin.Seat.Occupant > 0"}],
     RuleReason.CONDITION),
    ("condition-oversized", [{"scope": "read_location", "mode": "trigger",
                              "when": "Vehicle.Speed > 1" + " or Vehicle.Speed > 1" * 20}], RuleReason.CONDITION),
    ("condition-deep-nesting", [{"scope": "read_location", "mode": "trigger",
                                 "when": "(" * 17 + "Vehicle.Speed > 1" + ")" * 17}], RuleReason.CONDITION),
    ("condition-not-parsing", [{"scope": "read_location", "mode": "trigger", "when": "__import__('os')"}],
     RuleReason.CONDITION),
    ("condition-not-a-string", [{"scope": "read_location", "mode": "trigger", "when": ["Vehicle.Speed > 1"]}],
     RuleReason.CONDITION),
]


@pytest.mark.parametrize(("rules", "reason"), [pytest.param(r, why, id=i) for i, r, why in BAD])
def test_bad_rule_rejects_the_signed_document(auth: Authority, rules: Any, reason: RuleReason) -> None:
    with pytest.raises(ClaimsError) as info:
        verify(auth, [auth.grant("g-other", ["read_thermometer"]), with_collect(auth, rules)])
    assert info.value.reason == reason.value
    with pytest.raises(RuleError) as direct:
        parse_rules(rules, SCOPES)
    assert direct.value.reason is reason


def test_rejection_through_manager_keeps_consent_in_force(tmp_path: Path, pki: Any, auth: Authority) -> None:
    s = State(tmp_path, pki, auth)
    try:
        good = auth.doc(DEVICE, 1, [with_collect(auth, EXAMPLE), auth.grant("g-temp", ["read_thermometer"])])
        assert s.manager.apply(good, source="mqtt").status == "applied"
        before = s.snapshot()
        spy = [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Exterior.AirTemperature < 0"}]
        bad = auth.doc(DEVICE, 2, [with_collect(auth, spy), auth.grant("g-temp", ["read_thermometer"])])
        result = s.manager.apply(bad, source="mqtt")
        assert result.status == "rejected" and result.error is not None
        assert result.error.reason == "collect-condition"
        assert s.snapshot() == before
        assert s.receipts()[-1]["typ"] == "consent-rejected" and s.receipts()[-1]["reason"] == "collect-condition"
        assert s.manager.in_force is not None and s.manager.in_force.ver == 1
    finally:
        s.close()


def test_path_rule_may_override_its_scope_rule(auth: Authority) -> None:
    rules = [{"scope": "read_location", "mode": "aggregate", "window_s": 60},
             {"path": "Vehicle.CurrentLocation.Latitude", "mode": "periodic", "period_s": 10}]
    consent = verify(auth, [with_collect(auth, rules)])
    assert len(consent.grants[0].collect) == 2
