"""OBD-II over ISO-TP (ISO 15765-2/-4) directly on a python-can bus, without an ELM327.

Requests go out functionally addressed on 0x7DF as one single frame (an OBD request is at most 7 bytes);
ECUs answer on 0x7E8-0x7EF. A first frame is answered with a flow control (continue to send, block size
0, STmin 0) on the ECU's physical request id (response id - 8), and the consecutive frames are joined in
sequence (:class:`Reassembly`, pure, no I/O).

Deadlines hold whatever the bus does: one exchange (request and every answer) ends ``timeout_s`` after
the request at the latest - never later, however many frames arrive - or ``quiet_s`` after the last
complete answer when no reassembly is open (so several ECUs can answer one functional request). Each ECU
gets at most one flow control per exchange: a repeated first frame, or an ECU that keeps chattering,
cannot make the agent flood the bus. Frames of an ECU that already answered are ignored.

Why not ``can-isotp``: it is a complete ISO 15765-2 stack, but point to point - one transport layer (and
its thread) per address pair, so a functional OBD request would need eight of them behind a notifier -
and, as ISO 15765-2 asks, it restarts reception and sends a new flow control on every first frame, which
is the flood this module must refuse. OBD needs the small receiving subset above; see docs/obd.md.

Only :class:`~vgw.pipeline.obd.request.ObdRequest` objects are sent. Opening the bus raises
:class:`~vgw.base.errors.SourceOpenError`; a failing bus raises :class:`~vgw.base.errors.SourceReadError`.
"""

from __future__ import annotations

import time
from typing import Any

from vgw.base.errors import SourceOpenError, SourceReadError
from vgw.pipeline.obd.request import ObdRequest

FUNCTIONAL_ID = 0x7DF
RESPONSE_IDS = range(0x7E8, 0x7F0)
PHYSICAL_OFFSET = 8  # ECU request id = response id - 8 (ISO 15765-4 11-bit legislated ids)
PAD = 0xAA
FLOW_CONTROL_CTS = bytes((0x30, 0x00, 0x00))  # continue to send, no block limit, no separation time
MAX_DRAIN_FRAMES = 1024  # stale frames dropped before a request; a flooded bus cannot hold the exchange


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

        Returns within ``timeout_s`` (plus one bus send). Raises TypeError for anything but an ObdRequest,
        SourceReadError when the bus fails.
        """
        import can

        if not isinstance(request, ObdRequest):
            raise TypeError("IsoTpTransport.query takes an ObdRequest from vgw.pipeline.obd.request.build_request")
        if self._bus is None:
            raise SourceReadError(f"ISO-TP on {self.interface}:{self.channel}: not open")
        start = time.monotonic()
        deadline = start + self.timeout_s  # absolute: nothing on the bus moves it
        try:
            drained = 0
            while drained < MAX_DRAIN_FRAMES and time.monotonic() < deadline and self._bus.recv(0) is not None:
                drained += 1  # drop late frames of an earlier request (bounded: a flooded bus cannot hold us)
        except (can.CanError, OSError) as exc:
            raise SourceReadError(f"ISO-TP on {self.interface}:{self.channel}: {exc}") from exc
        payload = request.payload
        self._send(FUNCTIONAL_ID, bytes((len(payload),)) + payload)
        rx = Reassembly()
        end = deadline
        while True:
            now = time.monotonic()
            if now >= end:
                break
            try:
                msg = self._bus.recv(end - now)
            except (can.CanError, OSError) as exc:
                raise SourceReadError(f"ISO-TP on {self.interface}:{self.channel}: {exc}") from exc
            if msg is None:
                break
            if msg.is_extended_id or msg.arbitration_id not in RESPONSE_IDS or msg.is_error_frame:
                continue
            if rx.feed(msg.arbitration_id, bytes(msg.data)):
                self._send(msg.arbitration_id - PHYSICAL_OFFSET, FLOW_CONTROL_CTS)
            if rx.done and not rx.open:
                end = min(deadline, time.monotonic() + self.quiet_s)
            elif rx.open:
                end = deadline  # a message is being received: wait for it, but never past the deadline
        return dict(rx.done)


class Reassembly:
    """ISO 15765-2 reception of the answers to one functional request (pure: frames in, decisions out).

    :meth:`feed` takes one frame's data from one ECU and returns True when the caller must send that ECU
    a flow control - at most once per ECU per instance (one instance per exchange). ``done`` maps each
    ECU to its first complete message; ``open`` holds the ECUs whose message is incomplete. Never raises
    for any frame content; memory is bounded by 8 ECUs x 4095 bytes.
    """

    def __init__(self) -> None:
        self.done: dict[int, bytes] = {}
        self.open: dict[int, tuple[int, bytearray, int]] = {}  # ecu -> (total, buffer, next sequence number)
        self.flow_controls: set[int] = set()  # ECUs already sent their one flow control

    def feed(self, ecu: int, data: bytes) -> bool:
        """Process one frame of ``ecu``; True = send this ECU a flow control (continue to send) now."""
        if not data or ecu in self.done:
            return False
        kind = data[0] >> 4
        if kind == 0:  # single frame (ISO 15765-2 9.6.2)
            length = data[0] & 0x0F
            if 1 <= length <= len(data) - 1 and ecu not in self.open:
                self.done[ecu] = bytes(data[1 : 1 + length])
            return False
        if kind == 1 and len(data) >= 2:  # first frame (9.6.3)
            if ecu in self.flow_controls:
                return False  # a repeated first frame: one flow control per ECU per exchange, no restart
            total = ((data[0] & 0x0F) << 8) | data[1]
            if total <= 7:
                return False  # a first frame must carry more than a single frame can (9.6.3.1)
            self.flow_controls.add(ecu)
            self.open[ecu] = (total, bytearray(data[2:8]), 1)
            return True
        if kind == 2 and ecu in self.open:  # consecutive frame (9.6.4)
            total, buf, seq = self.open[ecu]
            if data[0] & 0x0F != seq & 0x0F:
                del self.open[ecu]  # a lost frame: ISO 15765-2 says drop the message
                return False
            buf += data[1:8]
            if len(buf) >= total:
                self.done[ecu] = bytes(buf[:total])
                del self.open[ecu]
            else:
                self.open[ecu] = (total, buf, seq + 1)
        return False
