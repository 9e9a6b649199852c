"""An OBD-II ISO-TP server on a python-can bus: the simulated car's ECUs answering diagnostic requests.

Attach it to any bus the CAN simulator drives (``virtual``, SocketCAN, or the SLCAN pty's bus object)::

    responder = ObdResponder(bus, model)     # model: vgw_sim.vehicle.VehicleModel
    responder.start()                        # a daemon thread reading bus.recv()
    ...
    responder.close()

It answers functional requests on 0x7DF and physical ones on 0x7E0/0x7E1 (ISO 15765-4 11-bit ids): the
engine ECU replies on 0x7E8, the transmission ECU on 0x7E9. Answers longer than 7 bytes (the VIN, multi-PID
answers, DTC lists) go out as a first frame, then wait for the tester's flow control on the ECU's response
id - 8 and send consecutive frames honouring its block size and STmin (ISO 15765-2). Every request is
logged in :attr:`ObdResponder.requests` (through :class:`~vgw_sim.obd_ecu.ObdEcus`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import can

from vgw_sim.obd_ecu import ObdEcus, VehicleLike

FUNCTIONAL_ID = 0x7DF
REQUEST_BASE = 0x7E0
RESPONSE_BASE = 0x7E8
PAD = 0xAA
FC_TIMEOUT_S = 1.0  # N_Bs: how long to wait for the tester's flow control


class ObdResponder:
    """Serves OBD requests on ``bus`` from ``model`` (or a ready :class:`ObdEcus` via ``ecus``)."""

    def __init__(self, bus: can.BusABC, model: VehicleLike | None = None, *, ecus: ObdEcus | None = None,
                 realtime: bool = True) -> None:
        if ecus is None:
            if model is None:
                raise ValueError("ObdResponder needs a model or ecus")
            ecus = ObdEcus(model, realtime=realtime)
        self.bus = bus
        self.ecus = ecus
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fc: dict[int, list[bytes]] = {}  # ECU index -> flow-control frames received

    @property
    def requests(self) -> list[str]:
        return self.ecus.requests

    def start(self) -> ObdResponder:
        self._thread = threading.Thread(target=self._run, name="obd-responder", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (the bus stays open: it belongs to the caller). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def __enter__(self) -> ObdResponder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.bus.recv(0.05)
            except (can.CanError, OSError, ValueError):
                return
            if msg is None or msg.is_extended_id or msg.is_error_frame or msg.is_remote_frame:
                continue
            self.handle(msg)

    def handle(self, msg: can.Message) -> None:
        """Process one received frame (requests and flow controls)."""
        data = bytes(msg.data)
        arb = msg.arbitration_id
        if arb in (REQUEST_BASE, REQUEST_BASE + 1) and data and data[0] >> 4 == 3:
            self._fc.setdefault(arb - REQUEST_BASE, []).append(data)
            return
        if arb != FUNCTIONAL_ID and arb not in (REQUEST_BASE, REQUEST_BASE + 1):
            return
        if not data or data[0] >> 4 != 0:
            return  # OBD requests are single frames
        length = data[0] & 0x0F
        if not 1 <= length <= len(data) - 1:
            return
        answers = self.ecus.answer(data[1 : 1 + length])
        for ecu, payload in sorted(answers.items()):
            if arb != FUNCTIONAL_ID and ecu != arb - REQUEST_BASE:
                continue
            self._send_message(ecu, payload)

    def _send(self, ecu: int, data: bytes) -> None:
        self.bus.send(can.Message(arbitration_id=RESPONSE_BASE + ecu, is_extended_id=False,
                                  data=data.ljust(8, bytes((PAD,)))))

    def _wait_fc(self, ecu: int) -> bytes | None:
        """The next flow control from the tester for ``ecu``, reading the bus meanwhile (we own recv)."""
        deadline = time.monotonic() + FC_TIMEOUT_S
        while time.monotonic() < deadline and not self._stop.is_set():
            pending = self._fc.get(ecu)
            if pending:
                return pending.pop(0)
            msg = self.bus.recv(0.02)
            if msg is not None and not msg.is_extended_id and msg.arbitration_id == REQUEST_BASE + ecu:
                data = bytes(msg.data)
                if data and data[0] >> 4 == 3:
                    return data
        return None

    def _send_message(self, ecu: int, payload: bytes) -> None:
        if len(payload) <= 7:
            self._send(ecu, bytes((len(payload),)) + payload)
            return
        self._fc.pop(ecu, None)
        self._send(ecu, bytes((0x10 | (len(payload) >> 8), len(payload) & 0xFF)) + payload[:6])
        rest, seq = payload[6:], 1
        while rest:
            fc = self._wait_fc(ecu)
            if fc is None or fc[0] & 0x0F == 2:
                return  # timeout or overflow/abort: drop the message (N_Bs)
            if fc[0] & 0x0F == 1:
                continue  # wait: the tester sends another flow control
            block = fc[1] if len(fc) > 1 else 0
            st = _stmin_s(fc[2] if len(fc) > 2 else 0)
            sent = 0
            while rest and (block == 0 or sent < block):
                self._send(ecu, bytes((0x20 | (seq & 0x0F),)) + rest[:7])
                rest, seq, sent = rest[7:], seq + 1, sent + 1
                if st:
                    time.sleep(st)


def _stmin_s(raw: int) -> float:
    """ISO 15765-2 STmin byte -> seconds (0x00-0x7F ms, 0xF1-0xF9 100-900 us, reserved -> 127 ms)."""
    if raw <= 0x7F:
        return raw / 1000.0
    if 0xF1 <= raw <= 0xF9:
        return (raw - 0xF0) / 10000.0
    return 0.127


def attach(bus: can.BusABC, model: Any, *, realtime: bool = True) -> ObdResponder:
    """Start a responder for ``model`` on ``bus`` (the hook for ``vgw sim can``); close() it when done."""
    return ObdResponder(bus, model, realtime=realtime).start()
