"""The PID catalogue: every PID decodes to the SAE J1979 value and unit; names, bitmaps and DTCs."""

from __future__ import annotations

import pytest
from vgw.contract.scopes import SCOPES
from vgw.pipeline.obd.pids import (
    BY_NAME,
    BY_NUMBER,
    PIDS,
    decode_dtcs,
    encode_dtc,
    parse_bitmap,
    resolve,
)
from vgw.sources.obd.poller import decode_vin

# (PID, data bytes A.., expected value, unit) worked from the J1979 formulas.
VECTORS = [
    (0x01, "81076500", True, ""),  # MIL on, 1 DTC
    (0x01, "00076500", False, ""),
    (0x04, "FF", 100.0, "percent"),
    (0x04, "80", 50.2, "percent"),
    (0x05, "00", -40, "celsius"),
    (0x05, "7B", 83, "celsius"),
    (0x0C, "1AF8", 1726.0, "rpm"),  # (256*26 + 248) / 4
    (0x0C, "FFFF", 16383.75, "rpm"),
    (0x0D, "00", 0, "km/h"),
    (0x0D, "FF", 255, "km/h"),
    (0x0F, "3C", 20, "celsius"),
    (0x11, "33", 20.0, "percent"),
    (0x1F, "0102", 258, "s"),
    (0x2F, "BF", 74.9, "percent"),
    (0x31, "1234", 4660, "km"),
    (0x42, "3A98", 15.0, "V"),  # 15000 mV
    (0x46, "28", 0, "celsius"),
    (0x5B, "CC", 80.0, "percent"),
    (0xA6, "0001E240", 12345.6, "km"),  # 123456 / 10
    (0xA6, "FFFFFFFF", 429496729.5, "km"),
]


@pytest.mark.parametrize(("pid", "data", "value", "unit"), VECTORS)
def test_decode_per_j1979(pid: int, data: str, value: object, unit: str) -> None:
    spec = BY_NUMBER[pid]
    assert spec.unit == unit
    got = spec.value(bytes.fromhex(data))
    if isinstance(value, float):
        assert got == pytest.approx(value, abs=0.01)
    else:
        assert got == value


def test_every_pid_has_a_vector_and_a_known_scope() -> None:
    assert {p.pid for p in PIDS} == {v[0] for v in VECTORS}
    for p in PIDS:
        assert p.scope in SCOPES
        assert p.path.startswith("Vehicle.")
        assert p.formula


def test_issue_pids_and_scopes() -> None:
    expected = {0x0D: "read_speedometer", 0x46: "read_thermometer", 0x2F: "read_fuel", 0xA6: "read_odometer",
                0x31: "read_odometer", 0x5B: "read_battery"}
    for pid, scope in expected.items():
        assert BY_NUMBER[pid].scope == scope
    for pid in (0x0C, 0x05, 0x0F, 0x42):
        assert pid in BY_NUMBER
    assert BY_NUMBER[0x0D].path == "Vehicle.Speed"


def test_short_data_raises() -> None:
    with pytest.raises(ValueError, match="needs 2 data bytes"):
        BY_NUMBER[0x0C].value(b"\x1a")


def test_resolve_names_and_hex() -> None:
    pids, specials = resolve(["speed", "0C", "0x2f", "vin", "DTCs"])
    assert pids == {0x0D, 0x0C, 0x2F}
    assert specials == {"vin", "dtcs"}
    assert BY_NAME["odometer"].pid == 0xA6
    with pytest.raises(ValueError, match="unknown OBD PID 'warp'"):
        resolve(["warp"])
    with pytest.raises(ValueError, match="unknown OBD PID '10'"):
        resolve(["10"])  # MAF: a PID vgw does not decode is never requested


def test_bitmap() -> None:
    # J1979 example answer to 0100: BE 1F A8 13
    assert parse_bitmap(0x00, bytes.fromhex("BE1FA813")) == {
        0x01, 0x03, 0x04, 0x05, 0x06, 0x07, 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x11, 0x13, 0x15, 0x1C, 0x1F, 0x20}
    assert parse_bitmap(0xA0, bytes.fromhex("04000000")) == {0xA6}


def test_dtcs_roundtrip() -> None:
    raw = bytes.fromhex("0420C1234ABC00008001")
    assert decode_dtcs(raw) == ["P0420", "U0123", "C0ABC", "B0001"]
    for code in ("P0420", "U0123", "C0ABC", "B0001", "P3FFF"):
        assert decode_dtcs(encode_dtc(code)) == [code]
    with pytest.raises(ValueError):
        encode_dtc("X0420")


def test_vin_forms() -> None:
    vin = "1M8GDM9AXKP042788"
    assert decode_vin(b"\x49\x02\x01" + vin.encode()) == vin  # CAN
    assert decode_vin(b"\x49\x02\x01\x00\x00\x00" + vin.encode()) == vin  # joined K-line with padding
    assert decode_vin(b"\x49\x02\x01ABC") is None
    assert decode_vin(b"\x41\x0d\x00") is None
