"""The compiled decoders agree with cantools on every signal of every message of the test DBCs.

Reference: ``Message.decode(data, decode_choices=False, allow_truncated=True)``, over random payloads of the
DBC length, shorter (short frames: the signals that do not fit are reported as short, never a crash) and
longer (cantools trims the excess), multiplexed messages included (selectors set to one of their valid ids
most of the time, so the branches are exercised), for every signal and for random subsets.

DBCs: every file under ``../shared/data/dbc/cantools`` that cantools loads with ``strict=False`` (the module is
skipped when that folder is absent) and the demo vehicle's ``dbc/vehicle.dbc``.
"""

from __future__ import annotations

import math
import os
from functools import cache
from pathlib import Path
from typing import Any

import cantools
import pytest
from cantools.database.can.message import Message
from cantools.database.errors import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vgw.pipeline.decoder import FieldLayout, MessageDecoder, decode_all
from vgw.simulators.paths import default_dbc

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DBC_DIR = SHARED / "dbc" / "cantools"

if not DBC_DIR.is_dir():
    pytest.skip(f"test DBCs not found: {DBC_DIR} (the shared data folder is absent)", allow_module_level=True)


@cache
def _messages(path: str) -> tuple[Message, ...]:
    """The decodable messages of one DBC (none if cantools cannot load it)."""
    try:
        db = cantools.database.load_file(path, database_format="dbc", strict=False, encoding="cp1252")
    except Exception:
        return ()
    out = []
    for m in getattr(db, "messages", ()):
        if m.is_container or not m.signals or m.length <= 0:
            continue
        try:
            m.decode(bytes(m.length), decode_choices=False, allow_truncated=True)
        except DecodeError:
            pass  # a zero payload may select an unknown mux id; that is fine
        except Exception:  # noqa: S112
            continue  # cantools cannot decode this message at all: nothing to compare with
        out.append(m)
    return tuple(out)


# Bounded for CI; raise it for a long run: VGW_DECODER_EXAMPLES=2000 pytest tests/test_decoder.py
EXAMPLES = int(os.environ.get("VGW_DECODER_EXAMPLES", "25"))
DBCS = [*sorted(str(p) for p in DBC_DIR.glob("*.dbc")), str(default_dbc())]
LOADABLE = [p for p in DBCS if _messages(p)]


def test_enough_dbcs_load() -> None:
    assert len(LOADABLE) >= 30, f"only {len(LOADABLE)} of {len(DBCS)} DBCs loaded"


def _set_field(data: bytearray, layout: FieldLayout, value: int) -> None:
    """Write raw ``value`` into ``layout``'s bits of ``data`` (if it fits)."""
    lsb = layout.lsb(len(data))
    if lsb is None:
        return
    mask = ((1 << layout.length) - 1) << lsb
    value &= (1 << layout.length) - 1
    if layout.little_endian:
        n = int.from_bytes(data, "little")
        data[:] = ((n & ~mask) | (value << lsb)).to_bytes(len(data), "little")
    else:
        n = int.from_bytes(data, "big")
        data[:] = ((n & ~mask) | (value << lsb)).to_bytes(len(data), "big")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _payload(draw: st.DrawFn, message: Message) -> bytes:
    data = bytearray(draw(st.binary(min_size=message.length, max_size=message.length)))
    if draw(st.integers(0, 9)) < 8:
        # Steer every selector (outermost first) to one of its ids, so multiplexed branches are decoded.
        by_name = {s.name: s for s in message.signals}
        for sig in message.signals:
            if sig.is_multiplexer:
                ids = sorted({i for s in message.signals if s.multiplexer_signal == sig.name
                              for i in (s.multiplexer_ids or ())})
                if ids:
                    _set_field(data, FieldLayout.of(by_name[sig.name]), draw(st.sampled_from(ids)))
    size = draw(st.sampled_from(["dbc", "dbc", "dbc", "short", "long"]))
    if size == "short":
        return bytes(data[: draw(st.integers(0, max(message.length - 1, 0)))])
    if size == "long":
        return bytes(data) + bytes(draw(st.integers(1, 3)))
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("dbc", LOADABLE, ids=lambda p: Path(p).name)
@given(data=st.data())
def test_compiled_decoders_agree_with_cantools(dbc: str, data: st.DataObject) -> None:
    messages = _messages(dbc)
    message = data.draw(st.sampled_from(messages), label="message")
    payload = data.draw(st.composite(lambda d: _payload(d, message))(), label="payload")
    names = [s.name for s in message.signals]
    subset = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)), label="subset")
    try:
        expected = message.decode(payload, decode_choices=False, allow_truncated=True)
    except DecodeError:
        expected = None  # e.g. a selector value the DBC does not list: cantools refuses the frame
    for wanted in (names, subset):
        decoder = MessageDecoder(message, [(n, n) for n in wanted])
        values, short = decoder.decode(payload)
        got = dict(values)  # type: ignore[arg-type]
        assert len(got) == len(values), "a signal was reported twice"
        assert short >= 0
        if expected is None:
            continue  # no reference; decoding it must simply not crash
        want = {n: v for n, v in expected.items() if n in set(wanted)}
        assert set(got) == set(want), f"{message.name}: signals {sorted(set(got) ^ set(want))} differ"
        for n in want:
            assert _same(got[n], want[n]), f"{message.name}.{n}: {got[n]!r} != cantools {want[n]!r}"
        # The generated fast path and the generic path agree too.
        g_values, g_short = decoder.decode_generic(payload)
        assert dict(g_values) == got or all(_same(dict(g_values)[k], got[k]) for k in got)  # type: ignore[arg-type]
        assert g_short == short


def _demo_messages() -> dict[str, Message]:
    return {m.name: m for m in _messages(str(default_dbc()))}


def test_short_frame_reports_short_signals() -> None:
    m = _demo_messages()["EngineStatus"]
    dec = MessageDecoder(m, [(s.name, s.name) for s in m.signals])
    for n in range(m.length):
        values, short = dec.decode(bytes(range(1, n + 1)))
        assert len(values) + short == len(m.signals)
    assert dec.decode(b"")[0] == [] and dec.decode(b"")[1] == len(m.signals)


def test_short_multiplexed_frame_never_crashes() -> None:
    m = _demo_messages()["VehicleIdentification"]
    dec = MessageDecoder(m, [(s.name, s.name) for s in m.signals if not s.is_multiplexer])
    values, short = dec.decode(b"")  # no selector: every multiplexed signal is short
    assert values == [] and short == len(dec.outputs)
    values, short = dec.decode(bytes([1, 0x41, 0x42]))  # selector 1, part 1 cut off
    assert values == [] and short == 1


def test_decode_all_matches_cantools_on_demo_frames() -> None:
    from vgw.simulators.can_sim import CanSimulator
    from vgw.simulators.vehicle import VehicleModel

    sim = CanSimulator(default_dbc(), VehicleModel(seed=3))
    db = cantools.database.load_file(str(default_dbc()))
    for i, frame in enumerate(sim.frames(5.0)):
        message = db.get_message_by_frame_id(frame.arbitration_id)
        expected = message.decode(bytes(frame.data), decode_choices=False)
        assert decode_all(message, bytes(frame.data)) == expected, (i, message.name)


def test_unknown_signal_name_raises_key_error() -> None:
    m = _demo_messages()["EngineStatus"]
    with pytest.raises(KeyError):
        MessageDecoder(m, [("NoSuchSignal", None)])
