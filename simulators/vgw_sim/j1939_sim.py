"""A J1939 truck on the bus (README "SAE J1939"): the vehicle model through a J1939 DBC, from several ECUs.

:class:`J1939Simulator` is a :class:`~vgw_sim.can_sim.CanSimulator` whose frames are a J1939 network:

- every DBC message at its cycle time from its DBC source address, and each message named in ``sources``
  also from those further source addresses, with another priority and values of their own (half the
  physical value: a second engine controller that idles) -- the case the agent must match by PGN and tell
  apart by source address;
- DM1 (PGN 65226) once a second (at +0.6 s) from the engine (source 0x00): a coolant fault (SPN 110, FMI 0) and an
  oil-pressure fault (SPN 100, FMI 1) that are active every other ``fault_period_s`` seconds, with occurrence
  counts that grow each time they come back; two DTCs need 10 bytes, so the active DM1 goes by TP.BAM, the
  empty one in a single frame;
- VIN (PGN 65260) and component identification (PGN 65259) by TP.BAM every ``identity_period_s`` seconds,
  data packets 50 ms apart (J1939-21 5.10.2.4 allows 50..200 ms), and on request: :class:`J1939Responder`
  answers a request (PGN 59904) for them on a live bus.

All times are simulated time, so :meth:`frames` is deterministic like the CAN simulator's.
"""

from __future__ import annotations

import heapq
import math
import os
import threading
import time
from collections.abc import Iterator
from operator import attrgetter

import can
from cantools.database.can import Message
from vgw.base.errors import ConfigError
from vgw.pipeline.j1939.ids import GLOBAL, PGN_REQUEST, PGN_TP_CM, PGN_TP_DT, is_j1939, make_id, parse
from vgw.pipeline.j1939.messages import PGN_COMPONENT_ID, PGN_DM1, PGN_VIN, encode_dm1
from vgw.pipeline.j1939.transport import CM_BAM

from vgw_sim.can_sim import CanSimulator
from vgw_sim.vehicle import VehicleModel

ENGINE = 0x00
SECOND_ENGINE = 0x01
DEFAULT_SOURCES: dict[str, tuple[int, ...]] = {"EEC1": (SECOND_ENGINE,)}
FAULTS = ((110, 0), (100, 1))  # (SPN, FMI): coolant temperature high, oil pressure low
COMPONENT_ID = "VGW*TRUCK-J1939*SN000042*UNIT7*"
BAM_GAP_S = 0.05
DM1_OFFSET_S = 0.6  # DM1 goes at this offset into every simulated second


def is_j1939_dbc(messages: list[Message]) -> bool:
    """True if any message of a DBC is a J1939 parameter group (``VFrameFormat`` ``J1939PG``)."""
    return any(is_j1939(m) for m in messages)


class J1939Simulator(CanSimulator):
    """The vehicle model as a J1939 network. Raises ConfigError like :class:`CanSimulator`, and for a
    ``sources`` entry naming a message that is not a J1939 message of the DBC."""

    def __init__(self, dbc_path: str | os.PathLike[str] | None = None, model: VehicleModel | None = None, *,
                 sources: dict[str, tuple[int, ...]] | None = None, fault_period_s: float = 10.0,
                 identity_period_s: float | None = 5.0, channel: str | None = None) -> None:
        super().__init__(dbc_path, model, channel=channel)
        by_name = {m.name: m for m in self.messages}
        for name in sources or {}:
            if name not in by_name or not is_j1939(by_name[name]):
                raise ConfigError(f"DBC file {self.dbc_path}: no J1939 message {name!r} to send from more sources")
        wanted = DEFAULT_SOURCES if sources is None else sources
        self.sources = {n: s for n, s in wanted.items() if n in by_name and is_j1939(by_name[n])}
        if identity_period_s is not None and (identity_period_s < 1 or identity_period_s != int(identity_period_s)):
            # Whole seconds keep the BAMs of one sender apart (see _network).
            raise ValueError(f"identity_period_s must be a whole number of seconds >= 1, got {identity_period_s}")
        self.fault_period_s = fault_period_s
        #: None: VIN and component identification only on request (J1939Responder)
        self.identity_period_s = None if identity_period_s is None else float(identity_period_s)

    def dm1_at(self, sim_s: float) -> list[tuple[int, int, int]]:
        """The engine's active DTCs (SPN, FMI, occurrence count) at ``sim_s`` simulated seconds."""
        cycle = int(sim_s // self.fault_period_s)
        if cycle % 2 == 0:
            return []
        occurrence = min(cycle // 2 + 1, 126)
        return [(spn, fmi, occurrence) for spn, fmi in FAULTS]

    def frames(self, duration_s: float | None = None, *, start_time: float | None = None) -> Iterator[can.Message]:
        model = self.model
        base = (model.start_time + model.t) if start_time is None else float(start_time)
        end = math.inf if duration_s is None else duration_s
        dbc = self._with_sources(super().frames(duration_s, start_time=base))
        extra = self._network(base, end)
        return heapq.merge(dbc, extra, key=attrgetter("timestamp"))

    def _with_sources(self, frames: Iterator[can.Message]) -> Iterator[can.Message]:
        by_id = {m.frame_id: m for m in self.messages}
        for frame in frames:
            yield frame
            message = by_id.get(frame.arbitration_id)
            if message is None:
                continue
            for i, source in enumerate(self.sources.get(message.name, ())):
                yield self._copy(message, frame, source, i + 1)

    def _copy(self, message: Message, frame: can.Message, source: int, n: int) -> can.Message:
        values = message.decode(bytes(frame.data), decode_choices=False)
        assert isinstance(values, dict)
        halved: dict[str, float] = {}
        for sig in message.signals:
            v = float(values[sig.name]) / 2  # type: ignore[arg-type]  # decode_choices=False: numbers only
            lo = sig.minimum if sig.minimum is not None else -math.inf
            hi = sig.maximum if sig.maximum is not None else math.inf
            halved[sig.name] = min(max(v, lo), hi)
        jid = parse(message.frame_id)
        priority = 6 if jid.priority != 6 else 3  # another priority than the DBC's: the agent must not care
        return can.Message(
            timestamp=frame.timestamp + n * 0.0005,
            arbitration_id=make_id(jid.pgn, source, destination=jid.destination, priority=priority),
            is_extended_id=True, data=message.encode(halved, strict=False), channel=self.channel, is_rx=False,
            check=False)

    def _network(self, base: float, end: float) -> Iterator[can.Message]:
        """DM1 every second, VIN and component identification every ``identity_period_s`` (simulated s).

        A transfer's packets come after its start, so a frame is released once no event before it is left.
        """
        pending: list[tuple[float, int, can.Message]] = []
        n = 0
        # One BAM per sender at a time (J1939-21 5.10.3): VIN at +0.05 s (3 packets, to 0.20), component
        # identification at +0.25 s (5 packets, to 0.50), DM1 at +0.6 s (2 packets, to 0.70) of a second.
        next_dm1, next_identity = DM1_OFFSET_S, 0.05 if self.identity_period_s is not None else math.inf
        while True:
            event = min(next_dm1, next_identity)
            if pending and (pending[0][0] - base < event or event >= end):
                frame = heapq.heappop(pending)[2]
                if frame.timestamp - base >= end:
                    return
                yield frame
                continue
            if event >= end:
                return
            if event == next_dm1:
                next_dm1 += 1.0
                batch = self._pgn(PGN_DM1, ENGINE, encode_dm1(self.dm1_at(event)), base + event)
            else:
                next_identity += self.identity_period_s or math.inf
                batch = self._pgn(PGN_VIN, ENGINE, (self.model.vin + "*").encode("ascii"), base + event)
                batch += self._pgn(PGN_COMPONENT_ID, ENGINE, COMPONENT_ID.encode("ascii"), base + event + 0.2)
            for frame in batch:
                heapq.heappush(pending, (frame.timestamp, n, frame))
                n += 1

    def answer(self, can_id: int, data: bytes, t: float) -> list[can.Message]:
        """The engine's answer to a request frame (PGN 59904) received at ``t``: VIN or component
        identification by TP.BAM when it is requested globally or from the engine; nothing otherwise."""
        jid = parse(can_id)
        if jid.pgn != PGN_REQUEST or len(data) < 3 or jid.destination not in (GLOBAL, ENGINE):
            return []
        pgn = int.from_bytes(bytes(data[:3]), "little")
        if pgn == PGN_VIN:
            return self._pgn(PGN_VIN, ENGINE, (self.model.vin + "*").encode("ascii"), t)
        if pgn == PGN_COMPONENT_ID:
            return self._pgn(PGN_COMPONENT_ID, ENGINE, COMPONENT_ID.encode("ascii"), t)
        return []

    def _pgn(self, pgn: int, source: int, payload: bytes, t: float) -> list[can.Message]:
        """One frame for up to 8 bytes, else a TP.BAM announcement and its data packets."""
        def frame(ident: int, data: bytes, at: float) -> can.Message:
            return can.Message(timestamp=at, arbitration_id=ident, is_extended_id=True, data=data,
                               channel=self.channel, is_rx=False, check=False)

        if len(payload) <= 8:
            return [frame(make_id(pgn, source), payload.ljust(8, b"\xff"), t)]
        packets = -(-len(payload) // 7)
        cm = bytes([CM_BAM, len(payload) & 0xFF, len(payload) >> 8, packets, 0xFF]) + pgn.to_bytes(3, "little")
        out = [frame(make_id(PGN_TP_CM, source, destination=GLOBAL, priority=7), cm, t)]
        for seq in range(1, packets + 1):
            chunk = payload[(seq - 1) * 7 : seq * 7].ljust(7, b"\xff")
            out.append(frame(make_id(PGN_TP_DT, source, destination=GLOBAL, priority=7), bytes([seq]) + chunk,
                             t + seq * BAM_GAP_S))
        return out


class J1939Responder:
    """Answers J1939 requests on ``bus`` for ``sim`` (a daemon thread reading ``bus.recv()``; the answer's
    packets go out ``BAM_GAP_S`` apart). Every request seen is kept in :attr:`requests` as (id, data).

    One thread owns the bus's receive side; ``requests`` is appended by that thread only."""

    def __init__(self, bus: can.BusABC, sim: J1939Simulator) -> None:
        self.bus = bus
        self.sim = sim
        self.requests: list[tuple[int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="j1939-responder", daemon=True)

    def start(self) -> J1939Responder:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (the bus stays open: it belongs to the caller). Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.bus.recv(0.05)
            except (can.CanError, OSError, ValueError):
                return
            if msg is None or not msg.is_extended_id or parse(msg.arbitration_id).pgn != PGN_REQUEST:
                continue
            self.requests.append((msg.arbitration_id, bytes(msg.data)))
            start = time.time()
            for frame in self.sim.answer(msg.arbitration_id, bytes(msg.data), start):
                if self._stop.wait(max(0.0, frame.timestamp - time.time())):
                    return
                try:
                    self.bus.send(frame)
                except can.CanError:
                    pass  # a full queue loses the frame, as on a real bus
