"""`[can] dbc` takes every vehicle description cantools reads (docs/vehicles.md, "Vehicle descriptions"): DBC,
ARXML, KCD, SYM, by extension or by content, within the same budget as a DBC, with no DTD in an XML description,
and one-line errors naming the file. (Conformance with cantools over its own test files:
tests/test_decoder_formats.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import can
import cantools
import pytest
from vgw.base.errors import ConfigError
from vgw.cli import main
from vgw.config.settings import load_config
from vgw.pipeline.catalogue import MAX_DBC_BYTES, MAX_DBC_MESSAGES, MAX_DBC_WORDS, load_catalogue, load_dbc
from vgw_sim.broker import Mosquitto, free_port
from vgw_sim.can_sim import CanSimulator
from vgw_sim.can_sim import load_dbc as sim_load_dbc
from vgw_sim.cloud import CloudPeer, SigningKey
from vgw_sim.paths import dbc_dir, default_dbc, default_signal_map
from vgw_sim.pki import TestPKI
from vgw_sim.vehicle import VehicleModel

from tests.agentkit import Authority, agent_process, vgw, write_config
from tests.test_bad_input import _peak_mb
from tests.test_provision import install_signed_cert, provision

DEMO = cantools.database.load_file(str(default_dbc()))
assert isinstance(DEMO, cantools.database.can.Database)


def _as(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["demo.kcd", "demo.sym", "demo.KCD", "demo.xml", "demo-sym.txt", "demo"])
def test_the_demo_vehicle_in_another_format_gives_the_same_catalogue(tmp_path: Path, name: str) -> None:
    """By extension (any case), or by content where the extension says nothing: the demo car converted to KCD
    or SYM by cantools maps every signal of the demo signal map, to the same messages and frame ids."""
    text = DEMO.as_sym_string() if "sym" in name.lower() else DEMO.as_kcd_string()
    path = _as(tmp_path, name, text)
    expected = load_catalogue([default_dbc()], default_signal_map())
    got = load_catalogue([path], default_signal_map())
    assert got.specs == expected.specs
    assert {f: m.name for f, m in got.messages.items()} == {f: m.name for f, m in expected.messages.items()}


def test_descriptions_of_several_formats_load_together(tmp_path: Path) -> None:
    """One vehicle, two buses described in two formats: each message is found in its own file."""
    half = len(DEMO.messages) // 2
    kcd_db = cantools.database.can.Database(messages=DEMO.messages[:half])
    sym_db = cantools.database.can.Database(messages=DEMO.messages[half:])
    files = [_as(tmp_path, "a.kcd", kcd_db.as_kcd_string()), _as(tmp_path, "b.sym", sym_db.as_sym_string())]
    db = load_dbc(files)
    assert sorted(m.name for m in db.messages) == sorted(m.name for m in DEMO.messages)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE NetworkDefinition [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
]>
<NetworkDefinition xmlns="http://kayak.2codeornot2code.org/1.0"><Document name="&c;"/></NetworkDefinition>
"""
EXTERNAL = """<?xml version="1.0"?>
<!DOCTYPE AUTOSAR [<!ENTITY leak SYSTEM "file:///etc/hostname">]>
<AUTOSAR xmlns="http://autosar.org/schema/r4.0"><AR-PACKAGES>&leak;</AR-PACKAGES></AUTOSAR>
"""
DTD_ONLY = """<?xml version="1.0"?>
<!DOCTYPE NetworkDefinition SYSTEM "http://example.com/kcd.dtd">
<NetworkDefinition xmlns="http://kayak.2codeornot2code.org/1.0"/>
"""


@pytest.mark.parametrize(("name", "text"), [("laughs.kcd", BILLION_LAUGHS), ("leak.arxml", EXTERNAL),
                                            ("dtd.kcd", DTD_ONLY), ("laughs.xml", BILLION_LAUGHS)])
def test_an_xml_description_with_a_dtd_is_refused_before_cantools_parses_it(tmp_path: Path, name: str,
                                                                            text: str) -> None:
    """Entity expansion and external entities need a DTD; a vehicle description needs none. The refusal is one
    line naming the file, and nothing of the entities is expanded or read."""
    path = _as(tmp_path, name, text)
    with pytest.raises(ConfigError) as err:
        load_dbc([path], strict=False)
    assert str(err.value).startswith(f"{path}: ") and "DOCTYPE" in str(err.value)
    assert "\n" not in str(err.value)


def test_an_xml_description_beyond_the_word_budget_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """Elements and attributes are counted by a streaming scan that keeps nothing: a KCD of more than the
    budget's words is refused at the cost of a few MB, not what ElementTree and cantools would build."""
    path = _as(tmp_path, "big.kcd", '<NetworkDefinition xmlns="http://kayak.2codeornot2code.org/1.0">'
               + "<Notes/>" * (MAX_DBC_WORDS + 1) + "</NetworkDefinition>")
    err: list[ConfigError] = []

    def load() -> None:
        try:
            load_dbc([path])
        except ConfigError as exc:
            err.append(exc)

    peak = _peak_mb(load)
    assert err and str(err[0]).startswith(f"{path}: ") and f"more than the {MAX_DBC_WORDS} allowed" in str(err[0])
    assert peak < 3 * path.stat().st_size / 1e6 + 5, f"{peak:.0f} MB to refuse a {path.stat().st_size} B KCD"


def test_messages_of_every_format_count_against_one_budget(tmp_path: Path) -> None:
    """KCD messages are counted once parsed, together with the DBC files' pre-scanned ones."""
    def kcd(name: str, first: int) -> str:
        return cantools.database.can.Database(messages=[
            cantools.database.can.Message(frame_id=i, name=f"{name}{i}", length=1, signals=[], is_extended_frame=True)
            for i in range(first, first + MAX_DBC_MESSAGES // 2 + 1)]).as_kcd_string()

    a, b = _as(tmp_path, "a.kcd", kcd("M", 1)), _as(tmp_path, "b.kcd", kcd("N", 100_000))
    load_dbc([a])
    with pytest.raises(ConfigError, match=rf"b\.kcd: .*messages, more than the {MAX_DBC_MESSAGES} allowed"):
        load_dbc([a, b])


def test_an_arxml_over_the_byte_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "huge.arxml"
    with big.open("wb") as fh:
        fh.truncate(MAX_DBC_BYTES + 1)  # sparse
    with pytest.raises(ConfigError, match=rf"huge\.arxml: ARXML file is {MAX_DBC_BYTES + 1} bytes, more than the"):
        load_dbc([big])


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("broken.kcd", "<NetworkDefinition><Bus>", "KCD rejected: "),
    ("broken.arxml", "<AUTOSAR", "not well-formed XML"),
    ("other.xml", "<html><body/></html>", "XML root element 'html' is neither AUTOSAR (ARXML) nor"),
    ("diag.cdd", "<DIAGNOSTIC/>", "a .cdd file is a diagnostics database, not a CAN description"),
    ("bad.sym", "FormatVersion=6.0\n{SEND}\n[X]\nID=zz\n", "SYM rejected: "),
    ("missing.kcd", None, "KCD file not found"),
])
def test_a_bad_description_gives_one_line_naming_the_file(tmp_path: Path, name: str, text: str | None,
                                                          needle: str) -> None:
    path = _as(tmp_path, name, text) if text is not None else tmp_path / name
    with pytest.raises(ConfigError) as err:
        load_dbc([path])
    assert str(err.value).startswith(f"{path}: ") and needle in str(err.value), err.value
    assert "\n" not in str(err.value)


def test_a_kcd_signal_outside_its_message_needs_dbc_strict_false(tmp_path: Path) -> None:
    """``dbc_strict = false`` is ``cantools --no-strict`` for every format: a signal that does not fit its
    message is refused strictly, with the hint, and loaded leniently."""
    text = ('<NetworkDefinition xmlns="http://kayak.2codeornot2code.org/1.0"><Bus name="B">'
            '<Message id="0x10" name="M" length="1"><Signal name="S" offset="4" length="8"/></Message>'
            "</Bus></NetworkDefinition>")
    path = _as(tmp_path, "lenient.kcd", text)
    with pytest.raises(ConfigError, match=r"lenient\.kcd: KCD rejected: .*set dbc_strict = false"):
        load_dbc([path])
    assert load_dbc([path], strict=False).get_message_by_name("M").get_signal_by_name("S").length == 8


def test_the_simulator_reads_a_kcd_too(tmp_path: Path) -> None:
    """`vgw sim can --dbc` loads through the agent's loader: the same formats, budget and errors."""
    path = _as(tmp_path, "demo.kcd", DEMO.as_kcd_string())
    assert sorted(m.name for m in sim_load_dbc(path).messages) == sorted(m.name for m in DEMO.messages)
    with pytest.raises(ConfigError, match=r"laughs\.kcd: .*DOCTYPE"):
        sim_load_dbc(_as(tmp_path, "laughs.kcd", BILLION_LAUGHS))


def replay_through_agent(tmp_path: Path, pki: TestPKI, broker: Mosquitto, cloud: CloudPeer, description: Path,
                         signal_map: Path, trace: Path, scopes: list[str]) -> None:
    """`vgw run` replays ``trace`` to its end with ``description`` and ``signal_map``, consent for ``scopes``
    applied beforehand; the granted paths arrive at the cloud with exactly the values cantools'
    ``decode_message`` reads from the trace's frames through ``description`` (``load_file``), in order."""
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, device="dev-fmt", can={
        "dbc": [str(description)], "signal_map": str(signal_map), "replay": str(trace), "replay_rate": 0,
        "replay_exit": True})
    doc = tmp_path / "consent.jws"
    doc.write_text(auth.doc("dev-fmt", {"g-fmt": scopes}, ver=1))
    assert vgw("consent", "apply", "--config", str(cfg), str(doc)).returncode == 0
    cloud.add_recipient("g-fmt", auth.recipient("g-fmt"))
    with agent_process(cfg) as proc:
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""

    reference = cantools.database.load_file(str(description))
    assert isinstance(reference, cantools.database.can.Database)
    specs = [s for s in load_catalogue([description], signal_map).specs if s.scope in scopes]
    assert specs and all(s.part is None for s in specs)
    expected: dict[str, list[object]] = {}
    for frame in can.LogReader(str(trace)):
        for spec in (s for s in specs if s.frame_id == frame.arbitration_id):
            values = reference.get_message_by_name(spec.message).decode(bytes(frame.data), decode_choices=False)
            if spec.signal in values:
                expected.setdefault(spec.path, []).append(values[spec.signal])
    got: dict[str, list[object]] = {}
    for s in sorted(cloud.samples("dev-fmt", "g-fmt"), key=lambda s: (s.seq, s.t)):
        got.setdefault(s.path, []).append(s.value)
    assert set(expected) == {s.path for s in specs}
    assert got == expected


def test_the_agent_decodes_and_sends_a_kcd_vehicle_as_cantools_decodes_it(tmp_path: Path, pki: TestPKI,
                                                                          broker: Mosquitto, cloud: CloudPeer) -> None:
    """A short drive of the demo car described in KCD (no DBC at all), four scopes granted."""
    start = 1_790_000_000.0
    trace = tmp_path / "drive.log"
    CanSimulator(default_dbc(), VehicleModel(seed=7, start_time=start)).record(trace, 3.0, start_time=start)
    kcd = _as(tmp_path, "vehicle.kcd", DEMO.as_kcd_string())
    replay_through_agent(tmp_path, pki, broker, cloud, kcd, default_signal_map(), trace,
                         ["read_speedometer", "read_fuel", "read_tires", "read_thermometer"])


# A KCD in the shape of cantools' the_homer.kcd: one signal name in two multiplexer branches (StationId7 under
# StationMux 6 and 7), a scaled signal outside the multiplexer.
RADIO_KCD = """<NetworkDefinition xmlns="http://kayak.2codeornot2code.org/1.0"><Bus name="Comfort">
<Message id="0x79A" name="Radio"><Multiplex name="StationMux" offset="0" length="8">
<MuxGroup count="0"><Signal name="StationId1" offset="8" length="8"/></MuxGroup>
<MuxGroup count="6"><Signal name="StationId7" offset="8" length="8"/></MuxGroup>
<MuxGroup count="7"><Signal name="StationId7" offset="8" length="8"/></MuxGroup>
</Multiplex><Signal name="SignalStrength" offset="16" length="16"><Value slope="0.5" intercept="-3"/></Signal>
</Message></Bus></NetworkDefinition>
"""


def test_the_agent_sends_a_name_of_two_multiplexer_branches_from_either(tmp_path: Path, pki: TestPKI,
                                                                      broker: Mosquitto, cloud: CloudPeer) -> None:
    """Frames of both branches (and of one that does not carry the name) through `vgw run`: the signal is sent
    from each frame of branch 6 or 7, as cantools decodes it, and from no other."""
    kcd = _as(tmp_path, "radio.kcd", RADIO_KCD)
    smap = _as(tmp_path, "radio.toml", '[[signal]]\nmessage = "Radio"\nsignal = "StationId7"\n'
               'path = "Vehicle.Cabin.Infotainment.Media.Station"\nscope = "read_vehicle_info"\n\n'
               '[[signal]]\nmessage = "Radio"\nsignal = "SignalStrength"\n'
               'path = "Vehicle.Cabin.Infotainment.Media.Level"\nscope = "read_vehicle_info"\n')
    trace = tmp_path / "radio.log"
    lines = [f"({1_790_000_000 + i / 100:.6f}) can0 79A#{mux:02X}{(17 * i) % 256:02X}{i:02X}{i % 7:02X}\n"
             for i, mux in enumerate([6, 7, 0, 7, 6, 0, 6, 7] * 4)]
    trace.write_text("".join(lines))
    replay_through_agent(tmp_path, pki, broker, cloud, kcd, smap, trace, ["read_vehicle_info"])


def test_the_simulator_monitor_and_doctor_take_an_arxml_or_kcd_from_the_command_line(tmp_path: Path,
                                                                                     pki: TestPKI) -> None:
    """`vgw sim can --dbc X.kcd --record` writes a drive, `vgw monitor` decodes it through the KCD, and `vgw doctor`
    counts the KCD's mapped signals; a DTD in the description is one line from each of them."""
    kcd = _as(tmp_path, "vehicle.kcd", DEMO.as_kcd_string())
    trace = tmp_path / "drive.log"
    r = vgw("sim", "can", "--dbc", str(kcd), "--record", str(trace), "--duration", "20")
    assert r.returncode == 0, r.stderr
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust,
                       can={"dbc": [str(kcd)], "replay": str(trace), "replay_loop": True})
    r = vgw("monitor", "--config", str(cfg), "--duration", "2.5", "--interval", "2.2")
    assert r.returncode == 0, r.stderr
    speed = r"^Vehicle\.Speed\s+read_speedometer\s+[0-9.]+\s+(?:\S+\s+)?[1-9]"  # value, unit if any, rate
    assert re.search(speed, r.stdout, re.MULTILINE), r.stdout
    r = vgw("doctor", "--config", str(cfg), "--json")
    [catalogue] = [c for c in json.loads(r.stdout) if c["check"] == "catalogue"]
    mapped = len(load_catalogue([kcd], default_signal_map()).specs)
    assert catalogue["status"] == "PASS" and f"{mapped} signal(s) mapped from 1 vehicle description" in \
        catalogue["detail"], catalogue

    kcd.write_text(BILLION_LAUGHS)
    for args in (("sim", "can", "--dbc", str(kcd), "--duration", "1"), ("monitor", "--config", str(cfg),
                                                                         "--duration", "1")):
        r = vgw(*args)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "DOCTYPE" in r.stderr, r
        assert str(kcd) in r.stderr


def test_bench_runs_on_a_kcd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`vgw bench --dbc` on the CAN FD demo car described in KCD: every decoded signal agrees with cantools."""
    fd = cantools.database.load_file(str(dbc_dir() / "vehicle_fd.dbc"))
    assert isinstance(fd, cantools.database.can.Database)
    kcd = _as(tmp_path, "vehicle_fd.kcd", fd.as_kcd_string())
    assert main(["bench", "--stages", "--json", "--dbc", str(kcd), "--frames", "5000", "--rt-seconds", "1",
                 "--revoke-rows", "500"]) == 0
    result = json.loads(capsys.readouterr().out)
    d, fp = result["decode"], result["full_path"]
    assert d["cantools_errors"] == 0 and d["signals_vgw"] == d["signals_cantools"] > 0
    assert fp["exit_code"] == 0 and fp["samples"] > 0


def test_provision_copies_a_kcd_and_the_config_reads_it(pki: TestPKI, tmp_path: Path) -> None:
    """`vgw provision --dbc my-car.kcd`: checked, copied under its own name (its extension says its format),
    and the written config loads it."""
    consent_key = SigningKey.generate().write_public_pem(tmp_path / "signer.pub.pem")
    inputs = {"ca": pki.ca.cert, "consent_key": consent_key, "out": tmp_path / "etc-vgw", "state": tmp_path / "state"}
    mine = _as(tmp_path, "my-car.kcd", DEMO.as_kcd_string())
    assert provision(inputs, "--source", "can", "--dbc", str(mine), "--signal-map", str(default_signal_map())) == 0
    install_signed_cert(inputs["out"], pki, tmp_path)
    cfg = load_config(inputs["out"] / "vgw.toml")
    assert cfg.can is not None and cfg.can.dbc == (inputs["out"] / "my-car.kcd",)
    assert load_catalogue(cfg.can.dbc, cfg.can.signal_map).specs == load_catalogue([mine], default_signal_map()).specs
    laughs = _as(tmp_path, "laughs.kcd", BILLION_LAUGHS)
    assert provision(inputs, "--source", "can", "--dbc", str(laughs), "--signal-map", str(default_signal_map())) == 1
