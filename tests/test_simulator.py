"""The vehicle model and the CAN simulator: physics, encoding, periods and every output."""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
import pytest
from cantools.database.can import Database
from vgw.base.errors import ConfigError, SourceOpenError
from vgw_sim.can_sim import MODEL_TICK_MS, SIGNAL_SOURCES, CanSimulator, open_output, vin_parts
from vgw_sim.slcan_pty import SlcanPtyBus
from vgw_sim.vehicle import (
    DEFAULT_VIN,
    DRIVE_CYCLE,
    GEAR_PARK,
    IDLE_RPM,
    PARK_S,
    Route,
    VehicleModel,
    VehicleState,
    engine_rpm_for,
    haversine_m,
    initial_bearing_deg,
    vin_check_digit,
)

from tests.agentkit import stop_process

REPO = Path(__file__).resolve().parent.parent
START = 1_795_920_000.0
CYCLE_S = 600.0  # long enough to cover urban and extra-urban phases


@pytest.fixture(scope="module")
def drive() -> list[VehicleState]:
    """States every 0.1 s over the first CYCLE_S seconds of seed 3."""
    model = VehicleModel(seed=3, start_time=START)
    states = [model.state]
    for _ in range(int(CYCLE_S * 10)):
        model.step(0.1)
        states.append(model.state)
    return states


# --- vehicle model -----------------------------------------------------------------------------------


def test_vin_is_valid_and_checked() -> None:
    assert vin_check_digit(DEFAULT_VIN) == DEFAULT_VIN[8]
    with pytest.raises(ValueError):
        VehicleModel(vin="TOO-SHORT")
    with pytest.raises(ValueError):
        VehicleModel(vin="1M8GDM9AXKP04278O")  # letter O is not allowed
    with pytest.raises(ValueError):
        VehicleModel(dtcs=["X123"])


def test_deterministic_with_a_seed() -> None:
    a, b, c = (
        VehicleModel(seed=7, start_time=START),
        VehicleModel(seed=7, start_time=START),
        VehicleModel(seed=8),
    )
    for _ in range(300):
        for m in (a, b, c):
            m.step(0.37)
    assert a.state == b.state
    assert a.state.odometer_km != c.state.odometer_km


def test_odometer_is_the_integral_of_speed(drive: list[VehicleState]) -> None:
    pairs = itertools.pairwise(drive)
    integral_km = sum((p.speed_kmh + q.speed_kmh) / 2 * (q.t - p.t) / 3600 for p, q in pairs)
    travelled = drive[-1].odometer_km - drive[0].odometer_km
    assert travelled > 3.0  # it really drove
    assert travelled == pytest.approx(integral_km, rel=1e-9, abs=1e-9)
    assert max(s.speed_kmh for s in drive) > 100  # extra-urban phase reached
    assert any(s.speed_kmh == 0 for s in drive[100:])  # and it stops in town


def test_position_follows_the_route_by_distance(drive: list[VehicleState]) -> None:
    route = Route()
    model = VehicleModel(seed=3, start_time=START)
    d0, odo0 = model.route_distance_m, model.state.odometer_km
    moved = 0.0
    for _ in range(3000):
        before = model.state
        model.step(0.1)
        after = model.state
        step_m = (after.odometer_km - before.odometer_km) * 1000
        if route.segment_at(model.route_distance_m - step_m) == route.segment_at(model.route_distance_m):
            # Within a segment the straight-line (haversine) step equals the distance driven.
            hop = haversine_m(
                before.latitude_deg, before.longitude_deg, after.latitude_deg, after.longitude_deg
            )
            assert hop == pytest.approx(step_m, rel=0.01, abs=0.05)
        moved += step_m
    state = model.state
    assert model.route_distance_m - d0 == pytest.approx((state.odometer_km - odo0) * 1000, abs=1e-6)
    # From the start of the current segment, the haversine distance is the distance driven along it.
    i = route.segment_at(model.route_distance_m)
    seg_lat, seg_lon = route.waypoints[i]
    nxt_lat, nxt_lon = route.waypoints[(i + 1) % len(route.waypoints)]
    along = (model.route_distance_m % route.length_m) - route.segment_start_m(i)
    assert haversine_m(seg_lat, seg_lon, state.latitude_deg, state.longitude_deg) == pytest.approx(
        along, abs=1.0
    )
    assert state.heading_deg == pytest.approx(initial_bearing_deg(seg_lat, seg_lon, nxt_lat, nxt_lon))
    assert moved > 1000


def test_fuel_falls_with_distance(drive: list[VehicleState]) -> None:
    fuel = [s.fuel_l for s in drive]
    assert all(b <= a for a, b in itertools.pairwise(fuel))
    used_l = fuel[0] - fuel[-1]
    km = drive[-1].odometer_km - drive[0].odometer_km
    assert 3.0 < used_l / km * 100 < 12.0  # l/100 km of a petrol hybrid
    level = [s.fuel_level_pct for s in drive]
    assert level[-1] < level[0]


def test_rpm_follows_speed_and_gear(drive: list[VehicleState]) -> None:
    gears_seen = set()
    for s in drive:
        if not s.engine_running:
            assert s.engine_rpm == 0
            continue
        assert 1 <= s.gear <= 6
        gears_seen.add(s.gear)
        assert s.engine_rpm == pytest.approx(engine_rpm_for(s.speed_kmh, s.gear))
        if s.speed_kmh == 0:
            assert s.gear == 1 and s.engine_rpm == IDLE_RPM
        if s.speed_kmh > 90:
            assert s.gear == 6
        assert IDLE_RPM <= s.engine_rpm < 4500
    assert gears_seen == {1, 2, 3, 4, 5, 6}


def test_charging_stop_after_each_loop() -> None:
    model = VehicleModel(seed=5, start_time=START)
    while not model.parked:
        model.step(1.0)
        assert model.t < 2000, "never parked"
        if model.state.speed_kmh > 10:
            assert model.state.door_locked_fl
    first = model.state
    model.step(PARK_S / 2)
    mid = model.state
    assert mid.gear == GEAR_PARK and mid.engine_rpm == 0 and mid.speed_kmh == 0
    assert mid.charge_cable_connected and mid.charging and mid.battery_current_a > 0
    assert mid.battery_soc_pct > first.battery_soc_pct
    assert mid.door_locked_fl  # locked again after the driver left
    model.step(PARK_S)
    assert not model.parked and model.state.engine_running and not model.state.charge_cable_connected


def test_slow_quantities_are_plausible(drive: list[VehicleState]) -> None:
    first, last = drive[0], drive[-1]
    assert last.oil_life_remaining_s < first.oil_life_remaining_s - CYCLE_S  # time and distance both age it
    assert (
        abs(last.cabin_temp_c - 21.5) < abs(first.cabin_temp_c - 21.5) or abs(last.cabin_temp_c - 21.5) < 0.5
    )
    assert all(200 < s.tire_pressure_fl_kpa < 300 for s in drive)
    assert all(-40 < s.ambient_temp_c < 45 for s in drive)
    assert all(0 <= s.battery_soc_pct <= 100 for s in drive)
    assert last.coolant_temp_c > first.coolant_temp_c
    assert all(0 <= s.engine_load_pct <= 100 and 0 <= s.throttle_pct <= 100 for s in drive)


def test_obd_extras() -> None:
    model = VehicleModel(seed=1, start_time=START, dtcs=["P0420"])
    model.step(30)
    s = model.state
    assert s.dtcs == ("P0420",) and s.mil_on
    assert s.module_voltage_v > 13 and s.runtime_s == pytest.approx(30)
    assert s.intake_air_temp_c > s.ambient_temp_c
    assert s.distance_since_dtc_clear_km > 0


# --- CAN encoding ------------------------------------------------------------------------------------


def _collect(sim: CanSimulator, duration_s: float) -> list[can.Message]:
    return list(sim.frames(duration_s, start_time=START))


def test_every_dbc_signal_has_a_model_source(db: Database) -> None:
    for msg in db.messages:
        for sig in msg.signals:
            assert sig.is_multiplexer or sig.name in SIGNAL_SOURCES, sig.name


def test_frames_decode_back_to_the_model(db: Database) -> None:
    sim = CanSimulator(model=VehicleModel(seed=4, start_time=START))
    twin = VehicleModel(seed=4, start_time=START)
    twin_ms = 0
    vin = {}
    checked: set[str] = set()
    for frame in sim.frames(40.0, start_time=START):
        elapsed_ms = round((frame.timestamp - START) * 1000)
        tick = elapsed_ms - elapsed_ms % MODEL_TICK_MS
        if tick != twin_ms:
            twin.step((tick - twin_ms) / 1000.0)  # the same steps as the simulator, so the same floats
            twin_ms = tick
        state = twin.state
        msg = db.get_message_by_frame_id(frame.arbitration_id)
        assert frame.is_extended_id == msg.is_extended_frame
        decoded = msg.decode(frame.data, decode_choices=False)
        for name, value in decoded.items():
            sig = msg.get_signal_by_name(name)
            if sig.is_multiplexer:
                continue
            if name.startswith("VIN_Part"):
                vin[int(name[-1])] = int(value).to_bytes(7, "big")
            else:
                expected = min(max(float(SIGNAL_SOURCES[name](state)), sig.minimum), sig.maximum)
                assert value == pytest.approx(expected, abs=sig.scale / 2 + 1e-9), name
            checked.add(name)
    assert b"".join(vin[k] for k in range(3)).rstrip(b"\0").decode() == DEFAULT_VIN
    assert checked == {s.name for m in db.messages for s in m.signals if not s.is_multiplexer}


def test_frames_come_at_their_periods_in_time_order(db: Database) -> None:
    sim = CanSimulator(model=VehicleModel(seed=1, start_time=START))
    frames = _collect(sim, 10.0)
    stamps = [f.timestamp for f in frames]
    assert stamps == sorted(stamps)
    by_id: dict[int, list[float]] = defaultdict(list)
    for f in frames:
        by_id[f.arbitration_id].append(f.timestamp)
    assert len(by_id) == len(db.messages)
    for frame_id, times in by_id.items():
        period = db.get_message_by_frame_id(frame_id).cycle_time / 1000.0
        assert len(times) == round(10.0 / period)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(g == pytest.approx(period, abs=1e-6) for g in gaps), hex(frame_id)
    mux = [
        db.decode_message(f.arbitration_id, f.data, decode_choices=False)["VIN_MuxSelector"]
        for f in frames
        if f.arbitration_id == 0x4F0
    ]
    assert mux[:6] == [0, 1, 2, 0, 1, 2]


def test_two_minutes_of_the_city_loop_are_every_message_at_its_cycle_time() -> None:
    # how fast they are made is `vgw bench`'s business (a timed unit test fails on a busy machine)
    sim = CanSimulator(model=VehicleModel(seed=1, start_time=START))
    assert sum(1 for _ in sim.frames(120.0)) == 213 * 120


def test_vin_parts() -> None:
    parts = vin_parts(DEFAULT_VIN)
    assert b"".join(p.to_bytes(7, "big") for p in parts) == DEFAULT_VIN.encode() + b"\0" * 4
    with pytest.raises(ValueError):
        vin_parts("X" * 22)


def test_bad_dbc_and_message_names_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        CanSimulator(tmp_path / "missing.dbc")
    broken = tmp_path / "broken.dbc"
    broken.write_text("BO_ this is not a dbc\n")
    with pytest.raises(ConfigError, match=r"broken\.dbc"):
        CanSimulator(broken)
    with pytest.raises(ConfigError, match="NoSuchMessage"):
        CanSimulator(messages=["NoSuchMessage"])


# --- outputs -----------------------------------------------------------------------------------------


def test_virtual_bus_is_received_by_another_bus(db: Database, channel: str) -> None:
    sim = CanSimulator(model=VehicleModel(seed=2))
    with can.Bus(interface="virtual", channel=channel) as rx:
        tx = open_output("virtual", channel)
        try:
            sent = sim.run(tx, 2.0, realtime=False)
        finally:
            tx.shutdown()
        received = []
        while (msg := rx.recv(timeout=0.2)) is not None:
            received.append(msg)
    assert sent == 426 == len(received)
    for msg in received:
        db.decode_message(msg.arbitration_id, msg.data)


@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_realtime_run_stops_on_event(channel: str) -> None:
    sim = CanSimulator(model=VehicleModel(seed=2))
    stop = threading.Event()
    with (
        can.Bus(interface="virtual", channel=channel) as rx,
        can.Bus(interface="virtual", channel=channel) as tx,
    ):
        result: list[int] = []
        worker = threading.Thread(
            target=lambda: result.append(sim.run(tx, None, realtime=True, stop_event=stop))
        )
        started = time.monotonic()
        worker.start()
        time.sleep(0.5)
        stop.set()
        worker.join(timeout=5)
        assert not worker.is_alive()
        elapsed = time.monotonic() - started
        count = 0
        while rx.recv(timeout=0.05) is not None:
            count += 1
    # 213 frames/s at real pace: about 100 in half a second, never a burst of the whole schedule.
    assert 40 <= result[0] <= 213 * elapsed + 20
    assert count == result[0]


def test_record_round_trips_through_logreader(tmp_path: Path) -> None:
    sim = CanSimulator(model=VehicleModel(seed=6, start_time=START))
    expected = _collect(CanSimulator(model=VehicleModel(seed=6, start_time=START)), 5.0)
    path = tmp_path / "trace.log"
    assert sim.record(path, 5.0, start_time=START) == len(expected)
    line = re.compile(r"^\(\d+\.\d{6}\) can0 ([0-9A-F]{3}|[0-9A-F]{8})#([0-9A-F]{2})*$")
    assert all(line.match(text) for text in path.read_text().splitlines())
    back = list(can.LogReader(str(path)))
    assert len(back) == len(expected)
    for a, b in zip(expected, back, strict=True):
        assert (a.arbitration_id, a.is_extended_id, bytes(a.data)) == (
            b.arbitration_id,
            b.is_extended_id,
            bytes(b.data),
        )
        assert b.timestamp == pytest.approx(a.timestamp, abs=1e-6)
    assert any(m.is_extended_id for m in back)


def test_record_other_formats_via_can_logger(tmp_path: Path) -> None:
    sim = CanSimulator(model=VehicleModel(seed=6, start_time=START))
    path = tmp_path / "trace.asc"
    count = sim.record(path, 2.0)
    assert count == len(list(can.LogReader(str(path)))) > 0


def test_slcan_pty_protocol_in_process() -> None:
    bus = SlcanPtyBus()
    fd = os.open(bus.path, os.O_RDWR | os.O_NOCTTY)
    try:

        def ask(cmd: bytes) -> bytes:
            os.write(fd, cmd + b"\r")
            return _read_until_terminator(fd)

        assert ask(b"V") == b"V1013\r"
        assert ask(b"N") == b"NVGW1\r"
        assert ask(b"F") == b"\a"  # status only while open
        assert ask(b"S6") == b"\r" and bus.bitrate == 500_000
        assert ask(b"S9") == b"\a"
        assert ask(b"t1238DEADBEEF") == b"\a"  # channel closed
        assert ask(b"O") == b"\r" and bus.is_open
        assert ask(b"O") == b"\a"
        assert ask(b"S4") == b"\a"  # no bitrate change while open
        assert ask(b"F") == b"F00\r"
        assert ask(b"t1234DEADBEEF") == b"z\r"
        assert ask(b"T18FF01202CAFE") == b"Z\r"
        assert ask(b"t12") == b"\a"
        assert ask(b"?") == b"\a"
        first, second = bus.recv(1.0), bus.recv(1.0)
        assert first is not None and (first.arbitration_id, bytes(first.data)) == (0x123, b"\xde\xad\xbe\xef")
        assert second is not None and second.is_extended_id and second.arbitration_id == 0x18FF0120
        bus.send(can.Message(arbitration_id=0x0A5, data=b"\x0c\x30\x57", is_extended_id=False))
        bus.send(can.Message(arbitration_id=0x18FF0120, data=bytes(8), is_extended_id=True))
        assert _read_until_terminator(fd) == b"t0A530C3057\r"
        assert _read_until_terminator(fd) == b"T18FF01208" + b"00" * 8 + b"\r"
        assert ask(b"C") == b"\r" and not bus.is_open
        bus.send(can.Message(arbitration_id=0x0A5, data=b"\x00"))  # closed: nothing is written
        assert ask(b"V") == b"V1013\r"
    finally:
        os.close(fd)
        bus.shutdown()
        bus.shutdown()  # idempotent


def _read_until_terminator(fd: int, timeout: float = 2.0) -> bytes:
    import select

    out = b""
    deadline = time.monotonic() + timeout
    while not out.endswith((b"\r", b"\a")):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no reply, got {out!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            out += os.read(fd, 1)
    return out


@pytest.fixture
def sim_process() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        stop_process(p, 5)


def _vgw(*args: str) -> list[str]:
    return [sys.executable, "-m", "vgw", *args]


@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_slcan_pty_from_a_separate_process(db: Database, sim_process: list[subprocess.Popen[str]]) -> None:
    proc = subprocess.Popen(
        _vgw("sim", "can", "--interface", "slcan", "--duration", "15"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sim_process.append(proc)
    assert proc.stdout is not None
    path = proc.stdout.readline().strip()
    assert path.startswith("/dev/"), (path, proc.stderr.read() if proc.poll() is not None else "")
    bus = can.Bus(interface="slcan", channel=path, bitrate=500000)  # python-can's real slcan driver
    try:
        ids = set()
        decoded = 0
        first = bus.recv(timeout=5)
        assert first is not None
        window_end = time.monotonic() + 1.5  # every message, the slowest (1 s) included
        while time.monotonic() < window_end:
            msg = bus.recv(timeout=0.5)
            if msg is None:
                continue
            db.decode_message(msg.arbitration_id, msg.data)
            decoded += 1
            ids.add(msg.arbitration_id)
    finally:
        bus.shutdown()
    assert ids == {m.frame_id for m in db.messages}
    assert 213 * 1.5 * 0.7 < decoded < 213 * 1.5 * 1.3  # at the real pace of 213 frames/s
    proc.terminate()  # SIGTERM ends the simulator cleanly
    assert proc.wait(timeout=5) == 0


def test_cli_record(tmp_path: Path) -> None:
    trace = tmp_path / "trace.log"
    done = subprocess.run(
        _vgw("sim", "can", "--record", str(trace), "--duration", "60"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "12780 frames" in done.stderr
    assert sum(1 for _ in can.LogReader(str(trace))) == 12780


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    for args, needle in (
        (("--interface", "socketcan", "--channel", "vgwnope0"), "vgwnope0 not found"),
        (("--dbc", str(tmp_path / "nope.dbc")), "nope.dbc: DBC file not found"),
        (("--vin", "BAD"), "--vin"),
    ):
        done = subprocess.run(
            _vgw("sim", "can", *args, "--duration", "1"), cwd=REPO, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 1, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in done.stderr


def test_open_output_errors() -> None:
    with pytest.raises(ConfigError, match="unknown simulator interface"):
        open_output("udp_multicast")
    with pytest.raises(SourceOpenError, match="vgwnope0"):
        open_output("socketcan", "vgwnope0")


@pytest.mark.vcan
@pytest.mark.skipif(not os.path.exists("/sys/class/net/vcan0"), reason="no vcan0 in this kernel")
def test_socketcan_vcan0(db: Database) -> None:
    sim = CanSimulator(model=VehicleModel(seed=2))
    rx: Any = can.Bus(interface="socketcan", channel="vcan0")
    tx = open_output("socketcan", "vcan0")
    try:
        sent = sim.run(tx, 1.0, realtime=False)
        received = []
        while (msg := rx.recv(timeout=0.2)) is not None:
            received.append(msg)
    finally:
        tx.shutdown()
        rx.shutdown()
    assert sent == 213
    assert len(received) >= sent - sim.dropped
    for msg in received:
        db.decode_message(msg.arbitration_id, msg.data)


def test_drive_cycle_constants_are_sane() -> None:
    assert DRIVE_CYCLE[0][0] == 0 and all(v >= 0 and hold >= 0 for v, hold in DRIVE_CYCLE)
    assert math.isclose(
        Route().length_m,
        sum(
            haversine_m(*a, *b)
            for a, b in zip(Route().waypoints, Route().waypoints[1:] + Route().waypoints[:1], strict=False)
        ),
    )
