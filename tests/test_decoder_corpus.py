"""vgw's compiled decoders agree with cantools on a public corpus of real-vehicle DBCs: comma.ai's opendbc
(about 115 files from many makes, several malformed in ways only ``strict=False`` loads).

The corpus is the opendbc source distribution on PyPI, fetched at test time (``pip download``) into a cache
folder outside the repository, never committed. Without the package registry the module is skipped with the
reason. Every DBC that cantools loads leniently is checked message by message (``tests/decoderkit.py``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import cantools
import pytest
from vgw.pipeline.decoder import MessageDecoder

from tests.decoderkit import dbc_messages, fetch_sdist_files, loadable, mismatches, random_payload

OPENDBC = "opendbc==0.3.1"
FOLDER = fetch_sdist_files(OPENDBC, lambda name: name.endswith(".dbc") and "/opendbc/dbc/" in name)
if FOLDER is None:
    pytest.skip(f"{OPENDBC} could not be downloaded from the package registry", allow_module_level=True)
DBCS = sorted(str(p) for p in FOLDER.glob("*.dbc"))


_messages = dbc_messages


LOADABLE = loadable(DBCS)  # kept on disk: collected in every xdist worker
PAYLOADS = int(os.environ.get("VGW_DECODER_PAYLOADS", "20"))  # per message; raise it for a long run


def test_the_corpus_is_there() -> None:
    assert len(LOADABLE) >= 80, f"only {len(LOADABLE)} of {len(DBCS)} opendbc files loaded"


@pytest.mark.parametrize("dbc", LOADABLE, ids=lambda p: Path(p).name)
def test_compiled_decoders_agree_with_cantools(dbc: str) -> None:
    """Every message, PAYLOADS random payloads each (seeded by the file name, so a failure repeats)."""
    rng = random.Random(Path(dbc).name)
    found: list[str] = []
    for message in _messages(dbc):
        for _ in range(PAYLOADS):
            found += mismatches(message, random_payload(rng, message))
            if len(found) >= 5:
                break
    assert not found, "\n".join(found[:5])


def test_a_signal_under_a_selector_that_is_not_a_multiplexer_is_never_decoded() -> None:
    """Volkswagen PQ's Motor_2: MO2_Getr_Code, MO2_max_Mo, MO2_CAN_Vers and MO2_Motor_Code share bits 0-5,
    listed under selector MO2_Mp_Code (SG_MUL_VAL_), which the DBC does not mark as a multiplexer. cantools
    decodes none of the four; a decoder that followed the ids would send one of them per frame."""
    [path] = [p for p in DBCS if Path(p).name == "vw_pq.dbc"]
    db = cantools.database.load_file(path, database_format="dbc", strict=False, encoding="cp1252")
    motor_2 = db.get_message_by_frame_id(0x288)
    assert not motor_2.is_multiplexed()
    decoder = MessageDecoder(motor_2, [(s.name, s.name) for s in motor_2.signals])
    for selector in range(4):
        frame = bytes([(selector << 6) | 9, 90, 0, 0, 0, 0, 0, 0])
        got = dict(decoder.decode(frame)[0])  # type: ignore[arg-type]
        assert got == motor_2.decode(frame, decode_choices=False)
        assert "MO2_Motor_Code" not in got
