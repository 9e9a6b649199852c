"""The OBD-II PID catalogue: service 01 PIDs, the VIN and DTC readings vgw knows.

Every entry names its COVESA VSS 6.0 path, the consent scope that permits it (README "Scopes"), its unit and
its SAE J1979 (ISO 15031-5) decoding formula. A PID that is not in this table is never requested. Scope
choices follow ``dbc/signals.toml``: engine operating data (rpm, coolant and intake temperature, load,
throttle, run time, module voltage, MIL) are what a diagnostic tool reads, so they sit under
``read_diagnostics``; a speedometer grant reveals the speed and nothing else.

The decoders take the data bytes after the PID byte (J1979 calls them A, B, C, D) and raise ``ValueError``
when there are fewer bytes than the PID carries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

VIN_PATH = "Vehicle.VehicleIdentification.VIN"
DTC_PATH = "Vehicle.OBD.DTCList"
PENDING_DTC_PATH = "Vehicle.OBD.PendingDTCList"

Decoder = Callable[[bytes], float | int | bool]


@dataclass(frozen=True, slots=True)
class Pid:
    """One service 01 PID: number, config name, VSS path, scope, data length, J1979 formula and unit."""

    pid: int
    name: str
    path: str
    scope: str
    length: int  # data bytes after the PID byte
    formula: str  # as printed in SAE J1979, for the docs
    unit: str
    decode: Decoder

    def value(self, data: bytes) -> float | int | bool:
        """Decode ``data`` (the bytes A, B, ... after the PID byte). Raises ``ValueError`` if too short."""
        if len(data) < self.length:
            raise ValueError(f"PID {self.pid:02X} needs {self.length} data bytes, got {len(data)}")
        return self.decode(data[: self.length])


def _pct(d: bytes) -> float:
    return round(d[0] * 100.0 / 255.0, 2)


def _temp(d: bytes) -> int:
    return d[0] - 40


def _u16(d: bytes) -> int:
    return (d[0] << 8) | d[1]


PIDS: tuple[Pid, ...] = (
    Pid(0x01, "mil", "Vehicle.OBD.Status.IsMILOn", "read_diagnostics", 4, "A bit 7", "",
        lambda d: bool(d[0] & 0x80)),
    Pid(0x04, "engine_load", "Vehicle.OBD.EngineLoad", "read_diagnostics", 1, "100/255 A", "percent", _pct),
    Pid(0x05, "coolant_temp", "Vehicle.Powertrain.CombustionEngine.EngineCoolant.Temperature",
        "read_diagnostics", 1, "A - 40", "celsius", _temp),
    Pid(0x0C, "rpm", "Vehicle.Powertrain.CombustionEngine.Speed", "read_diagnostics", 2, "(256 A + B) / 4",
        "rpm", lambda d: _u16(d) / 4.0),
    Pid(0x0D, "speed", "Vehicle.Speed", "read_speedometer", 1, "A", "km/h", lambda d: d[0]),
    Pid(0x0F, "intake_temp", "Vehicle.OBD.IntakeTemp", "read_diagnostics", 1, "A - 40", "celsius", _temp),
    Pid(0x11, "throttle", "Vehicle.OBD.ThrottlePosition", "read_diagnostics", 1, "100/255 A", "percent", _pct),
    Pid(0x1F, "run_time", "Vehicle.OBD.RunTime", "read_diagnostics", 2, "256 A + B", "s", _u16),
    Pid(0x2F, "fuel_level", "Vehicle.Powertrain.FuelSystem.RelativeLevel", "read_fuel", 1, "100/255 A",
        "percent", _pct),
    Pid(0x31, "distance_since_dtc_clear", "Vehicle.OBD.DistanceSinceDTCClear", "read_odometer", 2,
        "256 A + B", "km", _u16),
    Pid(0x42, "module_voltage", "Vehicle.OBD.ControlModuleVoltage", "read_diagnostics", 2,
        "(256 A + B) / 1000", "V", lambda d: _u16(d) / 1000.0),
    Pid(0x46, "ambient_temp", "Vehicle.Exterior.AirTemperature", "read_thermometer", 1, "A - 40", "celsius",
        _temp),
    Pid(0x5B, "hybrid_battery", "Vehicle.OBD.HybridBatteryRemaining", "read_battery", 1, "100/255 A",
        "percent", _pct),
    Pid(0xA6, "odometer", "Vehicle.TraveledDistance", "read_odometer", 4, "(2^24 A + 2^16 B + 2^8 C + D) / 10",
        "km", lambda d: int.from_bytes(d[:4], "big") / 10.0),
)

BY_NUMBER: dict[int, Pid] = {p.pid: p for p in PIDS}
BY_NAME: dict[str, Pid] = {p.name: p for p in PIDS}

# Readings that are not a service 01 PID: (config name, service, PID or None, path, scope).
VIN_NAME = "vin"
DTC_NAME = "dtcs"
PENDING_DTC_NAME = "pending_dtcs"
SPECIAL_NAMES = frozenset({VIN_NAME, DTC_NAME, PENDING_DTC_NAME})
SPECIAL_SCOPES = {VIN_NAME: "read_vin", DTC_NAME: "read_diagnostics", PENDING_DTC_NAME: "read_diagnostics"}

# Service 01 PIDs 00, 20, 40 ... C0 answer a bitmap of the next 32 PIDs (J1979 "PIDs supported").
BITMAP_PIDS: tuple[int, ...] = (0x00, 0x20, 0x40, 0x60, 0x80, 0xA0, 0xC0)
# Data lengths of every service 01 PID vgw may see in an answer (to walk multi-PID responses).
DATA_LENGTH: dict[int, int] = {**{b: 4 for b in BITMAP_PIDS}, **{p.pid: p.length for p in PIDS}}


def resolve(names: Iterable[str]) -> tuple[frozenset[int], frozenset[str]]:
    """Config ``pids`` (names like ``"speed"`` or hex like ``"0D"``/``"0x0d"``) -> (PID numbers, specials).

    Specials are ``vin``, ``dtcs`` and ``pending_dtcs``. Raises ``ValueError`` naming an unknown entry.
    """
    numbers: set[int] = set()
    specials: set[str] = set()
    for raw in names:
        key = raw.strip().lower()
        if key in BY_NAME:
            numbers.add(BY_NAME[key].pid)
            continue
        if key in SPECIAL_NAMES:
            specials.add(key)
            continue
        hexpart = key[2:] if key.startswith("0x") else key
        try:
            number = int(hexpart, 16)
        except ValueError:
            number = -1
        if number not in BY_NUMBER:
            known = ", ".join(sorted(BY_NAME) + sorted(SPECIAL_NAMES))
            raise ValueError(f"unknown OBD PID {raw!r} (known: {known}, or their hex numbers)")
        numbers.add(number)
    return frozenset(numbers), frozenset(specials)


def parse_bitmap(base: int, data: bytes) -> set[int]:
    """PIDs announced by the 4-byte answer to bitmap PID ``base`` (bit 7 of A = PID base+1). ValueError if short."""
    if len(data) < 4:
        raise ValueError(f"bitmap PID {base:02X} needs 4 data bytes, got {len(data)}")
    bits = int.from_bytes(data[:4], "big")
    return {base + i + 1 for i in range(32) if bits & (1 << (31 - i))}


def decode_dtcs(data: bytes) -> list[str]:
    """Two-byte DTCs (J1979 / SAE J2012) -> ``["P0420", ...]``; 0000 padding is skipped."""
    out = []
    for i in range(0, len(data) - 1, 2):
        a, b = data[i], data[i + 1]
        if a == 0 and b == 0:
            continue
        out.append("PCBU"[a >> 6] + str((a >> 4) & 0x3) + f"{a & 0x0F:X}{b:02X}")
    return out


def encode_dtc(code: str) -> bytes:
    """``"P0420"`` -> ``b"\\x04\\x20"`` (the inverse of :func:`decode_dtcs`). ValueError if malformed."""
    code = code.upper()
    if len(code) != 5 or code[0] not in "PCBU" or code[1] not in "0123":
        raise ValueError(f"DTC {code!r} is not of the form P0420")
    rest = int(code[2:], 16)
    return bytes((("PCBU".index(code[0]) << 6) | (int(code[1]) << 4) | (rest >> 8), rest & 0xFF))
