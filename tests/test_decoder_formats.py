"""vgw reads every vehicle description format cantools reads (ARXML, KCD, SYM besides DBC) and decodes each as
cantools does: conformance over cantools' own test files.

The files are cantools' source distribution on PyPI (tests/files/arxml, kcd, sym), fetched at test time
(``pip download``) into a cache folder outside the repository, never committed; without the package registry
the module is skipped with the reason. Each file is loaded through vgw's loader and through
``cantools.database.load_file``, strictly and leniently: both accept it or both refuse it, and where both
accept it vgw's compiled decoders agree with cantools' ``decode_message``, message by message, on random
payloads (``tests/decoderkit.py``).
"""

from __future__ import annotations

import os
import random
from functools import cache
from pathlib import Path

import cantools
import pytest
from cantools.database.can.database import Database
from cantools.database.errors import DecodeError
from vgw.base.errors import ConfigError
from vgw.pipeline.catalogue import load_catalogue, load_dbc
from vgw.pipeline.decoder import MessageDecoder

from tests.decoderkit import decodable_messages, fetch_sdist_files, mismatches, random_payload, same

CANTOOLS = f"cantools=={cantools.__version__}"
FORMATS = (".arxml", ".kcd", ".sym")
FOLDER = fetch_sdist_files(CANTOOLS, lambda name: "/tests/files/" in name and name.endswith(FORMATS))
if FOLDER is None:
    pytest.skip(f"{CANTOOLS} could not be downloaded from the package registry", allow_module_level=True)
FILES = sorted(str(p) for p in FOLDER.iterdir() if p.suffix in FORMATS)
PAYLOADS = int(os.environ.get("VGW_DECODER_PAYLOADS", "40"))  # per message; raise it for a long run


@cache
def _reference(path: str, strict: bool) -> Database | None:
    try:
        db = cantools.database.load_file(path, strict=strict)
    except Exception:
        return None
    assert isinstance(db, Database)
    return db


@cache
def _vgw(path: str, strict: bool) -> Database | None:
    try:
        return load_dbc([Path(path)], strict=strict)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), exc
        return None


def test_the_files_are_there() -> None:
    for ext in FORMATS:
        assert sum(f.endswith(ext) for f in FILES) >= 5, f"too few {ext} files in {CANTOOLS}"
    assert sum(_reference(f, False) is not None for f in FILES) >= 30


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize("path", FILES, ids=lambda p: Path(p).name)
def test_vgw_loads_what_cantools_loads_and_decodes_it_the_same(path: str, strict: bool) -> None:
    ref, got = _reference(path, strict), _vgw(path, strict)
    assert (got is None) == (ref is None), f"cantools {'refused' if ref is None else 'loaded'} it, vgw did not"
    if ref is None or got is None:
        return
    assert [(m.name, m.frame_id) for m in got.messages] == [(m.name, m.frame_id) for m in ref.messages]
    rng = random.Random(f"{Path(path).name}-{strict}")
    found: list[str] = []
    for message in decodable_messages(got):
        reference = ref.get_message_by_name(message.name)
        decoder = MessageDecoder(message, [(n, n) for n in dict.fromkeys(s.name for s in message.signals)])
        for _ in range(PAYLOADS):
            payload = random_payload(rng, message)
            found += mismatches(message, payload)
            try:
                want = reference.decode(payload, decode_choices=False, allow_truncated=True)
            except DecodeError:
                continue
            values = dict(decoder.decode(payload)[0])
            found += [f"{message.name}.{n}: vgw {values.get(n, '-')!r}, cantools {want.get(n, '-')!r} "
                      f"(payload {payload.hex()})" for n in sorted(set(values) | set(want))  # type: ignore[arg-type]
                      if n not in values or n not in want or not same(values[n], want[n])]  # type: ignore[index]
            if len(found) >= 5:
                break
    assert not found, "\n".join(found[:5])


def _signal_map(tmp_path: Path, message: str, signal: str) -> Path:
    smap = tmp_path / "signals.toml"
    smap.write_text(f'[[signal]]\nmessage = "{message}"\nsignal = "{signal}"\npath = "Vehicle.Speed"\n'
                    'scope = "read_speedometer"\n')
    return smap


def test_an_arxml_is_recognised_by_its_content_and_maps_its_frames(tmp_path: Path) -> None:
    """AUTOSAR 4 under a neutral name: recognised by its root element; a frame's signal maps as in a DBC."""
    copy = tmp_path / "vehicle.xml"
    copy.write_bytes((FOLDER / "system-4.2.arxml").read_bytes())
    catalogue = load_catalogue([copy], _signal_map(tmp_path, "Message1", "message1_SeqCounter"))
    [spec] = catalogue.specs
    assert catalogue.messages[spec.frame_id].name == "Message1"


def test_a_pdu_carried_only_inside_a_container_is_refused_by_name(tmp_path: Path) -> None:
    """AUTOSAR container PDUs are not unpacked: mapping a contained PDU says so, naming the container."""
    arxml = FOLDER / "system-4.2.arxml"
    smap = _signal_map(tmp_path, "message2", "signal3")
    with pytest.raises(ConfigError, match=r"signal #1 \(message2\.signal3\): message 'message2' is carried only "
                                          r"inside the container PDU 'OneToContainThemAll'; container PDUs are not"):
        load_catalogue([arxml], smap)


def test_two_messages_of_one_frame_id_on_two_buses_cannot_both_be_mapped(tmp_path: Path) -> None:
    """A KCD (or ARXML) describes several buses, and ids repeat across them (the_homer.kcd: SteeringInfo on
    Motor and DriverSeat on Comfort are both 0x55B). vgw reads one bus: mapping both is refused by name, and
    mapping one decodes that one's frames."""
    homer = FOLDER / "the_homer.kcd"
    smap = tmp_path / "signals.toml"
    smap.write_text('[[signal]]\nmessage = "SteeringInfo"\nsignal = "WheelAngle"\npath = "Vehicle.Speed"\n'
                    'scope = "read_speedometer"\n\n[[signal]]\nmessage = "DriverSeat"\nsignal = "Backrest"\n'
                    'path = "Vehicle.Cabin.Seat"\nscope = "read_climate"\n')
    with pytest.raises(ConfigError, match=r"messages 'SteeringInfo' and 'DriverSeat' have the same frame id 0x55B"):
        load_catalogue([homer], smap)
    catalogue = load_catalogue([homer], _signal_map(tmp_path, "SteeringInfo", "WheelAngle"))
    assert catalogue.messages[0x55B].name == "SteeringInfo"
