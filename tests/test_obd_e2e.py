"""OBD-only end to end: ELM327 simulator (pty / TCP) -> `vgw run` -> mosquitto over mutual TLS -> cloud peer.

Consent is enforced at the source for OBD exactly as the router enforces it for CAN: a speedometer grant
makes the agent ask the car for PID 0D and nothing else, and revocation stops the polling, erases the
grant's data and publishes an erasure receipt.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vgw_sim.cloud import CloudPeer
from vgw_sim.elm327_sim import Elm327Simulator
from vgw_sim.obd_ecu import frozen_model

from tests.agentkit import AgentThread, Authority, agent_process, write_config

DEV = "dev-0001"


@pytest.fixture
def auth(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


@pytest.fixture
def elm() -> Iterator[Elm327Simulator]:
    sim = Elm327Simulator(model=frozen_model(), realtime=True)
    try:
        yield sim
    finally:
        sim.close()


def data_requests(sim: Elm327Simulator) -> list[str]:
    """Requests other than the supported-PID bitmap reads (0100, 0120 ...)."""
    return [r for r in sim.requests if not (r.startswith("01") and len(r) == 4 and int(r[2:], 16) % 0x20 == 0)]


def test_obd_only_speed_consent_then_revocation(tmp_path: Path, pki, broker, cloud: CloudPeer, auth: Authority,
                                                elm: Elm327Simulator) -> None:
    port = elm.open_pty()
    cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                       obd={"port": port, "interval_s": 0.2, "timeout_s": 1.0})
    cloud.add_recipient("g-speed", auth.recipient("g-speed"))
    with agent_process(cfg) as proc:
        assert cloud.wait_for(lambda: (cloud.status(DEV) or {}).get("device") == DEV, 15), "agent never came up"
        time.sleep(0.5)
        assert elm.commands == []  # no grant: the adapter is not even opened

        cloud.publish_consent(DEV, auth.doc(DEV, {"g-speed": ["read_speedometer"]}))
        assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-speed")) >= 3, 20), proc.stderr and proc.poll()
        samples = cloud.samples(DEV, "g-speed")
        assert {s.path for s in samples} == {"Vehicle.Speed"}
        assert all(isinstance(s.value, int) and 0 <= s.value <= 255 for s in samples)
        assert all(abs(s.t - time.time()) < 30 for s in samples)
        assert set(data_requests(elm)) == {"010D"}  # minimisation at the source

        cloud.publish_consent(DEV, auth.doc(DEV, {}))
        assert cloud.wait_for(lambda: any(r.claims.get("grant") == "g-speed"
                                          for r in cloud.receipts(DEV, "erasure")), 15)
        receipt = next(r for r in cloud.receipts(DEV, "erasure") if r.claims["grant"] == "g-speed")
        assert receipt.claims["key_destroyed"] is True and receipt.claims["ver"] == 2
        time.sleep(0.6)
        polled = len(elm.requests)
        time.sleep(1.5)
        assert len(elm.requests) == polled, "revoked: the car must not be asked anything any more"
        assert proc.poll() is None
    late = [b for b in cloud.batches(DEV, "g-speed") if b.arrived > receipt.arrived]
    assert late == []
    assert cloud.undecryptable == 0 and cloud.missing(DEV, "g-speed") == []
    assert cloud.bad_receipts() == []


def test_obd_wifi_dongle_two_grants(tmp_path: Path, pki, broker, cloud: CloudPeer, auth: Authority,
                                    elm: Elm327Simulator) -> None:
    """A Wi-Fi dongle (socket://) and two grants: each gets exactly its scopes, VIN and DTCs included."""
    port = elm.open_tcp()
    cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                       obd={"port": f"socket://127.0.0.1:{port}", "interval_s": 0.2, "timeout_s": 1.0})
    for gid in ("g-fuel", "g-diag"):
        cloud.add_recipient(gid, auth.recipient(gid))
    with AgentThread(cfg) as runner:
        assert runner.wait_link()
        cloud.publish_consent(DEV, auth.doc(DEV, {"g-fuel": ["read_fuel", "read_vin"],
                                                  "g-diag": ["read_diagnostics"]}))
        want_fuel = {"Vehicle.Powertrain.FuelSystem.RelativeLevel", "Vehicle.VehicleIdentification.VIN"}
        assert cloud.wait_for(lambda: {s.path for s in cloud.samples(DEV, "g-fuel")} >= want_fuel
                              and "Vehicle.OBD.DTCList" in {s.path for s in cloud.samples(DEV, "g-diag")}, 20)
    fuel = cloud.samples(DEV, "g-fuel")
    diag = cloud.samples(DEV, "g-diag")
    assert {s.path for s in fuel} == want_fuel
    assert {s.value for s in fuel if s.path.endswith("VIN")} == {elm.ecus.model.vin}
    assert "Vehicle.Speed" not in {s.path for s in diag}
    assert next(s.value for s in diag if s.path == "Vehicle.OBD.DTCList") == ["P0420"]
    assert not [r for r in elm.requests if r.startswith("01") and "0D" in [r[i:i + 2] for i in
                                                                          range(2, len(r), 2)]]
