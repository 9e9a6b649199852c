"""No single bad input stops collection (docs/guarantees.md, "No single bad input stops collection").

Real parts: python-can's own ``slcan`` driver through pyserial on a real pseudo-terminal served by
simulators/vgw_sim/slcan_pty.py, the real agent in this process (python-can's virtual bus is in-process), cantools DBCs,
and systemd's notify protocol on a real AF_UNIX datagram socket.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import can
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vgw.base.errors import SourceFrameError
from vgw.cli.status import collect_status
from vgw.contract.consent.model import Grant, Limits, Recipient
from vgw.daemon.agent import Agent
from vgw.daemon.timing import Timing
from vgw.pipeline.catalogue import load_catalogue
from vgw.pipeline.router import Pipeline
from vgw.sources.canbus import BusSource, kernel_filters
from vgw_sim.broker import free_port
from vgw_sim.slcan_pty import SlcanPtyBus

from tests.agentkit import AgentThread, Authority, vgw, wait_until, write_config
from tests.faultkit import DEV

SPEED_ID = 200  # VehicleDynamics in dbc/vehicle.dbc: VehicleSpeed, 16 bits, 0.01 km/h


def _consent(tmp: Path, cfg: Path, auth: Authority, grants: dict[str, list[str]]) -> None:
    doc = tmp / "consent.jws"
    doc.write_text(auth.doc(DEV, grants))
    done = vgw("consent", "apply", "--config", str(cfg), str(doc))
    assert done.returncode == 0, done.stderr


@pytest.fixture
def slcan_sim() -> Iterator[SlcanPtyBus]:
    sim = SlcanPtyBus()
    try:
        yield sim
    finally:
        sim.shutdown()


class _Sender:
    """Sends VehicleDynamics frames on ``bus`` every 20 ms until stopped (the speed as 16-bit integer, or as an
    IEEE float in an 8-byte frame for the float DBC below)."""

    def __init__(self, bus: can.BusABC, *, as_float: bool = False) -> None:
        self.bus = bus
        self.as_float = as_float
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="speed-sender", daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            data = struct.pack("<f", n % 200) + bytes(4) if self.as_float else (n % 9000).to_bytes(2, "little")
            self.bus.send(can.Message(arbitration_id=SPEED_ID, is_extended_id=False, data=data))
            self.stop.wait(0.02)

    def __enter__(self) -> _Sender:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


# -- one bad SLCAN line ---------------------------------------------------------------------------------------

BAD_LINES = [
    b"t12\r",  # seen: truncated line, python-can raised IndexError and the collector thread died
    b"t\r", b"T1234\r", b"t12G2AABB\r", b"t1232ZZ\r", b"t123A\r", b"T1FFFFFFF9" + b"00" * 9 + b"\r",
    b"\xff\xfe\x80\r",  # not ASCII: python-can's decode fails before it clears its line buffer
    b"x\r", b"d123F\r", b"B1\r",
    b"7" * 3000,  # noise with no terminator at all
    b"\r",
]


def test_bad_slcan_lines_are_counted_and_collection_goes_on(tmp_path: Path, pki, slcan_sim: SlcanPtyBus) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust,
                       can={"interface": "slcan", "channel": slcan_sim.path, "bitrate": 500000, "reopen_s": 0.2})
    _consent(tmp_path, cfg, auth, {"g-speed": ["read_speedometer"]})
    runner = AgentThread(cfg).start()
    agent = runner.agent
    try:
        assert wait_until(lambda: slcan_sim.is_open, 15), "the agent never opened the SLCAN channel"
        with _Sender(slcan_sim):
            assert wait_until(lambda: agent.pipeline.counters["samples"] >= 5, 10)
            for line in BAD_LINES:
                seen = agent.pipeline.counters["samples"]
                slcan_sim.send_raw(line)
                # Frames after each bad line are decoded again (the driver resynchronised on the next line).
                assert wait_until(lambda seen=seen: agent.pipeline.counters["samples"] >= seen + 5, 10), line
            assert runner.thread.is_alive() and agent.status()["health"] == {"ok": True, "problem": None}
            # Every line but the last two: noise without terminator merges with the next line, which python-can
            # then ignores as a line of no known type (bounded, not counted), and an empty line is no frame.
            assert agent.counters["frames_malformed"] >= len(BAD_LINES) - 2
            assert agent.counters["source_errors"] == 0  # one bad line never costs a reopen
            assert wait_until(lambda: agent.status()["health"] == {"ok": True, "problem": None}, 5)
    finally:
        runner.stop()


def test_a_run_of_bad_lines_reopens_the_source(tmp_path: Path, pki, slcan_sim: SlcanPtyBus) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust,
                       can={"interface": "slcan", "channel": slcan_sim.path, "bitrate": 500000, "reopen_s": 0.2})
    _consent(tmp_path, cfg, auth, {"g-speed": ["read_speedometer"]})
    runner = AgentThread(cfg).start()
    agent = runner.agent
    try:
        assert wait_until(lambda: slcan_sim.is_open, 15)
        slcan_sim.send_raw(b"t12\r" * 150)  # an adapter gone mad: more than BAD_FRAMES_REOPEN in a row
        assert wait_until(lambda: agent.counters["source_errors"] >= 1, 10)
        assert agent.counters["frames_malformed"] >= 100
        # ... closed, reopened after reopen_s, and collecting again.
        assert wait_until(lambda: slcan_sim.is_open, 15)
        with _Sender(slcan_sim):
            seen = agent.pipeline.counters["samples"]
            assert wait_until(lambda: agent.pipeline.counters["samples"] >= seen + 5, 10)
        assert agent.healthy
    finally:
        runner.stop()


def test_slcan_noise_without_terminator_does_not_grow_memory(slcan_sim: SlcanPtyBus) -> None:
    """python-can's SLCAN driver keeps a line until its terminator; the source bounds it."""
    source = BusSource("slcan", slcan_sim.path, 500000)
    try:
        assert wait_until(lambda: slcan_sim.is_open, 10)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            peak_growth = 0
            for _ in range(8):
                slcan_sim.send_raw(b"0" * 4096)
                for _ in range(25):
                    try:
                        source.recv(0.01)
                    except SourceFrameError:
                        pass
                peak_growth = max(peak_growth, tracemalloc.get_traced_memory()[0] - base)
        finally:
            tracemalloc.stop()
        assert peak_growth < 16 * 1024, f"{peak_growth} bytes held after 32 KiB of noise"
        # And the next good line is a frame.
        slcan_sim.send_raw(b"\rt7FF2AA55\r")
        assert _next_frame(source, 0x7FF, 5.0) is not None
    finally:
        source.close()


def _next_frame(source: BusSource, frame_id: int, timeout: float) -> can.Message | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = source.recv(0.05)
        except SourceFrameError:
            continue
        if msg is not None and msg.arbitration_id == frame_id and bytes(msg.data) == b"\xaa\x55":
            return msg
    return None


def _fuzz_slcan(examples: int):  # type: ignore[no-untyped-def]
    line = st.one_of(
        st.binary(max_size=40),
        st.text(alphabet="tTrRdDbBxzZ0123456789ABCDEFabcdefG \a\r\n", max_size=40).map(str.encode),
        st.sampled_from([b"t12", b"T1234567", b"t123", b"t1239", b"tFFF8", b"d123F", b"r12"]),
    )

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(chunks=st.lists(line, min_size=1, max_size=8))
    def run(slcan_sim: SlcanPtyBus, source: BusSource, chunks: list[bytes]) -> None:
        # Whatever the line delivers, recv returns a frame, None or raises SourceFrameError (never anything
        # else), and the next good line after a terminator is a frame again.
        slcan_sim.send_raw(b"\r".join(chunks) + b"\rt7FF2AA55\r")
        assert _next_frame(source, 0x7FF, 5.0) is not None

    return run


@pytest.fixture
def slcan_source(slcan_sim: SlcanPtyBus) -> Iterator[BusSource]:
    source = BusSource("slcan", slcan_sim.path, 500000)
    try:
        assert wait_until(lambda: slcan_sim.is_open, 10)
        yield source
    finally:
        source.close()


def test_fuzz_slcan_lines_never_escape_the_source(slcan_sim: SlcanPtyBus, slcan_source: BusSource) -> None:
    _fuzz_slcan(25)(slcan_sim, slcan_source)


def _held_by_the_read_path() -> int:
    """Bytes held by allocations made in python-can, pyserial, the agent or the simulator (not hypothesis)."""
    keep = [tracemalloc.Filter(True, pattern) for pattern in ("*/can/*", "*/serial/*", "*/agent/*", "*/simulators/*")]
    return sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(keep).statistics("filename"))


@pytest.mark.slow
def test_fuzz_slcan_lines_long(slcan_sim: SlcanPtyBus, slcan_source: BusSource) -> None:
    tracemalloc.start()
    try:
        _fuzz_slcan(100)(slcan_sim, slcan_source)  # warm up caches before measuring
        base = _held_by_the_read_path()
        _fuzz_slcan(1000)(slcan_sim, slcan_source)
        growth = _held_by_the_read_path() - base
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, f"{growth} bytes more held by the read path after 1000 fuzz runs"


# -- non-finite floats ----------------------------------------------------------------------------------------

FLOAT_DBC = """VERSION ""
NS_ :
BS_:
BU_: GNSS VGW
BO_ 2566848800 GnssPosition: 8 GNSS
 SG_ Latitude : 0|32@1- (1,0) [-90|90] "deg" VGW
 SG_ Longitude : 32|32@1- (1,0) [-180|180] "deg" VGW
BO_ 200 VehicleDynamics: 8 ESC
 SG_ VehicleSpeed : 0|32@1- (1,0) [0|655.35] "km/h" VGW
SIG_VALTYPE_ 2566848800 Latitude : 1;
SIG_VALTYPE_ 2566848800 Longitude : 1;
SIG_VALTYPE_ 200 VehicleSpeed : 1;
"""

FLOAT_MAP = """
[[signal]]
message = "GnssPosition"
signal = "Latitude"
path = "Vehicle.CurrentLocation.Latitude"
scope = "read_location"

[[signal]]
message = "GnssPosition"
signal = "Longitude"
path = "Vehicle.CurrentLocation.Longitude"
scope = "read_location"

[[signal]]
message = "VehicleDynamics"
signal = "VehicleSpeed"
path = "Vehicle.Speed"
scope = "read_speedometer"
"""

GNSS_ID = 0x18FF0120  # 2566848800 in the DBC: bit 31 marks the extended format


def _float_dbc(tmp: Path) -> tuple[Path, Path]:
    dbc, smap = tmp / "float.dbc", tmp / "float.toml"
    dbc.write_text(FLOAT_DBC)
    smap.write_text(FLOAT_MAP)
    return dbc, smap


def _gnss(lat: float, lon: float) -> bytes:
    return struct.pack("<ff", lat, lon)


def _pipeline(tmp: Path, scopes: tuple[str, ...], limits: dict[str, Limits] | None = None) -> Pipeline:
    dbc, smap = _float_dbc(tmp)
    pipe = Pipeline(load_catalogue([dbc], smap))
    pipe.swap((Grant("g", "c", "p", scopes, Recipient("X25519", b"\x09" * 32), limits or {}),))
    return pipe


NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_latitude_is_dropped_and_counted(tmp_path: Path, bad: float) -> None:
    """Seen: a NaN/Inf IEEE-float latitude made the location snap raise, which killed the collector."""
    pipe = _pipeline(tmp_path, ("read_location",), {"read_location": Limits(max_hz=1000.0, precision_m=100.0)})
    pipe.process(GNSS_ID, _gnss(bad, 13.4), 1.0, True)
    pipe.process(GNSS_ID, _gnss(52.5, bad), 2.0, True)
    pipe.process(GNSS_ID, _gnss(52.5, 13.4), 3.0, True)
    samples = pipe.batches["g"].samples
    assert all(math.isfinite(s["value"]) for s in samples)
    # t=1: no latitude yet, so no longitude grid (dropped); t=2: the latitude only; t=3: both, snapped.
    assert [(s["t"], s["path"].rsplit(".", 1)[1]) for s in samples] == [
        (2.0, "Latitude"), (3.0, "Latitude"), (3.0, "Longitude")]
    assert abs(samples[1]["value"] - 52.5) < 0.001 and abs(samples[2]["value"] - 13.4) < 0.002
    assert pipe.counters["samples_not_finite"] == 2


def test_non_finite_values_never_reach_a_batch(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path, ("read_location", "read_speedometer"))
    for i, bad in enumerate(NON_FINITE):
        pipe.process(SPEED_ID, struct.pack("<f", bad) + bytes(4), float(i), False)
        pipe.process(GNSS_ID, _gnss(bad, bad), float(i), True)
    assert pipe.offer("Vehicle.Speed", "read_speedometer", 9.0, math.nan) == 0  # the OBD-II path too
    assert pipe.batches["g"].samples == []
    assert pipe.counters["samples_not_finite"] == 3 * 3 + 1


def test_a_latitude_at_the_float_limit_is_dropped_not_raised(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path, ("read_location",), {"read_location": Limits(max_hz=1000.0, precision_m=100.0)})
    # Finite, but divided by the 100 m grid step (about 0.0009 deg) it overflows to inf.
    pipe.offer("Vehicle.CurrentLocation.Latitude", "read_location", 2.0, 1.7e308)
    pipe.offer("Vehicle.CurrentLocation.Longitude", "read_location", 2.0, 13.4)
    assert pipe.batches["g"].samples == []


def test_nan_latitude_on_the_bus_does_not_stop_the_collector(tmp_path: Path, pki, channel: str) -> None:
    dbc, smap = _float_dbc(tmp_path)
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust,
                       can={"channel": channel, "dbc": [str(dbc)], "signal_map": str(smap)})
    _consent(tmp_path, cfg, auth, {"g-loc": ["read_location", "read_speedometer"]})
    bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    runner = AgentThread(cfg).start()
    agent = runner.agent
    try:
        assert wait_until(lambda: _source_open(agent), 10)
        bus.send(can.Message(arbitration_id=GNSS_ID, is_extended_id=True, data=_gnss(math.nan, 13.4)))
        bus.send(can.Message(arbitration_id=GNSS_ID, is_extended_id=True, data=_gnss(math.inf, 13.4)))
        with _Sender(bus, as_float=True):
            assert wait_until(lambda: agent.pipeline.counters["samples"] >= 5, 10)
        assert agent.pipeline.counters["samples_not_finite"] == 2
        assert agent.status()["health"] == {"ok": True, "problem": None}  # the collector goes on
    finally:
        runner.stop()
        bus.shutdown()


# -- standard vs extended ids ---------------------------------------------------------------------------------

def test_a_frame_of_the_other_format_is_not_decoded(tmp_path: Path) -> None:
    """An extended frame whose number equals a standard-id message's, and the reverse, are other frames."""
    pipe = _pipeline(tmp_path, ("read_location", "read_speedometer"),
                     {"read_location": Limits(max_hz=1000.0, precision_m=100.0)})
    speed = struct.pack("<f", 50.0) + bytes(4)
    pipe.process(SPEED_ID, speed, 1.0, True)  # extended 0xC8: not VehicleDynamics (standard 0xC8)
    pipe.process(GNSS_ID & 0x7FF, _gnss(52.5, 13.4), 1.0, False)  # a standard id is never the GNSS frame
    assert pipe.batches["g"].samples == []
    assert pipe.counters["frames_unrouted"] == 2
    pipe.process(SPEED_ID, speed, 2.0, False)
    pipe.process(GNSS_ID, _gnss(52.5, 13.4), 2.0, True)
    assert sorted(s["path"] for s in pipe.batches["g"].samples) == [
        "Vehicle.CurrentLocation.Latitude", "Vehicle.CurrentLocation.Longitude", "Vehicle.Speed"]
    assert pipe.router.frames == frozenset({(SPEED_ID, False), (GNSS_ID, True)})


def test_collector_passes_the_frame_format(tmp_path: Path, pki, channel: str) -> None:
    dbc, smap = _float_dbc(tmp_path)
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust,
                       can={"channel": channel, "dbc": [str(dbc)], "signal_map": str(smap)})
    _consent(tmp_path, cfg, auth, {"g-speed": ["read_speedometer"]})
    bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    runner = AgentThread(cfg).start()
    agent = runner.agent
    try:
        assert wait_until(lambda: _source_open(agent), 10)
        for _ in range(20):
            bus.send(can.Message(arbitration_id=SPEED_ID, is_extended_id=True, data=struct.pack("<f", 50.0) + bytes(4)))
        assert wait_until(lambda: agent.pipeline.counters["frames"] >= 20, 10)
        assert agent.pipeline.counters["samples"] == 0
        assert agent.pipeline.counters["frames_unrouted"] == 20
    finally:
        runner.stop()
        bus.shutdown()


def _kernel_match(flt: dict, can_id_word: int) -> bool:
    """The kernel's af_can rule on the words python-can packs: (id ^ can_id) & can_mask == 0."""
    from can.interfaces.socketcan.utils import pack_filters

    fid, mask = struct.unpack("=2I", pack_filters([flt]))  # type: ignore[list-item]
    return (can_id_word ^ fid) & mask == 0


def test_kernel_filters_pass_only_the_consented_frame_format() -> None:
    eff = 0x80000000
    filters = kernel_filters(frozenset({(SPEED_ID, False), (GNSS_ID, True)}))

    def passes(word: int) -> bool:
        return any(_kernel_match(f, word) for f in filters)

    assert passes(SPEED_ID) and passes(GNSS_ID | eff)
    assert not passes(SPEED_ID | eff)  # extended 0xC8
    assert not passes(GNSS_ID & 0x7FF) and not passes((GNSS_ID & 0x7FF) | eff)
    nothing = kernel_filters(frozenset())
    assert not any(_kernel_match(f, w) for f in nothing for w in (0, 0x7FF, eff, 0x1FFFFFFF | eff))


def test_python_can_filters_pass_only_the_consented_frame_format(channel: str) -> None:
    """The same filters applied by python-can itself (interfaces that filter in user space)."""
    rx = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    tx = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    try:
        rx.set_filters(kernel_filters(frozenset({(SPEED_ID, False)})))
        tx.send(can.Message(arbitration_id=SPEED_ID, is_extended_id=True, data=b"\x01"))
        tx.send(can.Message(arbitration_id=SPEED_ID, is_extended_id=False, data=b"\x02"))
        got = rx.recv(2.0)
        assert got is not None and not got.is_extended_id and bytes(got.data) == b"\x02"
        assert rx.recv(0.2) is None
    finally:
        rx.shutdown()
        tx.shutdown()


def _source_open(agent: Agent) -> bool:
    """The collector has its source open (the bus, the pty): frames sent from now on are read."""
    return agent.collector is not None and agent.collector.source is not None


# -- watchdog: fed only while the collector makes progress --------------------------------------------------

@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    folder = tempfile.mkdtemp(prefix="vgw-sd-", dir="/tmp")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _watchdog_pings(sock: socket.socket, seconds: float) -> int:
    sock.settimeout(0.05)
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            n += sock.recv(256) == b"WATCHDOG=1"
        except TimeoutError:
            pass
    return n


@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_watchdog_stops_while_the_collector_is_stalled(tmp_path: Path, pki, channel: str,
                                                       notify_socket: socket.socket) -> None:
    """A quiet bus is legal (pings go on); a collector stuck in one iteration is not (pings stop, status says
    so), and pings resume when it moves again."""
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": channel})
    runner = AgentThread(cfg, timing=Timing(collector_stall_s=1.0))
    agent = runner.agent
    runner.start()
    try:
        assert wait_until(lambda: _source_open(agent), 10)
        assert _watchdog_pings(notify_socket, 1.5) >= 5  # no frame at all: still progress
        with agent.guard.lock:  # the collector blocks on its next flush check: a stall (as a deadlock would be)
            # Pings stop (the first half second may still carry one sent before the stall was seen) ...
            assert wait_until(lambda: _watchdog_pings(notify_socket, 0.5) == 0, 5)
            assert _watchdog_pings(notify_socket, 1.0) == 0
            # ... and status.json says why.
            assert "collector stalled" in (agent.status()["health"]["problem"] or "")
            assert wait_until(lambda: collect_status(str(cfg))["health"]["ok"] is False, 5)  # `vgw status`
        assert wait_until(lambda: agent.healthy, 5)
        assert _watchdog_pings(notify_socket, 1.0) >= 3
    finally:
        runner.stop()


def test_watchdog_stops_when_the_collector_thread_is_gone(tmp_path: Path, pki, channel: str,
                                                          notify_socket: socket.socket) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": channel})
    runner = AgentThread(cfg).start()
    agent = runner.agent
    try:
        assert wait_until(lambda: _source_open(agent), 10)
        assert _watchdog_pings(notify_socket, 1.0) >= 3
        ended = threading.Thread(target=lambda: None)  # a collector thread that has ended
        ended.start()
        ended.join()
        assert agent.collector is not None
        agent.collector.thread = ended
        assert wait_until(lambda: _watchdog_pings(notify_socket, 0.5) == 0, 5)
        assert _watchdog_pings(notify_socket, 1.0) == 0
        assert agent.status()["health"] == {"ok": False, "problem": "collector stopped"}
    finally:
        runner.stop()


def test_the_retained_status_follows_a_health_change(tmp_path: Path, pki, broker, cloud, channel: str) -> None:
    """The retained status topic was only published at connect: a stalled collector (health not ok) and its
    recovery must reach a subscriber too, as a new retained status, with no reconnect."""
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, device=DEV, can={"channel": channel})
    runner = AgentThread(cfg, timing=Timing(collector_stall_s=1.0))
    agent = runner.agent
    runner.start()
    try:
        assert wait_until(lambda: (cloud.status(DEV) or {}).get("state") == "online", 10)
        assert cloud.status(DEV)["healthy"] is True
        with agent.guard.lock:  # the collector blocks on its next flush check: a stall
            assert wait_until(lambda: (cloud.status(DEV) or {}).get("healthy") is False, 10), cloud.status(DEV)
        assert wait_until(lambda: (cloud.status(DEV) or {}).get("healthy") is True, 10)
        assert agent.uplink.view().connects == 1
    finally:
        runner.stop()
