"""A collection rule's condition never reads a value finer than the grant's limits let the app see.

A grant with ``read_location`` limited to a 1 km grid and a rule "send speed when latitude > 52.505947" read
the raw latitude: the first speed sample left the car 9 ms after the trace crossed that line, telling the app
where the car was to about 0.1 m. A condition on a scope the grant limits (its own limits or the privacy
defaults of README "Telemetry envelope") is refused at verification, and `consent show` describes each rule as
it acts (the threshold as written, no scope called "every reading" when a path rule decides it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from vgw.base.errors import ConsentError
from vgw.contract.consent.verifier import verify_consent
from vgw.contract.rules.rules import RuleReason
from vgw.state.consent.manager import load_trust_keys

from tests.consentkit import Authority

DEVICE = "dev-0001"
LAT = "Vehicle.CurrentLocation.Latitude"


def _verify(auth: Authority, grant: dict[str, Any]) -> Any:
    return verify_consent(auth.doc(DEVICE, 1, [grant]), trust_keys=load_trust_keys(auth.trust), device=DEVICE,
                          now=time.time())


@pytest.mark.parametrize("limits", [{"read_location": {"precision_m": 1000}}, {"read_location": {"max_hz": 0.5}},
                                    {}])  # {}: the privacy defaults (100 m, one reading per 5 s) limit it too
def test_condition_on_a_limited_scope_is_refused(tmp_path: Path, limits: dict[str, Any]) -> None:
    auth = Authority(tmp_path)
    g = auth.grant("g-ins", ["read_location", "read_speedometer"], limits=limits)
    g["collect"] = [{"path": "Vehicle.Speed", "mode": "trigger", "when": f"{LAT} > 52.505947", "post_s": 5}]
    with pytest.raises(ConsentError) as err:
        _verify(auth, g)
    assert err.value.reason == RuleReason.CONDITION
    assert "read_location" in str(err.value) and "limit" in str(err.value)


def test_condition_on_an_unlimited_scope_is_accepted(tmp_path: Path) -> None:
    auth = Authority(tmp_path)
    g = auth.grant("g-ins", ["read_location", "read_speedometer"], limits={"read_speedometer": {}})
    g["collect"] = [{"path": LAT, "mode": "trigger", "when": "Vehicle.Speed > 130.25", "post_s": 5}]
    consent = _verify(auth, g)
    assert consent.grants[0].collect[0].when is not None


def test_show_describes_the_rule_as_it_acts(tmp_path: Path) -> None:
    """The owner read "above 52.5059" for 52.505947, and "Speed: every reading" beside the rule that decides
    every speed reading."""
    auth = Authority(tmp_path)
    g = auth.grant("g-ins", ["read_speedometer", "read_fuel"])
    g["collect"] = [{"path": "Vehicle.Speed", "mode": "trigger",
                     "when": "Vehicle.Powertrain.FuelSystem.RelativeLevel < 12.505947", "post_s": 5}]
    receives = _verify(auth, g).summary()["grants"][0]["receives"]
    text = "\n".join(receives)
    assert "12.505947" in text, text
    assert not any(line == "Speed: every reading" for line in receives), receives


def test_cloud_sign_refuses_it_too(tmp_path: Path) -> None:
    """`vgw cloud sign` checks the rules exactly as the car will: the document is never signed."""
    from vgw.base.errors import CloudKitError
    from vgw.cloud.cloudkit import load_grants
    grants = tmp_path / "grants.toml"
    grants.write_text(f"""
[[grant]]
id = "g-ins"
scopes = ["read_location", "read_speedometer"]
recipient = {{ kem = "X25519", pk = "{'A' * 43}" }}
limits = {{ read_location = {{ precision_m = 1000 }} }}
[[grant.collect]]
path = "Vehicle.Speed"
mode = "trigger"
when = "{LAT} > 52.505947"
""")
    with pytest.raises(CloudKitError, match="limits"):
        load_grants(grants)
