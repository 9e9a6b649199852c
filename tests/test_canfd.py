"""CAN FD on a live bus (README "CAN FD"): config keys, the bus opened in FD mode, the simulator's FD frames
(virtual bus, candump trace, SLCAN pty), the doctor's FD check, decoders value-exact against cantools on
64-byte frames, and the whole path through the real broker."""

from __future__ import annotations

import threading
from pathlib import Path

import can
import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vgw.base.errors import ConfigError
from vgw.config.settings import load_config
from vgw.ops.doctor import FAIL, PASS, WARN, Probes, check_can_interface
from vgw.pipeline.catalogue import load_catalogue
from vgw.pipeline.decoder import MessageDecoder
from vgw.sources.canbus import BusSource
from vgw_sim.can_sim import CanSimulator, open_output
from vgw_sim.paths import dbc_dir
from vgw_sim.vehicle import VehicleModel

from tests.agentkit import AgentThread, Authority, vgw, wait_until, write_config

FD_DBC = dbc_dir() / "vehicle_fd.dbc"
FD_MAP = dbc_dir() / "vehicle_fd_signals.toml"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dbc" / "cantools"
DEV = "dev-0001"


def _cfg(tmp_path: Path, can_lines: str) -> Path:
    (tmp_path / "k.pem").write_text("x")
    p = tmp_path / "c.toml"
    p.write_text(f"""
[device]
id = "d1"
state_dir = "{tmp_path / 'state'}"
[mqtt]
host = "h"
ca_file = "{tmp_path / 'k.pem'}"
cert_file = "{tmp_path / 'k.pem'}"
key_file = "{tmp_path / 'k.pem'}"
[consent]
trust_keys = ["{tmp_path / 'k.pem'}"]
[can]
dbc = ["{FD_DBC}"]
signal_map = "{FD_MAP}"
{can_lines}
""")
    return p


# -- config -----------------------------------------------------------------------------------------------

def test_fd_keys_parse_and_default_off(tmp_path: Path) -> None:
    assert load_config(_cfg(tmp_path, 'interface = "socketcan"')).can.fd is False  # type: ignore[union-attr]
    cfg = load_config(_cfg(tmp_path, 'interface = "pcan"\nchannel = "PCAN_USBBUS1"\nfd = true\n'
                                     'bitrate = 500000\ndata_bitrate = 2000000'))
    assert cfg.can is not None and cfg.can.fd and cfg.can.data_bitrate == 2_000_000


@pytest.mark.parametrize("lines, needle", [
    ('fd = "yes"', "[can] fd: expected true/false"),
    ('data_bitrate = 2000000', "only meaningful with fd = true"),
    ('fd = true\ndata_bitrate = 2000000', "SocketCAN takes it from `ip link"),
    ('interface = "slcan"\nchannel = "/dev/ttyACM0"\nfd = true\nbitrate = 500000\ndata_bitrate = 4000000',
     "an slcan adapter takes 2000000 or 5000000"),
    ('interface = "slcan"\nchannel = "/dev/ttyACM0"\nfd = true\ndata_bitrate = 2000000', "bitrate: required"),
    ('fd_mode = true', "unknown key 'fd_mode'"),
])
def test_bad_fd_keys_are_one_clear_error(tmp_path: Path, lines: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config(_cfg(tmp_path, lines))
    assert needle in str(info.value)


# -- the bus in FD mode ----------------------------------------------------------------------------------

def test_bus_source_in_fd_mode_receives_64_byte_frames() -> None:
    src = BusSource("virtual", "fd-src", fd=True)
    tx = can.Bus(interface="virtual", channel="fd-src", protocol=can.CanProtocol.CAN_FD)
    try:
        assert src.bus.protocol == can.CanProtocol.CAN_FD
        payload = bytes(range(64))
        tx.send(can.Message(arbitration_id=0x500, is_extended_id=False, is_fd=True, bitrate_switch=True,
                            data=payload))
        msg = src.recv(2.0)
        assert msg is not None and msg.is_fd and bytes(msg.data) == payload
    finally:
        tx.shutdown()
        src.close()


# -- simulator -------------------------------------------------------------------------------------------

def test_simulator_sends_fd_frames_of_an_fd_dbc() -> None:
    sim = CanSimulator(FD_DBC, VehicleModel(seed=3))
    assert sim.has_fd
    frames = list(sim.frames(0.2, start_time=1.7e9))
    assert {f.arbitration_id for f in frames} == {0x500, 0x501}
    assert all(f.is_fd and f.bitrate_switch and len(f.data) == 64 for f in frames)
    assert not CanSimulator(None, VehicleModel(seed=3)).has_fd  # the classic demo stays classic


def test_simulator_trace_keeps_fd_frames(tmp_path: Path) -> None:
    sim = CanSimulator(FD_DBC, VehicleModel(seed=3))
    trace = tmp_path / "fd.log"
    n = sim.record(trace, 0.2, start_time=1.7e9)
    assert "##1" in trace.read_text()
    back = list(can.LogReader(str(trace)))
    want = list(CanSimulator(FD_DBC, VehicleModel(seed=3)).frames(0.2, start_time=1.7e9))
    assert len(back) == n == len(want)
    assert [(m.arbitration_id, m.is_fd, bytes(m.data)) for m in back] == \
        [(m.arbitration_id, m.is_fd, bytes(m.data)) for m in want]


def test_slcan_pty_carries_fd_frames_to_python_can_slcan() -> None:
    bus = open_output("slcan", fd=True)
    client = can.Bus(interface="slcan", channel=bus.path, bitrate=500000, sleep_after_open=0)
    try:
        sim = CanSimulator(FD_DBC, VehicleModel(seed=3))
        want = list(sim.frames(0.1, start_time=1.7e9))
        got: list[can.Message] = []
        wait_until(lambda: bus.is_open, 5, step=0.01)  # the pty reads the client's "O"
        for frame in want:
            bus.send(frame)
        while len(got) < len(want):
            msg = client.recv(5.0)
            assert msg is not None, f"only {len(got)} of {len(want)} FD frames arrived over SLCAN"
            got.append(msg)
        assert [(m.arbitration_id, m.is_extended_id, m.is_fd, m.bitrate_switch, bytes(m.data)) for m in got] == \
            [(m.arbitration_id, m.is_extended_id, True, True, bytes(m.data)) for m in want]
    finally:
        client.shutdown()
        bus.shutdown()


# -- doctor ------------------------------------------------------------------------------------------------

def _net(root: Path, name: str, mtu: int | None) -> Probes:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "type").write_text("280\n")
    (d / "flags").write_text("0x41\n")
    if mtu is not None:
        (d / "mtu").write_text(f"{mtu}\n")
    probes = Probes(sys_class_net=root)
    probes.link_details = lambda _ifname: None
    return probes


def test_doctor_checks_fd_mode_by_mtu(tmp_path: Path) -> None:
    classic = check_can_interface("can", "can0", None, _net(tmp_path, "can0", 16), want_fd=True)
    assert classic.status == FAIL and "classic CAN mode (MTU 16)" in classic.detail and "fd on" in classic.detail
    fd = check_can_interface("can", "can1", None, _net(tmp_path, "can1", 72), want_fd=True)
    assert fd.status == PASS and "CAN FD" in fd.detail
    unused = check_can_interface("can", "can2", None, _net(tmp_path, "can2", 72), want_fd=False)
    assert unused.status == WARN and "fd = false" in unused.detail
    # No MTU to read (an unusual driver): nothing is claimed about FD either way.
    assert check_can_interface("can", "can3", None, _net(tmp_path, "can3", None), want_fd=True).status == PASS
    # No such interface: the usual FAIL, not a crash.
    assert check_can_interface("can", "can9", None, _net(tmp_path, "can4", 72), want_fd=True).status == FAIL


def test_doctor_fd_check_on_this_machines_interfaces() -> None:
    """Where the kernel has a CAN interface, the check reads its real MTU; else skip."""
    net = Path("/sys/class/net")
    cans = [p.name for p in net.iterdir() if (p / "type").exists() and (p / "type").read_text().strip() == "280"] \
        if net.is_dir() else []
    if not cans:
        pytest.skip("no SocketCAN interface on this machine (no vcan/can device)")
    mtu = int((net / cans[0] / "mtu").read_text())
    res = check_can_interface("can", cans[0], None, Probes(), want_fd=True)
    assert (res.status == FAIL) == (mtu != 72)


# -- decoders value-exact against cantools ----------------------------------------------------------------

def _fd_messages() -> list[tuple[str, str]]:
    """Every message of the FD demo DBC, and every FD message of the shared cantools DBCs (64-byte frames and
    FD frames of classic length, standard and extended ids)."""
    out = [(str(FD_DBC), m.name) for m in cantools.database.load_file(str(FD_DBC)).messages]
    for name in ("foobar.dbc", "fd_test.dbc", "fd_test_int.dbc", "motohawk_fd.dbc"):
        if (SHARED / name).exists():
            shared = cantools.database.load_file(str(SHARED / name), strict=False)
            out += [(str(SHARED / name), m.name) for m in shared.messages if m.is_fd]
    return out


@pytest.mark.parametrize("dbc, name", _fd_messages())
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fd_decoders_agree_with_cantools(dbc: str, name: str, data: st.DataObject) -> None:
    msg = cantools.database.load_file(dbc, strict=False).get_message_by_name(name)
    assert msg.is_fd and (msg.length == 64 or dbc != str(FD_DBC))
    payload = data.draw(st.binary(min_size=msg.length, max_size=msg.length))
    if msg.is_multiplexed():  # FD_Chassis: the selector is byte 0; draw one of its defined values
        payload = bytes([data.draw(st.sampled_from([0, 1]))]) + payload[1:]
    want = msg.decode(payload, decode_choices=False, scaling=True)
    dec = MessageDecoder(msg, [(s, s) for s in want])
    got, short = dec.decode(payload)
    assert short == 0 and dict(got) == want  # type: ignore[arg-type]


def test_shared_fd_dbcs_present_or_skip() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"shared test DBCs not found: {SHARED}")
    fd = cantools.database.load_file(str(SHARED / "fd_test.dbc"), strict=False)
    assert {m.name for m in fd.messages if m.is_fd} == {"TestMsg_FDStd", "TestMsg_FDEx"}


# -- end to end through the real broker ----------------------------------------------------------------

def test_fd_vehicle_end_to_end_value_exact(tmp_path, pki, broker, cloud) -> None:
    auth = Authority(tmp_path)
    channel = f"fd-e2e-{id(tmp_path)}"
    cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                       can={"channel": channel, "fd": True, "dbc": [str(FD_DBC)], "signal_map": str(FD_MAP)})
    cloud.add_recipient("g-fd", auth.recipient("g-fd"))
    catalogue = load_catalogue([FD_DBC], FD_MAP)
    path_of = {(s.message, s.signal): s.path for s in catalogue.specs}
    scopes = ["read_speedometer", "read_tires", "read_battery", "read_odometer"]
    wanted_paths = {s.path for s in catalogue.specs if s.scope in scopes}

    sent: dict[float, can.Message] = {}
    listener = can.Bus(interface="virtual", channel=channel, protocol=can.CanProtocol.CAN_FD)
    tx = open_output("virtual", channel, fd=True)
    sim = CanSimulator(FD_DBC, VehicleModel(seed=5))
    stop = threading.Event()
    runner = threading.Thread(target=sim.run, args=(tx,), kwargs={"stop_event": stop}, daemon=True)
    try:
        with AgentThread(cfg) as agent:
            assert agent.wait_link()
            runner.start()
            cloud.publish_consent(DEV, auth.doc(DEV, {"g-fd": scopes}))
            assert cloud.wait_for(lambda: {s.path for s in cloud.samples(DEV, "g-fd")} == wanted_paths, 20)
        stop.set()
        runner.join(5)
        while (m := listener.recv(0)) is not None:
            sent[round(m.timestamp, 6)] = m
    finally:
        stop.set()
        tx.shutdown()
        listener.shutdown()
    db = cantools.database.load_file(str(FD_DBC))
    checked = 0
    for sample in cloud.samples(DEV, "g-fd"):
        frame = sent[sample.t]
        assert frame.is_fd and len(frame.data) == 64
        ext = frame.is_extended_id
        decoded = db.decode_message(frame.arbitration_id, bytes(frame.data), decode_choices=False,
                                    force_extended_id=ext)
        msg = db.get_message_by_frame_id(frame.arbitration_id, force_extended_id=ext)
        (name,) = [sig for (m, sig), p in path_of.items() if m == msg.name and p == sample.path]
        assert sample.value == decoded[name], sample.path
        checked += 1
    assert checked >= len(wanted_paths)


def test_vgw_sim_can_records_fd_frames(tmp_path: Path) -> None:
    trace = tmp_path / "fd.log"
    res = vgw("sim", "can", "--dbc", str(FD_DBC), "--record", str(trace), "--duration", "1")
    assert res.returncode == 0, res.stderr
    frames = list(can.LogReader(str(trace)))
    assert frames and all(f.is_fd and len(f.data) == 64 for f in frames)


def test_fd_over_slcan_from_a_separate_simulator_process(tmp_path, pki, broker, cloud) -> None:
    """`vgw sim can --interface slcan` with the FD DBC in its own process; the agent opens the pty like a
    CANable 2.0 adapter in FD mode (data bitrate 2 Mbit/s) and every FD quantity arrives, in range."""
    import subprocess
    import sys

    from tests.agentkit import stop_process

    sim = subprocess.Popen([sys.executable, "-m", "vgw", "sim", "can", "--interface", "slcan", "--dbc",
                            str(FD_DBC), "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    auth = Authority(tmp_path)
    try:
        assert sim.stdout is not None
        pty_path = sim.stdout.readline().strip()
        assert pty_path.startswith("/dev/"), pty_path
        cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                           can={"interface": "slcan", "channel": pty_path, "bitrate": 500000, "fd": True,
                                "data_bitrate": 2000000, "dbc": [str(FD_DBC)], "signal_map": str(FD_MAP)})
        cloud.add_recipient("g", auth.recipient("g"))
        scopes = ["read_speedometer", "read_tires", "read_climate"]
        catalogue = load_catalogue([FD_DBC], FD_MAP)
        wanted = {s.path for s in catalogue.specs if s.scope in scopes}
        with AgentThread(cfg) as runner:
            assert runner.wait_link()
            cloud.publish_consent(DEV, auth.doc(DEV, {"g": scopes}))
            assert cloud.wait_for(lambda: {s.path for s in cloud.samples(DEV, "g")} == wanted, 20)
    finally:
        stop_process(sim)
    db = cantools.database.load_file(str(FD_DBC))
    ranges = {spec.path: db.get_message_by_name(spec.message).get_signal_by_name(spec.signal)
              for spec in catalogue.specs}
    for s in cloud.samples(DEV, "g"):
        sig = ranges[s.path]
        assert sig.minimum <= s.value <= sig.maximum, s.path
