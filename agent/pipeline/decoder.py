"""Decoders compiled once per CAN message for just the signals consent allows.

cantools decodes every signal of a message through a generic bit-unpacker. The agent needs only the few
signals a grant covers, so for each (message, set of signals) it precomputes shift/mask/sign/scale and
decodes with two ``int.from_bytes`` calls per frame. Results agree with ``cantools`` ``decode_message(...,
decode_choices=False)`` (tested over random payloads of every message of the test DBCs, multiplexed ones
included).

Multiplexing: a signal with ``multiplexer_ids`` is decoded only when its selector (``multiplexer_signal``,
itself possibly multiplexed: cascaded) has one of those raw values in this frame.

A frame shorter than the DBC length still yields every signal whose bits lie inside the data received;
the others are counted as ``short`` by the caller and skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cantools.database.can.message import Message
from cantools.database.can.signal import Signal


@dataclass(frozen=True, slots=True)
class FieldLayout:
    """Where a signal's raw bits sit, independent of the frame's actual length."""

    name: str
    little_endian: bool
    start: int  # DBC start bit (LSB for Intel, MSB in sawtooth numbering for Motorola)
    length: int
    signed: bool
    is_float: bool
    scale: float
    offset: float
    integral: bool  # scale and offset are integers: keep the value an int, as cantools does

    @classmethod
    def of(cls, sig: Signal) -> FieldLayout:
        scale = sig.scale
        offset = sig.offset
        integral = float(scale).is_integer() and float(offset).is_integer() and not sig.is_float
        return cls(
            name=sig.name,
            little_endian=sig.byte_order == "little_endian",
            start=sig.start,
            length=sig.length,
            signed=sig.is_signed,
            is_float=sig.is_float,
            scale=int(scale) if integral else float(scale),
            offset=int(offset) if integral else float(offset),
            integral=integral,
        )

    def raw(self, data: bytes, le: int, be: int) -> int | float | None:
        """The raw value in ``data`` (``le``/``be`` are its integer readings), or None if it does not fit."""
        n_bits = len(data) * 8
        length = self.length
        if self.little_endian:
            if self.start + length > n_bits:
                return None
            value = (le >> self.start) & ((1 << length) - 1)
        else:
            byte, bit = divmod(self.start, 8)
            msb = (len(data) - 1 - byte) * 8 + bit
            lsb = msb - length + 1
            if byte >= len(data) or lsb < 0:
                return None
            value = (be >> lsb) & ((1 << length) - 1)
        if self.is_float:
            if length == 32:
                return float(struct.unpack("<f", value.to_bytes(4, "little"))[0])
            return float(struct.unpack("<d", value.to_bytes(8, "little"))[0])
        if self.signed and value >> (length - 1):
            value -= 1 << length
        return value

    def physical(self, raw: int | float) -> int | float:
        if self.integral:
            return int(raw) * self.scale + self.offset  # type: ignore[operator]
        return raw * self.scale + self.offset


@dataclass(frozen=True, slots=True)
class _Output:
    layout: FieldLayout
    # (selector layout, allowed raw ids) that must all hold, outermost first; empty if not multiplexed.
    conditions: tuple[tuple[FieldLayout, frozenset[int]], ...]
    key: object  # opaque tag returned to the caller with the value (e.g. the signal's catalogue entry)


class MessageDecoder:
    """Decodes the chosen signals of one message from raw frame data."""

    __slots__ = ("frame_id", "name", "outputs")

    def __init__(self, message: Message, wanted: Iterable[tuple[str, object]]) -> None:
        """``wanted`` is (signal name, key) pairs. Raises KeyError for a name the message lacks."""
        self.frame_id: int = message.frame_id
        self.name: str = message.name
        by_name = {s.name: s for s in message.signals}
        outputs = []
        for sig_name, key in wanted:
            sig = by_name[sig_name]
            outputs.append(_Output(FieldLayout.of(sig), _conditions(sig, by_name), key))
        self.outputs: tuple[_Output, ...] = tuple(outputs)

    def decode(self, data: bytes) -> tuple[list[tuple[object, int | float]], int]:
        """Return ([(key, physical value)], number of wanted signals that did not fit in ``data``)."""
        le = int.from_bytes(data, "little")
        be = int.from_bytes(data, "big")
        values: list[tuple[object, int | float]] = []
        short = 0
        for out in self.outputs:
            active = True
            for sel, ids in out.conditions:
                sel_raw = sel.raw(data, le, be)
                if sel_raw is None:
                    short += 1
                    active = False
                    break
                if sel_raw not in ids:
                    active = False
                    break
            if not active:
                continue
            raw = out.layout.raw(data, le, be)
            if raw is None:
                short += 1
                continue
            values.append((out.key, out.layout.physical(raw)))
        return values, short


def _conditions(sig: Signal, by_name: dict[str, Signal]) -> tuple[tuple[FieldLayout, frozenset[int]], ...]:
    chain: list[tuple[FieldLayout, frozenset[int]]] = []
    current = sig
    seen = set()
    while current.multiplexer_ids and current.multiplexer_signal:
        if current.name in seen:  # a malformed DBC could loop; cantools would reject it, be safe anyway
            break
        seen.add(current.name)
        selector = by_name[current.multiplexer_signal]
        chain.append((FieldLayout.of(selector), frozenset(current.multiplexer_ids)))
        current = selector
    chain.reverse()
    return tuple(chain)


def decode_all(message: Message, data: bytes) -> dict[str, int | float]:
    """Decode every signal of ``message`` (used by tests and the benchmark to compare with cantools)."""
    dec = MessageDecoder(message, [(s.name, s.name) for s in message.signals])
    values, _ = dec.decode(data)
    return {str(k): v for k, v in values}


def signal_names(message: Message) -> Sequence[str]:
    return [s.name for s in message.signals]
