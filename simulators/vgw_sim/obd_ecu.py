"""The simulated car's OBD-II ECUs: request bytes in, response payloads per ECU out.

Shared by the ELM327 simulator (:mod:`vgw_sim.elm327_sim`, which formats the payloads as ELM327 text) and
the ISO-TP responder (:mod:`vgw_sim.obd_responder`, which frames them on a CAN bus). Values come from
:class:`vgw_sim.vehicle.VehicleModel` (or anything with a ``state`` and ``step(dt)``) and are encoded
here independently of the agent's decoders, straight from the SAE J1979 formulas, so a decoding mistake on
either side shows up in the tests.

Two ECUs answer, as in most cars: the engine ECU (CAN 0x7E8, K-line 0x10) with every PID below, and the
transmission ECU (CAN 0x7E9, K-line 0x18) with the speed only. Every request received is appended to
:attr:`ObdEcus.requests` (uppercase hex), so tests can prove what a client asked for. Service 04 is
answered like a real car (it clears the codes), which is exactly why the agent must never send it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

ECM = 0
TCM = 1


class VehicleLike(Protocol):
    @property
    def state(self) -> Any: ...

    def step(self, dt: float) -> None: ...


def _byte(x: float) -> int:
    return max(0, min(255, round(x)))


def _u16(x: float) -> bytes:
    return max(0, min(0xFFFF, round(x))).to_bytes(2, "big")


def _pct(x: float) -> int:
    return _byte(x * 255.0 / 100.0)


# J1979 encoders: state -> data bytes (A, B, ...), the inverse of the formulas in agent/vgw/pipeline/obd/pids.py.
ENCODERS: dict[int, Callable[[Any], bytes]] = {
    0x01: lambda s: bytes(((0x80 if s.mil_on else 0) | min(0x7F, len(s.dtcs)), 0x07, 0xE5, 0x00)),
    0x04: lambda s: bytes((_pct(s.engine_load_pct),)),
    0x05: lambda s: bytes((_byte(s.coolant_temp_c + 40),)),
    0x0C: lambda s: _u16(s.engine_rpm * 4),
    0x0D: lambda s: bytes((_byte(s.speed_kmh),)),
    0x0F: lambda s: bytes((_byte(s.intake_air_temp_c + 40),)),
    0x11: lambda s: bytes((_pct(s.throttle_pct),)),
    0x1F: lambda s: _u16(s.runtime_s),
    0x2F: lambda s: bytes((_pct(s.fuel_level_pct),)),
    0x31: lambda s: _u16(s.distance_since_dtc_clear_km),
    0x42: lambda s: _u16(s.module_voltage_v * 1000),
    0x46: lambda s: bytes((_byte(s.ambient_temp_c + 40),)),
    0x5B: lambda s: bytes((_pct(s.battery_soc_pct),)),
    0xA6: lambda s: max(0, round(s.odometer_km * 10)).to_bytes(4, "big"),
}
BITMAP_PIDS = (0x00, 0x20, 0x40, 0x60, 0x80, 0xA0, 0xC0)


def bitmap(base: int, supported: Iterable[int]) -> bytes:
    """The 4-byte answer to bitmap PID ``base``: bit 31 = PID base+1 ... bit 0 = PID base+32."""
    bits = 0
    for pid in supported:
        if base < pid <= base + 32:
            bits |= 1 << (32 - (pid - base))
    return bits.to_bytes(4, "big")


def dtc_bytes(code: str) -> bytes:
    """``"P0420"`` -> two bytes (SAE J2012)."""
    rest = int(code[2:], 16)
    return bytes((("PCBU".index(code[0]) << 6) | (int(code[1]) << 4) | (rest >> 8), rest & 0xFF))


class ObdEcus:
    """The car's ECUs. Thread-safe; ``realtime`` steps the model by wall time before each answer.

    ``unsupported`` removes PIDs from the engine ECU (and its bitmaps); ``pending_dtcs`` are answered to
    service 07. With ``realtime=False`` the model stands still, which makes answers deterministic.
    """

    def __init__(
        self,
        model: VehicleLike,
        *,
        realtime: bool = True,
        unsupported: Iterable[int] = (),
        pending_dtcs: Iterable[str] = (),
        with_tcm: bool = True,
    ) -> None:
        self.model = model
        self.realtime = realtime
        self.pending_dtcs = tuple(pending_dtcs)
        self.cleared = False
        skip = set(unsupported)
        data_pids = {p for p in ENCODERS if p not in skip}
        ecm = set(data_pids)
        # Announce each further bitmap PID that leads to a supported PID (J1979: bit 32 of a bitmap).
        for base in BITMAP_PIDS[1:]:
            if any(p > base for p in data_pids):
                ecm.add(base)
        self.supported: tuple[set[int], ...] = (ecm, {0x0D} if with_tcm else set())
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self.last_state: Any = model.state

    def _state(self) -> Any:
        if self.realtime:
            now = time.monotonic()
            dt = min(5.0, max(0.0, now - self._last))
            self._last = now
            if dt > 0:
                self.model.step(dt)
        self.last_state = self.model.state
        return self.last_state

    def answer(self, request: bytes) -> dict[int, bytes]:
        """Response payloads keyed by ECU index (0 = engine, 1 = transmission); {} when nobody answers."""
        with self._lock:
            self.requests.append(request.hex().upper())
            if not request:
                return {}
            service, args = request[0], request[1:]
            state = self._state()
            out: dict[int, bytes] = {}
            for ecu, supported in enumerate(self.supported):
                if not supported:
                    continue
                reply = self._one(ecu, supported, service, args, state)
                if reply is not None:
                    out[ecu] = reply
            return out

    def _one(self, ecu: int, supported: set[int], service: int, args: bytes, state: Any) -> bytes | None:
        if service == 0x01:
            if not 1 <= len(args) <= 6:
                return None
            body = bytearray()
            for pid in args:
                if pid in BITMAP_PIDS:
                    if pid == 0 or pid in supported:
                        body += bytes((pid,)) + bitmap(pid, supported)
                elif pid in supported:
                    body += bytes((pid,)) + ENCODERS[pid](state)
            return bytes((0x41,)) + bytes(body) if body else None
        if ecu != ECM:
            return None
        if service == 0x09 and len(args) == 1:
            if args[0] == 0x00:
                return bytes((0x49, 0x00)) + bitmap(0, {0x02})
            if args[0] == 0x02:
                return bytes((0x49, 0x02, 0x01)) + str(state.vin).encode("ascii")
            return None
        if service in (0x03, 0x07) and not args:
            codes: tuple[str, ...] = () if self.cleared else tuple(state.dtcs if service == 0x03
                                                                  else self.pending_dtcs)
            return bytes((service + 0x40, len(codes))) + b"".join(dtc_bytes(c) for c in codes)
        if service == 0x04 and not args:
            self.cleared = True  # a real car clears its codes and readiness monitors here
            return bytes((0x44,))
        return bytes((0x7F, service, 0x11))  # negative response: serviceNotSupported


def frozen_model(seed: int = 1, *, dtcs: Iterable[str] = ("P0420",), warmup_s: float = 90.0) -> Any:
    """A VehicleModel advanced ``warmup_s`` into its drive cycle (moving, engine warm), for tests."""
    from vgw_sim.vehicle import VehicleModel

    model = VehicleModel(seed=seed, dtcs=tuple(dtcs))
    if warmup_s > 0 and math.isfinite(warmup_s):
        model.step(warmup_s)
    return model
