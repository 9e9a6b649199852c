"""`vgw cloud sign` with collection rules in its grants file, `vgw consent apply`/`show` of the result."""

from __future__ import annotations

import json
from pathlib import Path

from vgw_sim.pki import TestPKI

from tests.agentkit import vgw, write_config

DEV = "dev-0001"

RULES_TOML = """
ttl_s = 3600
[[grant]]
id = "g-insurer"
controller = "com.example.insurer"
purpose = "usage-based-insurance"
scopes = ["read_speedometer", "read_location", "read_fuel"]
recipient = "keys/recipients/insurer.pub.json"
limits = { read_location = { max_hz = 1, precision_m = 10 } }

[[grant.collect]]
scope = "read_speedometer"
mode = "aggregate"
window_s = 60

[[grant.collect]]
scope = "read_location"
mode = "trigger"
when = "rising(Vehicle.Speed < 5)"
pre_s = 10
post_s = 5

[[grant.collect]]
scope = "read_fuel"
mode = "on_change"
deadband = 2
"""


def signed(tmp_path: Path, grants_text: str) -> tuple[Path, Path, object]:
    keys = tmp_path / "keys"
    assert vgw("cloud", "keygen", "--dir", str(keys), "--recipient", "insurer").returncode == 0
    grants = tmp_path / "grants.toml"
    grants.write_text(grants_text)
    doc = tmp_path / "doc.jws"
    r = vgw("cloud", "sign", "--key", str(keys / "consent-signer.key"), "--grants", str(grants), "--device", DEV,
            "--ver", "3", "-o", str(doc))
    return keys, doc, r


def test_sign_apply_and_show_rules_in_plain_words(tmp_path: Path, pki: TestPKI) -> None:
    keys, doc, r = signed(tmp_path, RULES_TOML)
    assert r.returncode == 0, r.stderr  # type: ignore[attr-defined]
    cfg = write_config(tmp_path, pki, 1, keys / "consent-signer.pub.pem", can={"channel": "unused"})
    applied = vgw("consent", "apply", "--config", str(cfg), str(doc))
    assert applied.returncode == 0, applied.stderr
    show = vgw("consent", "show", "--config", str(cfg))
    assert show.returncode == 0, show.stderr
    assert "Speed: the lowest, highest and average (and the count and last value) per minute, not the trace" \
        in show.stdout
    assert ("Location (position of the car): only from 10 seconds before to 5 seconds after the moment speed "
            "falls below 5") in show.stdout
    assert "Fuel level: only when it changes by more than 2" in show.stdout
    js = json.loads(vgw("consent", "show", "--config", str(cfg), "--json").stdout)
    rules = js["grants"][0]["collect"]
    assert [r["mode"] for r in rules] == ["aggregate", "trigger", "on_change"]
    assert rules[2]["heartbeat_s"] == 60.0  # the contract's default, shown


def test_sign_refuses_a_rule_the_device_would_reject(tmp_path: Path) -> None:
    spy = RULES_TOML.replace('when = "rising(Vehicle.Speed < 5)"', 'when = "Vehicle.Exterior.AirTemperature < 0"')
    _, doc, r = signed(tmp_path, spy)
    assert r.returncode == 1  # type: ignore[attr-defined]
    err = r.stderr  # type: ignore[attr-defined]
    assert "grant[0]" in err and "read_thermometer" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not doc.exists()
