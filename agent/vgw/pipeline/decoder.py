"""Decoders compiled once per CAN message for just the signals consent allows.

cantools decodes every signal of a message through a generic bit-unpacker. The agent needs only the few
signals a grant covers, so for each (message, set of signals) it generates one small Python function, once,
with every shift, mask, sign test and scale written in as constants: a frame of the DBC length costs at
most two ``int.from_bytes`` calls plus a few integer operations per wanted signal. Frames of another length
(short, or longer than the DBC says) take a generic path that checks each signal's bits against the data
actually received. Results agree with ``cantools`` ``decode_message(...,
decode_choices=False)`` (tested over random payloads of every message of the test DBCs, multiplexed ones
included).

Multiplexing: a signal with ``multiplexer_ids`` is decoded only when its selector (``multiplexer_signal``,
itself possibly multiplexed: cascaded) has one of those raw values in this frame.

A frame shorter than the DBC length still yields every signal whose bits lie inside the data received;
the others are counted as ``short`` by the caller and skipped.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cantools.database.can.message import Message
from cantools.database.can.signal import Signal
from cantools.database.conversion import IdentityConversion

_F32 = struct.Struct("<f").unpack
_F64 = struct.Struct("<d").unpack


@dataclass(frozen=True, slots=True)
class FieldLayout:
    """Where a signal's raw bits sit, independent of the frame's actual length, and how to scale them."""

    name: str
    little_endian: bool
    start: int  # DBC start bit (LSB for Intel, MSB in sawtooth numbering for Motorola)
    length: int
    signed: bool
    is_float: bool
    scale: int | float
    offset: int | float
    identity: bool  # cantools' IdentityConversion: the raw value is the value (no arithmetic at all)

    @classmethod
    def of(cls, sig: Signal) -> FieldLayout:
        conv = sig.conversion
        # Scale exactly as cantools' conversion does (raw * scale + offset with its own int/float
        # objects), so even 64-bit raw values round the same way.
        return cls(
            name=sig.name,
            little_endian=sig.byte_order == "little_endian",
            start=sig.start,
            length=sig.length,
            signed=sig.is_signed,
            is_float=sig.is_float,
            scale=conv.scale,
            offset=conv.offset,
            identity=isinstance(conv, IdentityConversion),
        )

    def lsb(self, n_bytes: int) -> int | None:
        """Bit position of the field's LSB in the integer reading of ``n_bytes`` of data (little-endian
        reading for Intel, big-endian for Motorola), or None if the field does not fit in them."""
        if self.little_endian:
            return self.start if self.start + self.length <= n_bytes * 8 else None
        byte, bit = divmod(self.start, 8)
        lsb = (n_bytes - 1 - byte) * 8 + bit - self.length + 1
        return lsb if byte < n_bytes and lsb >= 0 else None

    def raw(self, data: bytes, le: int, be: int) -> int | float | None:
        """The raw value in ``data`` (``le``/``be`` are its integer readings), or None if it does not fit."""
        lsb = self.lsb(len(data))
        if lsb is None:
            return None
        length = self.length
        value = ((le if self.little_endian else be) >> lsb) & ((1 << length) - 1)
        if self.is_float:
            if length == 32:
                return float(_F32(value.to_bytes(4, "little"))[0])
            return float(_F64(value.to_bytes(8, "little"))[0])
        if self.signed and value >> (length - 1):
            value -= 1 << length
        return value

    def physical(self, raw: int | float) -> int | float:
        if self.identity:
            return raw
        return raw * self.scale + self.offset

    def expr(self, lsb: int, reading: str) -> str:
        """Python source of the raw value at ``lsb`` of ``reading`` ("le"/"be"), for the generated decoder."""
        mask = (1 << self.length) - 1
        src = f"({reading} >> {lsb}) & {mask:#x}" if lsb else f"{reading} & {mask:#x}"
        if self.is_float:
            return f"_F{self.length}(({src}).to_bytes({self.length // 8}, 'little'))[0]"
        if self.signed:
            # Two's complement without a branch: subtract 2**length when the sign bit is set.
            return f"(_r := {src}) - ((_r >> {self.length - 1}) << {self.length})"
        return src


@dataclass(frozen=True, slots=True)
class _Output:
    layout: FieldLayout
    # (selector layout, allowed raw ids) that must all hold, outermost first; empty if not multiplexed.
    conditions: tuple[tuple[FieldLayout, frozenset[int]], ...]
    key: object  # opaque tag returned to the caller with the value (e.g. the signal's catalogue entry)


DecodeFn = Callable[[bytes], tuple[list[tuple[object, int | float]], int]]


class MessageDecoder:
    """Decodes the chosen signals of one message from raw frame data."""

    __slots__ = ("decode", "frame_id", "length", "name", "outputs", "source")

    def __init__(self, message: Message, wanted: Iterable[tuple[str, object]]) -> None:
        """``wanted`` is (signal name, key) pairs. Raises KeyError for a name the message lacks."""
        self.frame_id: int = message.frame_id
        self.name: str = message.name
        self.length: int = message.length
        by_name = {s.name: s for s in message.signals}
        outputs = []
        for sig_name, key in wanted:
            if sig_name not in by_name:
                raise KeyError(sig_name)
            # One name may stand for several signals, one per multiplexer branch (a KCD or ARXML description
            # may repeat a name in several branches): cantools returns whichever branch the frame carries.
            same_name = [_Output(FieldLayout.of(sig), cond, key) for sig in message.signals
                         if sig.name == sig_name and (cond := _conditions(sig, by_name)) is not None]
            if not all(_exclusive(a, b) for a, b in itertools.combinations(same_name, 2)):
                same_name = same_name[-1:]  # cantools' result is a dict by name: the last one decoded wins
            # A signal cantools never decodes is left out (value-exact against cantools).
            outputs += same_name
        self.outputs: tuple[_Output, ...] = tuple(outputs)
        self.source, fast = _compile(self.outputs, self.length, self.decode_generic)
        #: ``decode(data) -> ([(key, physical value)], number of wanted signals that did not fit in data)``
        self.decode: DecodeFn = fast

    def decode_generic(self, data: bytes) -> tuple[list[tuple[object, int | float]], int]:
        """Any frame length: each signal is checked against the bytes actually received."""
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


@dataclass(frozen=True, slots=True)
class _Plan:
    """Generated source for frames of one length: selector lines, then per output (guards, value)."""

    env: dict[str, Any]
    selectors: list[str]  # lines computing the multiplexer selectors, in order
    values: list[tuple[list[str], str]]  # per output: guard expressions (all must hold), value expression
    head: list[str]  # the integer readings of ``data`` the fields need


def _plan(outputs: tuple[_Output, ...], length: int) -> _Plan | None:
    """Every field's expression for frames of exactly ``length`` bytes, or None if one cannot fit in them
    (a lenient DBC: such a message takes the generic path only)."""
    env: dict[str, Any] = {"_F32": _F32, "_F64": _F64}
    selector_lines: list[str] = []
    readings: set[str] = set()
    selectors: dict[FieldLayout, str] = {}

    def raw_expr(layout: FieldLayout) -> str | None:
        lsb = layout.lsb(length)
        if lsb is None:
            return None
        reading = "le" if layout.little_endian else "be"
        readings.add(reading)
        return layout.expr(lsb, reading)

    values: list[tuple[list[str], str]] = []
    for i, out in enumerate(outputs):
        env[f"K{i}"] = out.key
        guards = []
        for sel, ids in out.conditions:
            var = selectors.get(sel)
            if var is None:
                src = raw_expr(sel)
                if src is None:
                    return None
                var = selectors[sel] = f"s{len(selectors)}"
                selector_lines.append(f"{var} = {src}")
            if len(ids) == 1:
                guards.append(f"{var} == {next(iter(ids))}")
            else:
                env[f"I{i}_{len(guards)}"] = ids
                guards.append(f"{var} in I{i}_{len(guards)}")
        src = raw_expr(out.layout)
        if src is None:
            return None
        if out.layout.identity:
            value = src
        else:
            env[f"A{i}"], env[f"B{i}"] = out.layout.scale, out.layout.offset
            value = _scaled(src, out.layout.scale, out.layout.offset, f"A{i}", f"B{i}")
        values.append((guards, value))
    head = []
    if "le" in readings:
        head.append("le = _from(data, 'little')")
    if "be" in readings:
        head.append("be = _from(data, 'big')")
    return _Plan(env, selector_lines, values, head)


def _compile(outputs: tuple[_Output, ...], length: int, generic: DecodeFn) -> tuple[str, DecodeFn]:
    """Generate ``decode`` for frames of exactly ``length`` bytes; other lengths go to ``generic``.

    Every position is resolved now: a field that cannot fit in ``length`` bytes (a lenient DBC) sends
    every frame to the generic path, which reports it as short.
    """
    plan = _plan(outputs, length)
    if plan is None:
        return "# generic path only: a signal does not fit in the DBC length", generic
    env = plan.env
    env["_generic"] = generic
    head = ["def decode(data, _len=len, _from=int.from_bytes):",
            f"    if _len(data) != {length}:",
            "        return _generic(data)",
            *(f"    {line}" for line in plan.head)]
    if not plan.selectors:
        # No multiplexing: one list display, evaluated in order.
        body = [f"    return [{', '.join(f'(K{i}, {value})' for i, (_, value) in enumerate(plan.values))}], 0"]
    else:
        body = ["    out = []", "    append = out.append", *(f"    {line}" for line in plan.selectors)]
        for i, (guards, value) in enumerate(plan.values):
            if guards:
                body.append(f"    if {' and '.join(guards)}:")
                body.append(f"        append((K{i}, {value}))")
            else:
                body.append(f"    append((K{i}, {value}))")
        body.append("    return out, 0")
    source = "\n".join([*head, *body, ""])
    exec(compile(source, f"<vgw decoder {length} B>", "exec"), env)  # noqa: S102 - our own generated code
    return source, env["decode"]


def compile_sink(decoder: MessageDecoder, sinks: list[list[str]], epilogue: list[str], env: dict[str, Any], *,
                 setup: Sequence[str] = ()) -> Callable[[bytes, float], bool] | None:
    """A function ``write(data, t) -> bool`` that decodes a frame of the DBC length, runs ``setup``, then for
    each output i whose multiplexer guards hold ``sinks[i]`` (Python lines using ``v``, the physical value, and
    ``t``), then ``epilogue``; it returns False, doing nothing, for a frame of another length (the caller
    then takes :attr:`MessageDecoder.decode`). None if the message has no fixed-length path."""
    plan = _plan(decoder.outputs, decoder.length)
    if plan is None:
        return None
    genv = {**plan.env, **env}
    lines = ["def write(data, t, _len=len, _from=int.from_bytes):",
             f"    if _len(data) != {decoder.length}:",
             "        return False",
             *(f"    {line}" for line in plan.head),
             *(f"    {line}" for line in plan.selectors),
             *(f"    {line}" for line in setup)]
    for (guards, value), sink in zip(plan.values, sinks, strict=True):
        indent = "    "
        if guards:
            lines.append(f"    if {' and '.join(guards)}:")
            indent = "        "
        lines.append(f"{indent}v = {value}")
        lines.extend(f"{indent}{line}" for line in sink)
    lines.extend(f"    {line}" for line in epilogue)
    lines.append("    return True")
    source = "\n".join([*lines, ""])
    exec(compile(source, f"<vgw column writer {decoder.name}>", "exec"), genv)  # noqa: S102 - generated by us
    return genv["write"]  # type: ignore[no-any-return]


def _scaled(src: str, scale: int | float, offset: int | float, scale_name: str, offset_name: str) -> str:
    """``raw * scale + offset`` as cantools computes it: exact literals where ``repr`` round-trips (finite
    int/float), else the named constants."""
    def lit(v: int | float, name: str) -> str:
        return repr(v) if type(v) is int or (type(v) is float and math.isfinite(v)) else name

    expr = f"({src})" if type(scale) is int and scale == 1 else f"({src}) * {lit(scale, scale_name)}"
    if type(offset) is int and offset == 0:
        return expr
    return f"{expr} + {lit(offset, offset_name)}"


def _exclusive(a: _Output, b: _Output) -> bool:
    """Whether no frame can satisfy the multiplexer conditions of both ``a`` and ``b``: on the path they share
    from the outermost selector, one selector requires disjoint ids of them."""
    for (sel_a, ids_a), (sel_b, ids_b) in zip(a.conditions, b.conditions, strict=False):
        if sel_a != sel_b:
            return False
        if not ids_a & ids_b:
            return True
    return False


def _conditions(sig: Signal, by_name: dict[str, Signal]) -> tuple[tuple[FieldLayout, frozenset[int]], ...] | None:
    """The multiplexer conditions of ``sig``, outermost first (empty if it is not multiplexed), or None when
    cantools' ``decode_message`` never returns it: a multiplexed signal is reached only through selectors the
    description marks as multiplexers (``M``/``mXM``), each listing the signal's ids.

    A lenient DBC may list ids under a selector that is not marked as one (Volkswagen PQ's ``Motor_2``: four
    signals at bit 0 with ids of ``MO2_Mp_Code``, which has no ``M``): cantools decodes none of them."""
    chain: list[tuple[FieldLayout, frozenset[int]]] = []
    current, seen = sig, set()
    while current.multiplexer_signal is not None:
        if current.name in seen:  # a malformed description could loop
            return None
        seen.add(current.name)
        selector = by_name.get(current.multiplexer_signal)
        if selector is None or not selector.is_multiplexer or not current.multiplexer_ids:
            return None
        chain.append((FieldLayout.of(selector), frozenset(current.multiplexer_ids)))
        current = selector
    chain.reverse()
    return tuple(chain)


def decode_all(message: Message, data: bytes) -> dict[str, int | float]:
    """Decode every signal of ``message`` (used by tests and the benchmark to compare with cantools)."""
    dec = MessageDecoder(message, [(s.name, s.name) for s in message.signals])
    values, _ = dec.decode(data)
    return {str(k): v for k, v in values}
