"""A full session (vehicle on a virtual bus -> agent -> mosquitto over mTLS -> cloud, then revocation and
erasure) with every log record at DEBUG captured in journald format, plus `vgw status`/`vgw doctor` output:
no line may hold the VIN, a latitude/longitude, or any distinctive signal value the cloud received."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from vgw.base.logs import _JournalFormatter
from vgw_sim.cloud import CloudPeer

from tests.agentkit import AgentThread, Authority, Vehicle, vgw, write_config

DEV = "dev-0001"
LOCATION = ("Vehicle.CurrentLocation.Latitude", "Vehicle.CurrentLocation.Longitude")
VIN = "Vehicle.VehicleIdentification.VIN"
ALL_SCOPES = ["read_vehicle_info", "read_vin", "read_odometer", "read_fuel", "read_battery", "read_charge",
              "read_engine_oil", "read_tires", "read_diagnostics", "read_speedometer", "read_thermometer",
              "read_location", "read_compass", "read_security", "read_climate"]
_NUMBER = re.compile(r"-?\d+\.\d+")


class Capture(logging.Handler):
    """Every record from every thread, formatted as journald receives it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(_JournalFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def capture() -> Iterator[Capture]:
    root = logging.getLogger()
    handler = Capture()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
def vehicle_seed() -> int:
    return 11  # the seed these tests were written against


def test_no_personal_data_in_any_log_line(tmp_path: Path, pki, broker, cloud: CloudPeer, capture: Capture,
                                          vehicle: Vehicle) -> None:
    channel, sim = vehicle.channel, vehicle.sim
    auth = Authority(tmp_path)
    cloud.add_recipient("g-all", auth.recipient("g-all"))
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    with AgentThread(cfg) as agent:
        assert agent.wait_link()
        cloud.publish_consent(DEV, auth.doc(DEV, {"g-all": ALL_SCOPES},
                                            limits={"g-all": {"read_location": {"max_hz": 10, "precision_m": 1}}}))
        assert cloud.wait_for(lambda: {VIN, *LOCATION} <= {s.path for s in cloud.samples(DEV, "g-all")}, 20)
        status = vgw("status", "--config", str(cfg), "--json")
        cloud.publish_consent(DEV, auth.doc(DEV, {}))  # revoke all: erasure
        assert cloud.wait_for(lambda: bool(cloud.receipts(DEV, typ="erasure")), 15)
    doctor = vgw("doctor", "--config", str(cfg))

    samples = cloud.samples(DEV, "g-all")
    assert len(samples) > 50
    corpus = capture.lines + (status.stdout + status.stderr + doctor.stdout + doctor.stderr).splitlines()
    assert len(capture.lines) > 5  # the session did log (connects, consent, erasure)
    text = "\n".join(corpus)

    # The VIN, whole or any 7-character part of it (it travels in three parts).
    vin = sim.model.vin
    for part in {vin, vin[:7], vin[7:14], vin[14:]} - {""}:
        if len(part) >= 3:
            assert part not in text, f"VIN fragment {part!r} in the logs"
    # Latitude/longitude: no decimal number in any line may be within ~100 m of a position the car took.
    positions = [float(s.value) for s in samples if s.path in LOCATION]
    assert positions
    for line in corpus:
        for number in _NUMBER.findall(line):
            value = float(number)
            assert not any(abs(value - p) < 1e-3 for p in positions), f"location-like value in: {line!r}"
    # Every other signal value that is distinctive enough to be recognised (not 0, 1, 12...).
    for s in samples:
        if isinstance(s.value, str) and len(s.value) >= 3:
            assert s.value not in text, f"{s.path} value in the logs"
        elif isinstance(s.value, float) and not s.value.is_integer():
            for form in {repr(s.value), f"{s.value:.2f}", f"{s.value:.1f}"}:
                if len(form.lstrip("-").replace(".", "")) >= 4:
                    assert not re.search(rf"(?<![\d.]){re.escape(form)}(?![\d])", text), (
                        f"{s.path} value {form} in the logs")
