"""The variable-length J1939 PGNs the agent reads itself (a DBC cannot describe them).

* VIN, PGN 65260 (J1939-71 5.3.19): ASCII, ended by ``*``.
* Component identification, PGN 65259 (J1939-71 5.3.18): make, model, serial number, unit number, each
  ended by ``*``.
* DM1 active diagnostic trouble codes, PGN 65226 (J1939-73 5.7.1): two bytes of lamp status, then four bytes
  per DTC: SPN (19 bits: byte 3, byte 4, top 3 bits of byte 5), FMI (low 5 bits of byte 5), conversion method
  (top bit of byte 6, version 4 SPN layout assumed) and occurrence count (low 7 bits of byte 6). A DM1 with no
  active fault carries SPN 0, FMI 0.

Each parser takes the reassembled payload and returns the value the agent sends, or None for a payload that
is not one (never raises on bus data).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

PGN_VIN = 65260
PGN_COMPONENT_ID = 65259
PGN_DM1 = 65226

VIN_PATH = "Vehicle.VehicleIdentification.VIN"
COMPONENT_PATH = "Vehicle.VehicleIdentification.J1939ComponentIdentification"
DM1_PATH = "Vehicle.Diagnostics.J1939ActiveDTCList"

_PRINTABLE = frozenset(string.printable.encode()) - frozenset(b"\t\n\r\x0b\x0c")


@dataclass(frozen=True, slots=True)
class Builtin:
    """A PGN the agent parses itself: where its value goes and which consent scope permits it."""

    pgn: int
    path: str
    scope: str


BUILTINS = {
    PGN_VIN: Builtin(PGN_VIN, VIN_PATH, "read_vin"),
    PGN_COMPONENT_ID: Builtin(PGN_COMPONENT_ID, COMPONENT_PATH, "read_vehicle_info"),
    PGN_DM1: Builtin(PGN_DM1, DM1_PATH, "read_diagnostics"),
}


def _fields(data: bytes, count: int) -> list[str] | None:
    parts = bytes(data).split(b"*")
    if len(parts) < count + 1 and not (len(parts) == count and parts[-1]):
        return None
    out = []
    for raw in parts[:count]:
        raw = raw.rstrip(b"\x00\xff ")
        if any(b not in _PRINTABLE for b in raw):
            return None
        out.append(raw.decode("ascii"))
    return out


def parse_vin(data: bytes) -> str | None:
    """The VIN of a PGN 65260 payload, or None if it is not printable ASCII of 1..32 characters."""
    fields = _fields(data, 1)
    if not fields or not 1 <= len(fields[0]) <= 32:
        return None
    return fields[0]


def parse_component_id(data: bytes, source: int) -> dict[str, object] | None:
    """``{"sa", "make", "model", "serial", "unit"}`` of a PGN 65259 payload, or None."""
    fields = _fields(data, 4)
    if fields is None:
        return None
    make, model, serial, unit = fields
    return {"sa": source, "make": make, "model": model, "serial": serial, "unit": unit}


def parse_dm1(data: bytes, source: int) -> list[dict[str, int]] | None:
    """The active DTCs of a DM1 payload as ``[{"sa", "spn", "fmi", "oc"}]`` (empty: no active fault), or None
    for a payload too short to be a DM1."""
    if len(data) < 6:
        return None
    dtcs = []
    for i in range(2, len(data) - 3, 4):
        b = data[i : i + 4]
        spn = b[0] | (b[1] << 8) | ((b[2] & 0xE0) << 11)
        fmi = b[2] & 0x1F
        if spn == 0 and fmi == 0:
            continue  # "no active DTC" (J1939-73 5.7.1.14)
        if b == b"\xff\xff\xff\xff":
            continue  # padding of a transport message
        dtcs.append({"sa": source, "spn": spn, "fmi": fmi, "oc": b[3] & 0x7F})
    return dtcs


def encode_dm1(dtcs: list[tuple[int, int, int]], *, lamps: int = 0) -> bytes:
    """A DM1 payload for (SPN, FMI, occurrence) triples, at least 8 bytes (the simulator sends it)."""
    out = bytearray(lamps.to_bytes(2, "little") if lamps else b"\x00\xff")
    for spn, fmi, oc in dtcs or [(0, 0, 0)]:
        out += bytes([spn & 0xFF, (spn >> 8) & 0xFF, ((spn >> 11) & 0xE0) | (fmi & 0x1F), oc & 0x7F])
    return bytes(out.ljust(8, b"\xff"))
