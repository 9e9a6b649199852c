"""The compiled decoders agree with cantools on every signal of every message of the test DBCs.

Reference: ``Message.decode(data, decode_choices=False, allow_truncated=True)``, over random payloads of the
DBC length, shorter (short frames: the signals that do not fit are reported as short, never a crash) and
longer (cantools trims the excess), multiplexed messages included (selectors set to one of their valid ids
most of the time, so the branches are exercised), for every signal and for random subsets.

DBCs: every file under ``../shared/data/dbc/cantools`` that cantools loads with ``strict=False`` (the module is
skipped when that folder is absent) and the demo vehicle's ``dbc/vehicle.dbc``.
"""

from __future__ import annotations

import os
from pathlib import Path

import cantools
import pytest
from cantools.database.can.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vgw.pipeline.decoder import MessageDecoder, decode_all
from vgw_sim.paths import default_dbc

from tests.decoderkit import check_message, dbc_messages, loadable

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DBC_DIR = SHARED / "dbc" / "cantools"

if not DBC_DIR.is_dir():
    pytest.skip(f"test DBCs not found: {DBC_DIR} (the shared data folder is absent)", allow_module_level=True)


_messages = dbc_messages


# Bounded for CI; raise it for a long run: VGW_DECODER_EXAMPLES=2000 pytest tests/test_decoder.py
EXAMPLES = int(os.environ.get("VGW_DECODER_EXAMPLES", "25"))
DBCS = [*sorted(str(p) for p in DBC_DIR.glob("*.dbc")), str(default_dbc())]
LOADABLE = loadable(DBCS)  # kept on disk: collected in every xdist worker


def test_enough_dbcs_load() -> None:
    assert len(LOADABLE) >= 30, f"only {len(LOADABLE)} of {len(DBCS)} DBCs loaded"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("dbc", LOADABLE, ids=lambda p: Path(p).name)
@given(data=st.data())
def test_compiled_decoders_agree_with_cantools(dbc: str, data: st.DataObject) -> None:
    check_message(data.draw(st.sampled_from(_messages(dbc)), label="message"), data)


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
    from vgw_sim.can_sim import CanSimulator
    from vgw_sim.vehicle import VehicleModel

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
