"""Collection rules end to end: virtual CAN -> agent -> mosquitto over mutual TLS -> cloud peer.

A document with rules, applied over MQTT, changes what arrives from the next batch on; a grant without rules
on the same signal keeps receiving every sample, and serves as the truth the rule's output is checked against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from vgw_sim.cloud import CloudPeer, consent_claims, grant, sign_consent

from tests.agentkit import AgentThread, Authority, vgw, write_config

DEV = "dev-0001"
SPEED = "Vehicle.Speed"
BATCH_S = 0.2  # the batch interval of write_config


@pytest.fixture
def auth(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def doc(auth: Authority, grants: dict[str, tuple[list[str], list[dict[str, Any]] | None]]) -> str:
    gs = []
    for gid, (scopes, rules) in grants.items():
        g = grant(gid, scopes, auth.recipient(gid))
        if rules is not None:
            g["collect"] = rules
        gs.append(g)
    auth.ver += 1
    return sign_consent(consent_claims(DEV, auth.ver, gs), auth.key)


def test_rules_applied_over_mqtt_change_what_arrives(tmp_path: Path, pki: Any, broker: Any, cloud: CloudPeer,
                                                     auth: Authority, channel: str, vehicle: Any) -> None:
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    for gid in ("g-raw", "g-ins"):
        cloud.add_recipient(gid, auth.recipient(gid))
    with AgentThread(cfg) as agent:
        assert agent.wait_link()
        # v1: no rules: the insurer receives the speed trace (VehicleDynamics every 10 ms).
        cloud.publish_consent(DEV, doc(auth, {"g-raw": (["read_speedometer"], None),
                                              "g-ins": (["read_speedometer"], None)}))
        assert cloud.wait_for(lambda: sum(s.path == SPEED for s in cloud.samples(DEV, "g-ins")) >= 100, 15)

        # v2: the insurer gets one summary per second instead of the trace.
        rules = [{"scope": "read_speedometer", "mode": "aggregate", "window_s": 1}]
        cloud.publish_consent(DEV, doc(auth, {"g-raw": (["read_speedometer"], None),
                                              "g-ins": (["read_speedometer"], rules)}))
        assert cloud.wait_for(lambda: len(cloud.receipts(DEV, "consent-applied")) == 2, 10)
        applied = cloud.receipts(DEV, "consent-applied")[-1].arrived  # the agent applied v2 before this
        # Three whole windows after v2, on the frame clock both grants share.
        first = math.ceil(applied) + 1.0
        assert cloud.wait_for(lambda: sum(isinstance(s.value, dict) and s.t >= first + 3
                                          for s in cloud.samples(DEV, "g-ins")) >= 1, 15)

    late = [s for s in cloud.samples(DEV, "g-ins") if s.t > applied]
    # From the batch after v2 on, not one raw speed sample: only summaries, each at a window's end.
    assert late and all(isinstance(s.value, dict) for s in late)
    assert all(abs(s.t - round(s.t)) < 1e-6 for s in late)
    # The first batch sealed after v2 was applied already followed the rule (within one batch interval).
    batches_after = [b for b in cloud.batches(DEV, "g-ins") if b.arrived > applied + BATCH_S]
    assert batches_after and all(isinstance(s.get("value"), dict) for b in batches_after for s in b.samples)
    # Each whole window's summary equals the one computed from the raw trace g-raw received.
    raw = [s for s in cloud.samples(DEV, "g-raw") if s.path == SPEED]
    checked = 0
    for s in late:
        if s.t < first + 1 or s.t > first + 3:
            continue
        window = [r.value for r in raw if s.t - 1 <= r.t < s.t]
        assert s.value["n"] == len(window)
        assert s.value["min"] == min(window) and s.value["max"] == max(window)
        assert s.value["mean"] == pytest.approx(sum(window) / len(window))
        checked += 1
    assert checked >= 2
    assert cloud.undecryptable == 0 and cloud.missing(DEV, "g-ins") == []

    # What the owner is shown: the rule in plain words, and the share the rules kept back in the car.
    shown = vgw("consent", "show", "--config", str(cfg))
    assert shown.returncode == 0, shown.stderr
    assert "Speed: the lowest, highest and average (and the count and last value) per second, not the trace" \
        in shown.stdout
    report = vgw("report", "--config", str(cfg), "--json")
    assert report.returncode == 0, report.stderr
    grants = {g["id"]: g for g in json.loads(report.stdout)["grants"]}
    ins = grants["g-ins"]["scopes"][0]
    assert ins["scope"] == "read_speedometer"
    assert ins["samples_decoded"] > 100 and 0 < ins["samples_after_rules"] < ins["samples_decoded"] / 20
    assert ins["kept_back_by_rules"] > 0.9
    assert grants["g-raw"]["scopes"][0]["samples_decoded"] is None  # no rules: nothing is held back by them
    assert any("per second, not the trace" in line for line in grants["g-ins"]["receives"])
    text = vgw("report", "--config", str(cfg)).stdout
    assert "kept back in the car" in text


LAT = "Vehicle.CurrentLocation.Latitude"


def test_revocation_wipes_the_pre_trigger_history_end_to_end(tmp_path: Path, pki: Any, broker: Any,
                                                              cloud: CloudPeer, auth: Authority, channel: str,
                                                              db: Any) -> None:
    """Location held in memory for a trigger's pre-history, then the grant is revoked and granted again under
    the same id: when the trigger fires, only history from after the new grant is sent, never a sample held
    before the revocation (README "Collection rules"; docs/privacy.md)."""
    import can

    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    for gid in ("g-raw", "g-trip"):
        cloud.add_recipient(gid, auth.recipient(gid))
    gnss, dyn = db.get_message_by_name("GnssPosition"), db.get_message_by_name("VehicleDynamics")
    rules = [{"scope": "read_location", "mode": "trigger", "when": "Vehicle.Speed > 100", "pre_s": 60}]

    def signed(grants: dict[str, tuple[list[str], list[dict[str, Any]] | None]]) -> str:
        gs = []
        for gid, (scopes, rule) in grants.items():
            g = grant(gid, scopes, auth.recipient(gid),
                      limits={"read_location": {"max_hz": 100, "precision_m": 1}} if "read_location" in scopes
                      else None)
            if rule is not None:
                g["collect"] = rule
            gs.append(g)
        auth.ver += 1
        return sign_consent(consent_claims(DEV, auth.ver, gs), auth.key)

    trip = (["read_location", "read_speedometer"], rules)
    with can.Bus(interface="virtual", channel=channel) as bus, AgentThread(cfg) as agent:
        marker = iter(range(1, 1_000_000))

        def drive(latitude: float, speed: float) -> float:
            """Send one position and one speed; return when g-raw received that speed (the agent read both)."""
            kmh = speed + next(marker) * 1e-2 % 1  # a speed value this test sent once
            bus.send(can.Message(arbitration_id=gnss.frame_id, is_extended_id=gnss.is_extended_frame,
                                 data=gnss.encode({"Latitude": latitude, "Longitude": 11.0})))
            bus.send(can.Message(arbitration_id=dyn.frame_id, is_extended_id=False,
                                 data=dyn.encode({"VehicleSpeed": round(kmh, 2)})))
            assert cloud.wait_for(lambda: any(s.path == SPEED and abs(s.value - round(kmh, 2)) < 1e-6
                                              for s in cloud.samples(DEV, "g-raw")), 15)
            return kmh

        assert agent.wait_link()
        cloud.publish_consent(DEV, signed({"g-raw": (["read_speedometer"], None), "g-trip": trip}))
        assert cloud.wait_for(lambda: len(cloud.receipts(DEV, "consent-applied")) == 1, 10)
        for i in range(5):  # held for the trigger, in memory only
            drive(10.0 + i * 1e-3, 30.0)

        cloud.publish_consent(DEV, signed({"g-raw": (["read_speedometer"], None)}))  # g-trip revoked
        assert cloud.wait_for(lambda: [r.claims["grant"] for r in cloud.receipts(DEV, "erasure")] == ["g-trip"], 10)
        cloud.publish_consent(DEV, signed({"g-raw": (["read_speedometer"], None), "g-trip": trip}))  # again
        assert cloud.wait_for(lambda: len(cloud.receipts(DEV, "consent-applied")) == 3, 10)
        for i in range(3):
            drive(20.0 + i * 1e-3, 30.0)
        drive(20.5, 120.0)  # the trigger fires: the pre-history is released
        assert cloud.wait_for(lambda: sum(s.path == LAT for s in cloud.samples(DEV, "g-trip")) >= 4, 15)

    lats = sorted(round(s.value, 4) for s in cloud.samples(DEV, "g-trip") if s.path == LAT)
    # The history since the new grant (the proof that the trigger released something), and nothing older.
    assert lats == [20.0, 20.001, 20.002, 20.5]
    assert cloud.undecryptable == 0
