"""vgw's compiled decoders agree with cantools on a public corpus of real-vehicle DBCs: comma.ai's opendbc
(about 115 files from many makes, several malformed in ways only ``strict=False`` loads).

The corpus is the opendbc source distribution on PyPI, fetched at test time (``pip download``) into a cache
folder outside the repository, never committed. Without the package registry the module is skipped with the
reason. Every DBC that cantools loads leniently is checked message by message (``tests/decoderkit.py``).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import cantools
import pytest
from vgw.pipeline.decoder import MessageDecoder

from tests.decoderkit import dbc_messages, mismatches, random_payload

OPENDBC = "opendbc==0.3.1"
CACHE = Path(os.environ.get("VGW_TEST_CORPUS", Path(tempfile.gettempdir()) / "vgw-test-corpus"))


def _fetch() -> Path | None:
    """The folder of opendbc's DBC files, downloaded once per machine (atomic rename: parallel workers)."""
    target = CACHE / OPENDBC.replace("==", "-")
    if (target / "done").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              OPENDBC, "-d", work], capture_output=True, timeout=180)
        sdists = list(Path(work).glob("*.tar.gz"))
        if got.returncode != 0 or not sdists:
            return None
        staged = Path(work) / "dbc"
        staged.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".dbc") and "/opendbc/dbc/" in member.name:
                    source = tar.extractfile(member)
                    assert source is not None
                    (staged / Path(member.name).name).write_bytes(source.read())
        (staged / "done").write_text("")
        try:
            staged.rename(target)
        except OSError:
            pass  # another worker got there first
    return target if (target / "done").exists() else None


FOLDER = _fetch()
if FOLDER is None:
    pytest.skip(f"{OPENDBC} could not be downloaded from the package registry", allow_module_level=True)
DBCS = sorted(str(p) for p in FOLDER.glob("*.dbc"))


_messages = dbc_messages


LOADABLE = [p for p in DBCS if _messages(p)]
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
