"""OBD-II over ISO-TP (ISO 15765-2/-4) directly on a python-can bus, without an ELM327.

Requests go out functionally addressed on 0x7DF as one single frame (an OBD request is at most 7 bytes);
ECUs answer on 0x7E8-0x7EF. A first frame is answered with a flow control (continue to send, block size
0, STmin 0) on the ECU's physical request id (response id - 8), and the consecutive frames are joined in
sequence. Answers are collected until ``timeout_s`` passes without any, or until ``quiet_s`` passes with
no frame after the last complete answer (so several ECUs can answer one functional request).

Only :class:`~agent.obd.request.ObdRequest` objects are sent. Opening the bus raises
:class:`~agent.errors.SourceOpenError`; a failing bus raises :class:`~agent.errors.SourceReadError`.
"""

from __future__ import annotations

import time
from typing import Any

from agent.errors import SourceOpenError, SourceReadError
from agent.obd.request import ObdRequest

FUNCTIONAL_ID = 0x7DF
RESPONSE_IDS = range(0x7E8, 0x7F0)
PHYSICAL_OFFSET = 8  # ECU request id = response id - 8 (ISO 15765-4 11-bit legislated ids)
PAD = 0xAA
FLOW_CONTROL_CTS = bytes((0x30, 0x00, 0x00))  # continue to send, no block limit, no separation time


class IsoTpTransport:
    """Functional OBD requests on one python-can bus. Not thread-safe: one poller thread owns it.

    Pass ``bus`` to use an already open bus (it is then not shut down by :meth:`close`).
    """

    is_can = True

    def __init__(self, interface: str | None, channel: str | None, *, timeout_s: float = 1.0,
                 bitrate: int | None = None, quiet_s: float = 0.08, bus: Any = None) -> None:
        self.interface = interface
        self.channel = channel
        self.bitrate = bitrate
        self.timeout_s = timeout_s
        self.quiet_s = quiet_s
        self._bus: Any = bus
        self._own_bus = bus is None

    def open(self) -> None:
        """Open the CAN bus (if not given). Raises SourceOpenError."""
        import can

        if self._bus is None:
            kwargs: dict[str, Any] = {"interface": self.interface, "channel": self.channel}
            if self.bitrate:
                kwargs["bitrate"] = self.bitrate
            try:
                self._bus = can.Bus(**kwargs)
            except (can.CanError, OSError, ValueError, ImportError) as exc:
                raise SourceOpenError(f"ISO-TP on {self.interface}:{self.channel}: cannot open bus: {exc}") from exc
            self._own_bus = True
        try:
            self._bus.set_filters([{"can_id": 0x7E8, "can_mask": 0x7F8, "extended": False}])
        except (can.CanError, NotImplementedError):
            pass  # software filtering below is enough

    def close(self) -> None:
        """Shut the bus down if this transport opened it (idempotent)."""
        bus, self._bus = self._bus, None
        if bus is not None and self._own_bus:
            try:
                bus.shutdown()
            except Exception:  # noqa: S110 - closing a vanished adapter must not raise
                pass

    def _send(self, arbitration_id: int, data: bytes) -> None:
        import can

        msg = can.Message(arbitration_id=arbitration_id, is_extended_id=False, data=data.ljust(8, bytes((PAD,))))
        try:
            self._bus.send(msg, timeout=self.timeout_s)
        except (can.CanError, OSError) as exc:
            raise SourceReadError(f"ISO-TP on {self.interface}:{self.channel}: send failed: {exc}") from exc

    def query(self, request: ObdRequest) -> dict[int, bytes]:
        """Send one checked request functionally; return {response id: payload} ({} = no ECU answered).

        Raises TypeError for anything but an ObdRequest, SourceReadError when the bus fails.
        """
        import can

        if not isinstance(request, ObdRequest):
            raise TypeError("IsoTpTransport.query takes an ObdRequest from agent.obd.request.build_request")
        if self._bus is None:
            raise SourceReadError(f"ISO-TP on {self.interface}:{self.channel}: not open")
        try:
            while self._bus.recv(0) is not None:
                pass  # drop late frames of an earlier request
        except (can.CanError, OSError) as exc:
            raise SourceReadError(f"ISO-TP on {self.interface}:{self.channel}: {exc}") from exc
        payload = request.payload
        self._send(FUNCTIONAL_ID, bytes((len(payload),)) + payload)
        done: dict[int, bytes] = {}
        partial: dict[int, tuple[int, bytearray, int]] = {}  # id -> (total, buffer, next sequence number)
        deadline = time.monotonic() + self.timeout_s
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                msg = self._bus.recv(deadline - now)
            except (can.CanError, OSError) as exc:
                raise SourceReadError(f"ISO-TP on {self.interface}:{self.channel}: {exc}") from exc
            if msg is None:
                break
            if msg.is_extended_id or msg.arbitration_id not in RESPONSE_IDS or msg.is_error_frame:
                continue
            ecu, data = msg.arbitration_id, bytes(msg.data)
            if not data or ecu in done:
                continue
            kind = data[0] >> 4
            if kind == 0:
                length = data[0] & 0x0F
                if 1 <= length <= len(data) - 1:
                    done[ecu] = data[1 : 1 + length]
            elif kind == 1 and len(data) >= 2:
                total = ((data[0] & 0x0F) << 8) | data[1]
                partial[ecu] = (total, bytearray(data[2:]), 1)
                self._send(ecu - PHYSICAL_OFFSET, FLOW_CONTROL_CTS)
                deadline = max(deadline, time.monotonic() + self.timeout_s)
            elif kind == 2 and ecu in partial:
                total, buf, seq = partial[ecu]
                if data[0] & 0x0F != seq & 0x0F:
                    del partial[ecu]  # a lost frame: ISO 15765-2 says drop the message
                    continue
                buf += data[1:]
                if len(buf) >= total:
                    done[ecu] = bytes(buf[:total])
                    del partial[ecu]
                else:
                    partial[ecu] = (total, buf, seq + 1)
            if done and not partial:
                deadline = min(deadline, time.monotonic() + self.quiet_s)
        return done
