"""CAN simulator: the vehicle model encoded with a DBC, at each message's cycle time.

:class:`CanSimulator` turns :class:`~vgw_sim.vehicle.VehicleModel` states into ``can.Message`` objects
with cantools, each message at its ``GenMsgCycleTime`` (multiplexed messages cycle through their
multiplexer values, one per transmission). Three ways to consume them:

- :meth:`CanSimulator.frames`: a time-ordered generator in simulated time, as fast as possible (traces,
  benchmarks);
- :meth:`CanSimulator.run`: send on any python-can bus, paced in real time or not;
- :meth:`CanSimulator.record`: write a trace (candump ``.log``, or any format ``can.Logger`` knows).

:func:`open_output` opens the buses by name: python-can ``virtual``, ``socketcan`` (vcan0/can0 where the
kernel has them) and ``slcan`` (an SLCAN adapter on a pseudo-terminal, :mod:`vgw_sim.slcan_pty`).

Errors: :class:`~vgw.base.errors.ConfigError` for a missing or invalid DBC, an unknown message name or an
unwritable trace; :class:`~vgw.base.errors.SourceOpenError` when a bus cannot be opened;
:class:`~vgw.base.errors.SourceError` when an open bus rejects every frame.
"""

from __future__ import annotations

import heapq
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import can
from cantools.database.can import Database, Message
from vgw.base.errors import ConfigError, SourceError, SourceOpenError
from vgw.pipeline import catalogue

from vgw_sim.paths import default_dbc
from vgw_sim.vehicle import VehicleModel, VehicleState

INTERFACES = ("virtual", "socketcan", "slcan")
DEFAULT_CHANNEL = "vcan0"
DEFAULT_PERIOD_MS = 100  # for a message without GenMsgCycleTime
MODEL_TICK_MS = 10  # the model is sampled on this grid; frames within a tick share one state
VIN_PARTS = 3
VIN_PART_CHARS = 7
_MAX_CONSECUTIVE_DROPS = 1000

Getter = Callable[[VehicleState], float]


def _flag(name: str) -> Getter:
    get = attrgetter(name)
    return lambda s: 1 if get(s) else 0


def vin_parts(vin: str, parts: int = VIN_PARTS, width: int = VIN_PART_CHARS) -> tuple[int, ...]:
    """The VIN as ``parts`` raw integers of ``width`` ASCII characters, big-endian, NUL padded.

    Raises ``ValueError`` if the VIN does not fit.
    """
    raw = vin.encode("ascii")
    if len(raw) > parts * width:
        raise ValueError(f"VIN of {len(raw)} characters does not fit {parts} parts of {width}")
    raw = raw.ljust(parts * width, b"\0")
    return tuple(int.from_bytes(raw[i * width : (i + 1) * width], "big") for i in range(parts))


def _vin_part(index: int) -> Getter:
    cache: dict[str, tuple[int, ...]] = {}

    def get(s: VehicleState) -> float:
        parts = cache.get(s.vin)
        if parts is None:
            parts = cache[s.vin] = vin_parts(s.vin)
        return parts[index]

    return get


# DBC signal name -> how to read it from the model (dbc/vehicle.dbc).
SIGNAL_SOURCES: dict[str, Getter] = {
    "EngineSpeed": attrgetter("engine_rpm"),
    "EngineCoolantTemp": attrgetter("coolant_temp_c"),
    "VehicleSpeed": attrgetter("speed_kmh"),
    "CurrentGear": attrgetter("gear"),
    "TractionBatterySoC": attrgetter("battery_soc_pct"),
    "TractionBatteryCurrent": attrgetter("battery_current_a"),
    "ChargingActive": _flag("charging"),
    "ChargeCableConnected": _flag("charge_cable_connected"),
    "Latitude": attrgetter("latitude_deg"),
    "Longitude": attrgetter("longitude_deg"),
    "Heading": attrgetter("heading_deg"),
    "DoorLocked_FL": _flag("door_locked_fl"),
    "DoorLocked_FR": _flag("door_locked_fr"),
    "DoorLocked_RL": _flag("door_locked_rl"),
    "DoorLocked_RR": _flag("door_locked_rr"),
    "Odometer": attrgetter("odometer_km"),
    "FuelLevel": attrgetter("fuel_level_pct"),
    "AmbientAirTemp": attrgetter("ambient_temp_c"),
    "CabinAirTemp": attrgetter("cabin_temp_c"),
    "TirePressure_FL": attrgetter("tire_pressure_fl_kpa"),
    "TirePressure_FR": attrgetter("tire_pressure_fr_kpa"),
    "TirePressure_RL": attrgetter("tire_pressure_rl_kpa"),
    "TirePressure_RR": attrgetter("tire_pressure_rr_kpa"),
    "OilLifeRemaining": attrgetter("oil_life_remaining_s"),
    **{f"VIN_Part{i}": _vin_part(i) for i in range(VIN_PARTS)},
}


def load_dbc(path: str | os.PathLike[str]) -> Database:
    """Load a vehicle description strictly, as the agent does (any format docs/vehicles.md "Vehicle
    descriptions" lists, within its budget). Raises :class:`ConfigError` naming the file if it is missing or invalid."""
    return catalogue.load_dbc([Path(path)], strict=True)


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to fill one variant (one multiplexer value) of a message."""

    fixed: dict[str, int]  # multiplexer selector values
    signals: tuple[tuple[str, Getter, float, float], ...]  # name, getter, min, max


@dataclass(slots=True)
class _Scheduled:
    message: Message
    period_ms: int
    plans: tuple[_Plan, ...]
    arbitration_id: int
    is_extended_id: bool
    is_fd: bool = False  # a CAN FD frame (DBC VFrameFormat *_CAN_FD, or more than 8 data bytes)
    next_plan: int = 0


def _plans(message: Message, unmapped_default: Callable[[Any], float]) -> tuple[_Plan, ...]:
    """One plan per multiplexer value (a single plan for a plain message)."""

    def entry(sig: Any) -> tuple[str, Getter, float, float]:
        getter = SIGNAL_SOURCES.get(sig.name)
        lo = -math.inf if sig.minimum is None else float(sig.minimum)
        hi = math.inf if sig.maximum is None else float(sig.maximum)
        if getter is None:
            value = unmapped_default(sig)
            getter = lambda _s, _v=value: _v  # noqa: E731
        return sig.name, getter, lo, hi

    selectors = [s for s in message.signals if s.is_multiplexer]
    if not selectors:
        return (_Plan({}, tuple(entry(s) for s in message.signals)),)
    if len(selectors) > 1:
        raise ConfigError(f"message {message.name}: nested multiplexing is not supported by the simulator")
    selector = selectors[0]
    mux_values = sorted({v for s in message.signals for v in (s.multiplexer_ids or ())})
    plans = []
    for value in mux_values:
        members = [
            s
            for s in message.signals
            if not s.is_multiplexer and (s.multiplexer_ids is None or value in s.multiplexer_ids)
        ]
        plans.append(_Plan({selector.name: value}, tuple(entry(s) for s in members)))
    return tuple(plans)


def _default_value(sig: Any) -> float:
    """A signal the model does not know: its initial value, else 0 clamped into its range."""
    if sig.initial is not None:
        return float(sig.initial)
    lo = sig.minimum if sig.minimum is not None else 0.0
    hi = sig.maximum if sig.maximum is not None else 0.0
    return float(min(max(0.0, lo), hi))


class CanSimulator:
    """Encode a :class:`VehicleModel` with a DBC at the DBC's cycle times.

    ``dbc_path`` defaults to the shipped ``dbc/vehicle.dbc``; ``model`` to ``VehicleModel()``.
    ``messages`` restricts the output to those message names (default: every message with at least one
    signal the model provides, or every message when ``all_messages`` is true; signals the model does
    not know are sent at their initial value). ``channel`` is set on every frame (traces use it).

    Raises :class:`ConfigError` for a missing/invalid DBC or an unknown message name.
    """

    def __init__(
        self,
        dbc_path: str | os.PathLike[str] | None = None,
        model: VehicleModel | None = None,
        *,
        messages: Iterable[str] | None = None,
        all_messages: bool = False,
        default_period_ms: int = DEFAULT_PERIOD_MS,
        channel: str | None = None,
    ) -> None:
        self.dbc_path = Path(dbc_path) if dbc_path is not None else default_dbc()
        self.database = load_dbc(self.dbc_path)
        self.model = model if model is not None else VehicleModel()
        self.channel = channel
        self.dropped = 0
        if messages is not None:
            wanted = list(messages)
            known = {m.name for m in self.database.messages}
            unknown = [n for n in wanted if n not in known]
            if unknown:
                raise ConfigError(f"DBC file {self.dbc_path}: no message named {', '.join(unknown)}")
            chosen = [self.database.get_message_by_name(n) for n in wanted]
        elif all_messages:
            chosen = list(self.database.messages)
        else:
            chosen = [m for m in self.database.messages if any(s.name in SIGNAL_SOURCES for s in m.signals)]
        chosen.sort(key=lambda m: (m.frame_id, m.is_extended_frame))
        self._schedule: list[_Scheduled] = []
        for msg in chosen:
            period = msg.cycle_time if msg.cycle_time else default_period_ms
            self._schedule.append(
                _Scheduled(
                    message=msg,
                    period_ms=int(period),
                    plans=_plans(msg, _default_value),
                    arbitration_id=msg.frame_id,
                    is_extended_id=msg.is_extended_frame,
                    is_fd=bool(msg.is_fd) or msg.length > 8,
                )
            )

    @property
    def has_fd(self) -> bool:
        """True if any message this simulator sends is a CAN FD frame."""
        return any(s.is_fd for s in self._schedule)

    @property
    def messages(self) -> list[Message]:
        """The DBC messages this simulator sends, by identifier."""
        return [s.message for s in self._schedule]

    def periods_ms(self) -> dict[str, int]:
        """Message name -> period in milliseconds."""
        return {s.message.name: s.period_ms for s in self._schedule}

    def encode(self, name: str, state: VehicleState | None = None) -> bytes:
        """Encode message ``name`` from ``state`` (default: the model's current state), next variant.

        Raises ``KeyError`` for a message this simulator does not send.
        """
        for item in self._schedule:
            if item.message.name == name:
                return self._encode(item, state if state is not None else self.model.state)
        raise KeyError(name)

    def _encode(self, item: _Scheduled, state: VehicleState) -> bytes:
        plan = item.plans[item.next_plan]
        item.next_plan = (item.next_plan + 1) % len(item.plans)
        data: dict[str, float] = dict(plan.fixed)
        for name, getter, lo, hi in plan.signals:
            v = getter(state)
            data[name] = lo if v < lo else hi if v > hi else v
        return item.message.encode(data, scaling=True, padding=False, strict=False)

    def frames(
        self, duration_s: float | None = None, *, start_time: float | None = None
    ) -> Iterator[can.Message]:
        """Yield frames in time order for ``duration_s`` simulated seconds (``None``: forever).

        The model advances with the frames in steps of ``MODEL_TICK_MS``; a frame carries the state at
        the start of its tick. Its timestamp is ``start_time`` (default: the model's current Unix time)
        plus the simulated time elapsed. Message ``i`` (by identifier) is first sent ``i`` ms after the
        start (mod its period), so frames spread over the bus like real ECUs.
        Raises ``ValueError`` for a negative duration.
        """
        if duration_s is not None and duration_s < 0:
            raise ValueError("duration must be >= 0")
        model = self.model
        base = (model.start_time + model.t) if start_time is None else float(start_time)
        end_ms = math.inf if duration_s is None else duration_s * 1000.0
        heap: list[tuple[int, int]] = [(i % item.period_ms, i) for i, item in enumerate(self._schedule)]
        heapq.heapify(heap)
        schedule = self._schedule
        channel = self.channel
        now_ms = 0
        state = model.state
        make = can.Message
        while heap:
            due_ms, i = heap[0]
            if due_ms >= end_ms:
                return
            tick_ms = due_ms - due_ms % MODEL_TICK_MS
            if tick_ms != now_ms:
                model.step((tick_ms - now_ms) / 1000.0)
                now_ms = tick_ms
                state = model.state
            item = schedule[i]
            heapq.heapreplace(heap, (due_ms + item.period_ms, i))
            payload = self._encode(item, state)
            yield make(
                timestamp=base + due_ms / 1000.0,
                arbitration_id=item.arbitration_id,
                is_extended_id=item.is_extended_id,
                data=payload,
                channel=channel,
                is_rx=False,
                is_fd=item.is_fd,
                bitrate_switch=item.is_fd,
                check=False,
            )

    def run(
        self,
        bus: can.BusABC,
        duration_s: float | None = None,
        *,
        realtime: bool = True,
        stop_event: threading.Event | None = None,
    ) -> int:
        """Send frames on ``bus`` until ``duration_s`` simulated seconds passed or ``stop_event`` is set.

        With ``realtime`` the frames leave at their period (timestamps are wall-clock time); without it
        as fast as the bus takes them. Frames the bus refuses (full queue) are counted in
        :attr:`dropped`. Returns the number of frames sent. Raises :class:`SourceError` when the bus
        refuses frames persistently (e.g. it was shut down).
        """
        sent = 0
        consecutive = 0
        start_wall = time.time()
        start_mono = time.monotonic()
        for msg in self.frames(duration_s, start_time=start_wall if realtime else None):
            if stop_event is not None and stop_event.is_set():
                break
            if realtime:
                delay = (msg.timestamp - start_wall) - (time.monotonic() - start_mono)
                if delay > 0:
                    if stop_event is not None:
                        if stop_event.wait(delay):
                            break
                    else:
                        time.sleep(delay)
            try:
                bus.send(msg)
            except can.CanOperationError as exc:
                self.dropped += 1
                consecutive += 1
                if consecutive >= _MAX_CONSECUTIVE_DROPS:
                    raise SourceError(f"CAN bus {bus.channel_info} refuses every frame: {exc}") from exc
                continue
            consecutive = 0
            sent += 1
        return sent

    def record(
        self,
        path: str | os.PathLike[str],
        duration_s: float,
        *,
        channel: str = "can0",
        start_time: float | None = None,
        realtime: bool = False,
    ) -> int:
        """Write ``duration_s`` simulated seconds of traffic to a trace file.

        A ``.log`` file is written in candump ``-L`` format (``(1700000000.000000) can0 123#DEADBEEF``),
        which ``can.LogReader``, ``canplayer`` and vgw's ``replay`` read; other suffixes go through
        ``can.Logger`` (``.asc``, ``.blf``, ``.csv`` ...). By default as fast as possible; with
        ``realtime`` paced at the frames' periods (timestamps then are wall-clock time). Returns the
        number of frames written. Raises :class:`ConfigError` if the file cannot be written.
        """
        p = Path(path)
        if realtime and start_time is None:
            start_time = time.time()
        frames = self.frames(duration_s, start_time=start_time)
        if realtime:
            frames = _paced(frames)
        count = 0
        try:
            if p.suffix.lower() == ".log":
                with p.open("w", encoding="ascii", newline="\n") as fh:
                    lines: list[str] = []
                    flush_every = 1 if realtime else 4096
                    for msg in frames:
                        ident = (
                            f"{msg.arbitration_id:08X}" if msg.is_extended_id else f"{msg.arbitration_id:03X}"
                        )
                        # candump -L: CAN FD frames as ID##<flags nibble><data> (flag 1 = bitrate switch).
                        sep = f"##{1 if msg.bitrate_switch else 0}" if msg.is_fd else "#"
                        lines.append(f"({msg.timestamp:.6f}) {channel} {ident}{sep}{msg.data.hex().upper()}\n")
                        if len(lines) >= flush_every:
                            fh.writelines(lines)
                            count += len(lines)
                            lines.clear()
                    fh.writelines(lines)
                    count += len(lines)
            else:
                logger = can.Logger(str(p))
                try:
                    for msg in frames:
                        msg.channel = channel
                        logger.on_message_received(msg)
                        count += 1
                finally:
                    logger.stop()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot write trace file {p}: {exc}") from exc
        return count


def _paced(frames: Iterator[can.Message]) -> Iterator[can.Message]:
    """Release each frame when the wall clock reaches its timestamp."""
    for msg in frames:
        delay = msg.timestamp - time.time()
        if delay > 0:
            time.sleep(delay)
        yield msg


def socketcan_available(channel: str) -> bool:
    """True if the kernel has a network interface named ``channel`` (e.g. vcan0)."""
    return os.path.exists(f"/sys/class/net/{channel}")


def open_output(interface: str, channel: str | None = None, bitrate: int | None = None, *,
                fd: bool = False, ptys: int = 1, links: tuple[str, ...] = ()) -> can.BusABC:
    """Open the simulator's output bus by name: ``virtual``, ``socketcan`` or ``slcan`` (pty).

    ``fd`` opens it for CAN FD frames (SocketCAN: the socket takes CANFD_MTU frames; the interface itself
    must be up with ``fd on``).
    For ``slcan`` the channel is ignored: a new pseudo-terminal is created; its path is the bus's
    ``path`` attribute. With ``ptys`` > 1 or ``links`` it is a group of adapters on one bus
    (:class:`~vgw_sim.slcan_pty.SlcanPtyGroup`, paths in ``paths``). Raises :class:`ConfigError`
    for an unknown interface and :class:`SourceOpenError` when the bus cannot be opened (e.g. no vcan0 in
    this kernel).
    """
    if interface not in INTERFACES:
        raise ConfigError(f"unknown simulator interface {interface!r}: choose one of {', '.join(INTERFACES)}")
    channel = channel or DEFAULT_CHANNEL
    try:
        if interface == "virtual":
            protocol = can.CanProtocol.CAN_FD if fd else can.CanProtocol.CAN_20
            return can.Bus(interface="virtual", channel=channel, receive_own_messages=False, protocol=protocol)
        if interface == "socketcan":
            if not socketcan_available(channel):
                raise SourceOpenError(
                    f"socketcan interface {channel} not found (create it: modprobe vcan; "
                    f"ip link add dev {channel} type vcan; ip link set up {channel})"
                )
            kwargs: dict[str, Any] = {"bitrate": bitrate} if bitrate else {}
            if fd:
                kwargs["fd"] = True
            return can.Bus(interface="socketcan", channel=channel, **kwargs)
        from vgw_sim.slcan_pty import SlcanPtyBus, SlcanPtyGroup

        if ptys > 1 or links:
            return SlcanPtyGroup(ptys, links)
        return SlcanPtyBus()
    except SourceOpenError:
        raise
    except (can.CanError, OSError, ImportError) as exc:
        raise SourceOpenError(f"cannot open {interface} bus {channel}: {exc}") from exc
