"""The demo vehicle's DBC and its signal map (dbc/vehicle.dbc, dbc/signals.toml)."""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from typing import Any

import pytest
from cantools.database.can import Database
from vgw.contract.scopes import SCOPES
from vgw_sim.paths import dbc_dir, default_dbc, default_signal_map

VSS_PATH = re.compile(r"^Vehicle(\.[A-Z][A-Za-z0-9]*)+$")
MUX_SELECTOR = ("VehicleIdentification", "VIN_MuxSelector")

# quantity -> (message, signal, unit, VSS path, scope) the issue asks for
REQUIRED = {
    "vehicle speed": ("VehicleDynamics", "VehicleSpeed", "km/h", "Vehicle.Speed", "read_speedometer"),
    "engine speed": (
        "EngineStatus",
        "EngineSpeed",
        "rpm",
        "Vehicle.Powertrain.CombustionEngine.Speed",
        "read_diagnostics",
    ),
    "odometer": ("Odometer", "Odometer", "km", "Vehicle.TraveledDistance", "read_odometer"),
    "fuel level": (
        "FuelStatus",
        "FuelLevel",
        "%",
        "Vehicle.Powertrain.FuelSystem.RelativeLevel",
        "read_fuel",
    ),
    "traction SoC": (
        "BatteryStatus",
        "TractionBatterySoC",
        "%",
        "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current",
        "read_battery",
    ),
    "charging state": (
        "BatteryStatus",
        "ChargingActive",
        None,
        "Vehicle.Powertrain.TractionBattery.Charging.IsCharging",
        "read_charge",
    ),
    "latitude": ("GnssPosition", "Latitude", "deg", "Vehicle.CurrentLocation.Latitude", "read_location"),
    "longitude": ("GnssPosition", "Longitude", "deg", "Vehicle.CurrentLocation.Longitude", "read_location"),
    "heading": ("GnssCourse", "Heading", "deg", "Vehicle.CurrentLocation.Heading", "read_compass"),
    "tyre FL": (
        "TirePressure",
        "TirePressure_FL",
        "kPa",
        "Vehicle.Chassis.Axle.Row1.Wheel.Left.Tire.Pressure",
        "read_tires",
    ),
    "tyre FR": (
        "TirePressure",
        "TirePressure_FR",
        "kPa",
        "Vehicle.Chassis.Axle.Row1.Wheel.Right.Tire.Pressure",
        "read_tires",
    ),
    "tyre RL": (
        "TirePressure",
        "TirePressure_RL",
        "kPa",
        "Vehicle.Chassis.Axle.Row2.Wheel.Left.Tire.Pressure",
        "read_tires",
    ),
    "tyre RR": (
        "TirePressure",
        "TirePressure_RR",
        "kPa",
        "Vehicle.Chassis.Axle.Row2.Wheel.Right.Tire.Pressure",
        "read_tires",
    ),
    "oil life": (
        "ServiceInfo",
        "OilLifeRemaining",
        "s",
        "Vehicle.Powertrain.CombustionEngine.EngineOil.LifeRemaining",
        "read_engine_oil",
    ),
    "ambient": (
        "ClimateStatus",
        "AmbientAirTemp",
        "degC",
        "Vehicle.Exterior.AirTemperature",
        "read_thermometer",
    ),
    "cabin": (
        "ClimateStatus",
        "CabinAirTemp",
        "degC",
        "Vehicle.Cabin.HVAC.AmbientAirTemperature",
        "read_climate",
    ),
    "driver door lock": (
        "DoorLockStatus",
        "DoorLocked_FL",
        None,
        "Vehicle.Cabin.Door.Row1.DriverSide.IsLocked",
        "read_security",
    ),
    "gear": (
        "TransmissionStatus",
        "CurrentGear",
        None,
        "Vehicle.Powertrain.Transmission.CurrentGear",
        "read_diagnostics",
    ),
}


@pytest.fixture(scope="module")
def entries() -> list[dict[str, Any]]:
    with default_signal_map().open("rb") as fh:
        doc = tomllib.load(fh)
    assert set(doc) == {"signal"}
    signals = doc["signal"]
    assert isinstance(signals, list)
    return signals


def _signal(db: Database, message: str, signal: str) -> Any:
    return db.get_message_by_name(message).get_signal_by_name(signal)


def test_paths_point_at_the_shipped_files() -> None:
    assert dbc_dir().is_dir()
    assert default_dbc().name == "vehicle.dbc" and default_dbc().is_file()
    assert default_signal_map().name == "signals.toml" and default_signal_map().is_file()


def test_has_every_required_quantity(db: Database) -> None:
    for quantity, (message, signal, unit, _path, _scope) in REQUIRED.items():
        sig = _signal(db, message, signal)
        if unit is not None:
            assert sig.unit == unit, quantity
        assert sig.minimum is not None and sig.maximum is not None, quantity
        assert sig.comment, quantity


def test_every_message_and_signal_is_documented_and_bounded(db: Database) -> None:
    for msg in db.messages:
        assert msg.comment, msg.name
        assert msg.senders, msg.name
        for sig in msg.signals:
            assert sig.comment, f"{msg.name}.{sig.name}"
            assert sig.minimum is not None and sig.maximum is not None, f"{msg.name}.{sig.name}"


def test_mixed_byte_orders(db: Database) -> None:
    orders = Counter(s.byte_order for m in db.messages for s in m.signals)
    assert orders["big_endian"] >= 3 and orders["little_endian"] >= 3
    assert _signal(db, "EngineStatus", "EngineSpeed").byte_order == "big_endian"


def test_signed_and_scaled_signals(db: Database) -> None:
    lat = _signal(db, "GnssPosition", "Latitude")
    lon = _signal(db, "GnssPosition", "Longitude")
    for sig in (lat, lon):
        assert sig.is_signed and sig.length == 32 and sig.scale == pytest.approx(1e-7)
    assert any(
        s.is_signed and s.scale != 1 and s.byte_order == "big_endian" for m in db.messages for s in m.signals
    )
    assert any(s.offset != 0 for m in db.messages for s in m.signals)


def test_extended_id_message(db: Database) -> None:
    extended = [m for m in db.messages if m.is_extended_frame]
    assert [m.name for m in extended] == ["GnssPosition"]
    assert extended[0].frame_id > 0x7FF


def test_vin_is_multiplexed_in_three_big_endian_parts(db: Database) -> None:
    msg = db.get_message_by_name("VehicleIdentification")
    assert msg.is_multiplexed()
    selector = msg.get_signal_by_name("VIN_MuxSelector")
    assert selector.is_multiplexer
    for k in range(3):
        part = msg.get_signal_by_name(f"VIN_Part{k}")
        assert part.multiplexer_ids == [k]
        assert part.length == 56 and part.byte_order == "big_endian" and not part.is_signed
    vin = b"1M8GDM9AXKP042788".ljust(21, b"\0")
    decoded = b""
    for k in range(3):
        raw = int.from_bytes(vin[7 * k : 7 * k + 7], "big")
        frame = msg.encode({"VIN_MuxSelector": k, f"VIN_Part{k}": raw})
        # The raw integer's big-endian bytes are the characters in order, right after the selector.
        assert frame[1:] == vin[7 * k : 7 * k + 7]
        value = msg.decode(frame, decode_choices=False)[f"VIN_Part{k}"]
        decoded += int(value).to_bytes(7, "big")
    assert decoded.rstrip(b"\0").decode() == "1M8GDM9AXKP042788"


def test_choices(db: Database) -> None:
    gear = _signal(db, "TransmissionStatus", "CurrentGear")
    assert gear.is_signed and str(gear.choices[-1]) == "Reverse" and str(gear.choices[126]) == "Park"
    assert str(_signal(db, "BatteryStatus", "ChargingActive").choices[1]) == "Charging"
    for door in ("FL", "FR", "RL", "RR"):
        choices = _signal(db, "DoorLockStatus", f"DoorLocked_{door}").choices
        assert {str(v) for v in choices.values()} == {"Locked", "Unlocked"}


def test_cycle_times_from_10ms_to_1s(db: Database) -> None:
    periods = {m.name: m.cycle_time for m in db.messages}
    assert all(p is not None and 10 <= p <= 1000 for p in periods.values()), periods
    assert min(periods.values()) == 10 and max(periods.values()) == 1000


def test_signal_map_covers_every_data_signal_exactly_once(
    db: Database, entries: list[dict[str, Any]]
) -> None:
    mapped = Counter((e["message"], e["signal"]) for e in entries)
    assert all(n == 1 for n in mapped.values()), [k for k, n in mapped.items() if n > 1]
    data_signals = {(m.name, s.name) for m in db.messages for s in m.signals if not s.is_multiplexer}
    assert set(mapped) == data_signals
    assert MUX_SELECTOR not in mapped


def test_signal_map_entries_are_well_formed(entries: list[dict[str, Any]]) -> None:
    for e in entries:
        where = f"{e.get('message')}.{e.get('signal')}"
        allowed = {"message", "signal", "path", "scope"} | ({"part", "parts"} if "part" in e else set())
        assert set(e) == allowed, where
        assert e["scope"] in SCOPES, where
        assert VSS_PATH.match(e["path"]), where
    paths = Counter(e["path"] for e in entries)
    assert {p for p, n in paths.items() if n > 1} == {"Vehicle.VehicleIdentification.VIN"}


def test_signal_map_vin_parts(entries: list[dict[str, Any]]) -> None:
    vin = sorted(
        (e for e in entries if e["path"] == "Vehicle.VehicleIdentification.VIN"), key=lambda e: e["part"]
    )
    assert [(e["signal"], e["part"], e["parts"], e["scope"]) for e in vin] == [
        (f"VIN_Part{k}", k, 3, "read_vin") for k in range(3)
    ]


def test_signal_map_uses_the_expected_paths_and_scopes(entries: list[dict[str, Any]]) -> None:
    by_signal = {(e["message"], e["signal"]): (e["path"], e["scope"]) for e in entries}
    for quantity, (message, signal, _unit, path, scope) in REQUIRED.items():
        assert by_signal[(message, signal)] == (path, scope), quantity
