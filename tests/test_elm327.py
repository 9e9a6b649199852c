"""The ELM327 client and the poller against the ELM327 simulator over real ptys and real TCP sockets.

Covers the init sequence, protocol fallback, every fault scenario, reconnect after unplug, clone adapters,
the supported-PID bitmaps, <= 6 PIDs per request, the multi-frame VIN, DTCs, the consent filter (asserted
on the simulator's request log) and the safety choke point (every service 0x00-0xFF).
"""

from __future__ import annotations

import ast
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from vgw.base.errors import SourceOpenError
from vgw.config.settings import ObdConfig
from vgw.contract.scopes import SCOPES
from vgw.pipeline.obd.pids import PIDS
from vgw.pipeline.obd.request import ForbiddenRequest, ObdRequest, build_request
from vgw.sources.obd.elm327 import Elm327, parse_answer
from vgw.sources.obd.poller import ObdPoller, decode_vin
from vgw_sim.elm327_sim import Elm327Simulator
from vgw_sim.obd_ecu import frozen_model

from tests.agentkit import wait_until

ALL = frozenset(SCOPES)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_sim() -> Iterator[Callable[..., tuple[Elm327Simulator, str]]]:
    """Factory: (simulator, port) over a pty, or over TCP with ``tcp=True``; all closed after the test."""
    sims: list[Elm327Simulator] = []

    def make(*, tcp: bool = False, **kwargs: Any) -> tuple[Elm327Simulator, str]:
        kwargs.setdefault("realtime", False)
        kwargs.setdefault("model", frozen_model())
        sim = Elm327Simulator(**kwargs)
        sims.append(sim)
        port = f"socket://127.0.0.1:{sim.open_tcp()}" if tcp else sim.open_pty()
        return sim, port

    yield make
    for sim in sims:
        sim.close()


class Run:
    """A running poller collecting samples; stopped by the fixture."""

    def __init__(self, port: str, scopes: frozenset[str], **cfg: Any) -> None:
        self.scopes = scopes
        self.samples: list[tuple[str, str, float, Any]] = []
        self.stop = threading.Event()
        cfg.setdefault("timeout_s", 0.5)
        cfg.setdefault("interval_s", 0.1)
        self.poller = ObdPoller(ObdConfig(port=port, **cfg), wanted_scopes=lambda: self.scopes,
                                sink=self.samples.extend, stop=self.stop, backoff_min_s=0.1, backoff_max_s=0.3,
                                slow_interval_s=0.5)
        self.poller.start()

    def paths(self) -> set[str]:
        return {s[0] for s in list(self.samples)}

    def close(self) -> None:
        self.stop.set()
        self.poller.join(5)
        assert not self.poller.is_alive()


@pytest.fixture
def run_poller() -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(port: str, scopes: frozenset[str] = ALL, **cfg: Any) -> Run:
        r = Run(port, scopes, **cfg)
        runs.append(r)
        return r

    yield start
    for r in runs:
        r.close()


def service01_pids(requests: list[str]) -> list[bytes]:
    return [bytes.fromhex(r)[1:] for r in requests if r.startswith("01")]


# ---------------------------------------------------------------- init and protocols


@pytest.mark.parametrize("tcp", [False, True], ids=["pty", "tcp"])
def test_init_sequence(make_sim: Any, tcp: bool) -> None:
    sim, port = make_sim(tcp=tcp)
    elm = Elm327(port, timeout_s=1.0)
    try:
        elm.open()
        assert sim.commands[-10:] == ["ATZ", "ATE0", "ATL0", "ATS0", "ATH1", "ATAT1", "ATI", "ATSP0", "0100", "ATDPN"]
        assert elm.version == "ELM327 v1.5" and not elm.clone and elm.protocol == "6" and elm.is_can
        answers = elm.query(build_request(0x01, [0x0D], scopes=frozenset()))
        assert sorted(answers) == [0x7E8, 0x7E9]  # two ECUs, told apart by their headers
        assert answers[0x7E8][:2] == b"\x41\x0d"
    finally:
        elm.close()


@pytest.mark.parametrize(("car", "tried"), [("8", ["6", "8"]), ("9", ["6", "8", "1", "7", "9"]),
                                            ("3", ["6", "8", "1", "7", "9", "2", "3"])])
def test_protocol_fallback(make_sim: Any, car: str, tried: list[str]) -> None:
    sim, port = make_sim(scenario="no-auto", car_protocol=car)
    elm = Elm327(port, timeout_s=1.0)
    try:
        elm.open()
        assert [c[4:] for c in sim.commands if c.startswith("ATSP")] == ["0", *tried]
        assert elm.protocol == car
        vin = decode_vin(elm.query(build_request(0x09, [0x02], scopes=frozenset()))[
            0x7E8 if car == "8" else 0x18DAF110 if car == "9" else 0x10])
        assert vin == "1M8GDM9AXKP042788"
    finally:
        elm.close()


def test_explicit_protocol_and_kline_one_pid_per_request(make_sim: Any, run_poller: Any) -> None:
    sim, port = make_sim(car_protocol="3")
    run = run_poller(port, protocol="3")
    assert wait_until(lambda: "Vehicle.TraveledDistance" in run.paths())
    assert "ATSP3" in sim.commands and "ATSP0" not in sim.commands
    assert all(len(p) == 1 for p in service01_pids(sim.requests))


# ---------------------------------------------------------------- values


def expected_values(state: Any) -> dict[str, Any]:
    """What J1979 resolution makes of the model's state."""
    def pct(x: float) -> float:
        return round(round(x * 255 / 100) * 100 / 255, 2)

    return {
        "Vehicle.Speed": round(state.speed_kmh),
        "Vehicle.Powertrain.CombustionEngine.Speed": round(state.engine_rpm * 4) / 4,
        "Vehicle.Powertrain.CombustionEngine.EngineCoolant.Temperature": round(state.coolant_temp_c),
        "Vehicle.OBD.IntakeTemp": round(state.intake_air_temp_c),
        "Vehicle.Exterior.AirTemperature": round(state.ambient_temp_c),
        "Vehicle.Powertrain.FuelSystem.RelativeLevel": pct(state.fuel_level_pct),
        "Vehicle.TraveledDistance": round(state.odometer_km * 10) / 10,
        "Vehicle.OBD.DistanceSinceDTCClear": round(state.distance_since_dtc_clear_km),
        "Vehicle.OBD.HybridBatteryRemaining": pct(state.battery_soc_pct),
        "Vehicle.OBD.ControlModuleVoltage": round(state.module_voltage_v * 1000) / 1000,
        "Vehicle.OBD.EngineLoad": pct(state.engine_load_pct),
        "Vehicle.OBD.ThrottlePosition": pct(state.throttle_pct),
        "Vehicle.OBD.RunTime": round(state.runtime_s),
        "Vehicle.OBD.Status.IsMILOn": state.mil_on,
        "Vehicle.VehicleIdentification.VIN": state.vin,
        "Vehicle.OBD.DTCList": list(state.dtcs),
        "Vehicle.OBD.PendingDTCList": ["P0301"],
    }


@pytest.mark.parametrize(("car", "tcp"), [("6", False), ("7", True), ("3", False)], ids=["can11-pty", "can29-tcp",
                                                                                        "kline-pty"])
def test_every_pid_decoded_from_the_model(make_sim: Any, run_poller: Any, car: str, tcp: bool) -> None:
    model = frozen_model()
    _sim, port = make_sim(model=model, car_protocol=car, tcp=tcp)
    run = run_poller(port)
    want = expected_values(model.state)
    assert wait_until(lambda: run.paths() >= set(want)), set(want) - run.paths()
    got = {path: value for path, _scope, _t, value in run.samples}
    for path, value in want.items():
        assert got[path] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), path
    scopes = {path: scope for path, scope, _t, _v in run.samples}
    assert scopes["Vehicle.VehicleIdentification.VIN"] == "read_vin"
    assert scopes["Vehicle.OBD.DTCList"] == "read_diagnostics"
    assert {p.path: p.scope for p in PIDS}.items() <= scopes.items()
    assert all(abs(t - time.time()) < 10 for _p, _s, t, _v in run.samples)  # Unix time of the answer


def test_vin_multiframe_with_and_without_headers(make_sim: Any) -> None:
    _sim, port = make_sim()
    elm = Elm327(port, timeout_s=1.0)
    try:
        elm.open()
        req = build_request(0x09, [0x02], scopes=frozenset())
        assert decode_vin(elm.query(req)[0x7E8]) == "1M8GDM9AXKP042788"
        elm.at("ATH0")
        elm.headers = False
        answers = elm.query(req)
        assert decode_vin(answers[0]) == "1M8GDM9AXKP042788"
        assert elm.query(build_request(0x03, [], scopes=frozenset({"read_diagnostics"})))[0] == b"\x43\x01\x04\x20"
    finally:
        elm.close()


def test_parse_answer_forms() -> None:
    # Errors are "no value", never an exception.
    for err in ("NO DATA", "?", "CAN ERROR", "UNABLE TO CONNECT", "BUS INIT: ...ERROR", "STOPPED", "BUFFER FULL",
                "SEARCHING...", "<DATA ERROR", "ERR94"):
        assert parse_answer([err], protocol="6", headers=True) == {}
        assert parse_answer(["SEARCHING...", err], protocol=None, headers=False) == {}
    # Spaces on, 29-bit headers, padding after the PCI length ignored.
    assert parse_answer(["18 DA F1 10 03 41 0D 32 AA AA AA AA"], protocol="7", headers=True) == {
        0x18DAF110: b"\x41\x0d\x32"}
    # A lost consecutive frame drops the message.
    assert parse_answer(["7E8 10 14 49 02 01 31 4D 38", "7E8 22 50 30 34 32 37 38 38"], protocol="6",
                        headers=True) == {}
    # K-line with headers: header and checksum stripped; the protocol guessed when unknown.
    assert parse_answer(["48 6B 10 41 0D 32 EB"], protocol=None, headers=True) == {0x10: b"\x41\x0d\x32"}
    assert parse_answer(["7E803410D32AAAAAAAA"], protocol=None, headers=True) == {0x7E8: b"\x41\x0d\x32"}


# ---------------------------------------------------------------- fault scenarios


def test_engine_off_then_start(make_sim: Any, run_poller: Any) -> None:
    sim, port = make_sim(scenario="engine-off")
    with pytest.raises(SourceOpenError, match="no ECU answered"):
        elm = Elm327(port, timeout_s=0.5)
        try:
            elm.open()
        finally:
            elm.close()
    run = run_poller(port, frozenset({"read_speedometer"}))
    time.sleep(0.5)
    assert run.poller.is_alive() and run.samples == []
    sim.set_scenario("normal")
    assert wait_until(lambda: "Vehicle.Speed" in run.paths())


@pytest.mark.parametrize("tcp", [False, True], ids=["pty", "tcp"])
def test_reconnect_after_unplug(make_sim: Any, run_poller: Any, tcp: bool) -> None:
    sim, port = make_sim(tcp=tcp)
    run = run_poller(port, frozenset({"read_speedometer"}))
    assert wait_until(lambda: run.poller.connected.is_set() and bool(run.samples))
    sim.unplug()
    assert wait_until(lambda: not run.poller.connected.is_set())
    n = len(run.samples)
    time.sleep(0.6)
    assert run.poller.is_alive() and len(run.samples) == n  # silence: nothing to decode, no crash
    resets = sim.resets
    sim.replug()
    assert wait_until(lambda: len(run.samples) > n)
    assert sim.resets > resets  # re-initialised after the replug (the adapter lost its settings)
    assert run.poller.counters["reconnects"] >= 2


def test_unplugged_at_start(make_sim: Any, run_poller: Any) -> None:
    sim, port = make_sim(scenario="unplugged")
    run = run_poller(port, frozenset({"read_speedometer"}))
    time.sleep(0.8)
    assert run.poller.is_alive() and not run.samples and sim.commands == []
    sim.replug()
    assert wait_until(lambda: bool(run.samples))


def test_clone_adapter(make_sim: Any, run_poller: Any) -> None:
    _sim, port = make_sim(scenario="clone")
    elm = Elm327(port, timeout_s=1.0)
    try:
        elm.open()
        assert elm.clone and {"ATS0", "ATDPN", "ATAT1"} <= elm.rejected
        assert elm.version == "ELM327 v2.1" and elm.protocol == "6"  # from ATDP instead of ATDPN
    finally:
        elm.close()
    run = run_poller(port)
    assert wait_until(lambda: {"Vehicle.Speed", "Vehicle.VehicleIdentification.VIN"} <= run.paths())


def test_slow_adapter(make_sim: Any, run_poller: Any) -> None:
    _sim, port = make_sim(scenario="slow", slow_s=0.2)
    run = run_poller(port, frozenset({"read_speedometer"}), timeout_s=1.5)
    assert wait_until(lambda: "Vehicle.Speed" in run.paths(), timeout=8)
    assert run.poller.counters["reconnects"] == 1  # slow is not dead


def test_no_baud_probe_where_baud_means_nothing(make_sim: Any) -> None:
    """A pty (or a socket, or rfcomm) has no baud rate: the client goes straight to ATZ.

    The probe itself, on a serial line, is in test_obd_deadlines.py (detect_baud=True on a pty).
    """
    sim, port = make_sim()
    elm = Elm327(port, timeout_s=1.0)  # baudrate None
    try:
        elm.open()
        assert elm.baudrate is None
        assert sim.commands[0] == "ATZ"
    finally:
        elm.close()


# ---------------------------------------------------------------- bitmaps, batching, consent


def test_supported_pid_bitmaps_respected_and_six_per_request(make_sim: Any, run_poller: Any) -> None:
    sim, port = make_sim(unsupported={0x5B, 0x0F, 0xA6})
    run = run_poller(port)
    assert wait_until(lambda: "Vehicle.Speed" in run.paths() and run.poller.counters["cycles"] >= 2)
    polled = service01_pids(sim.requests)
    flat = {p for req in polled for p in req}
    assert not flat & {0x5B, 0x0F, 0xA6}
    assert "0140" in sim.requests and "0160" not in sim.requests  # without A6 the 0x40 bitmap ends the walk
    assert all(1 <= len(req) <= 6 for req in polled)
    assert any(len(req) == 6 for req in polled)
    assert not {"Vehicle.OBD.HybridBatteryRemaining", "Vehicle.TraveledDistance"} & run.paths()


def test_configured_pids_only(make_sim: Any, run_poller: Any) -> None:
    sim, port = make_sim()
    run = run_poller(port, pids=("speed", "0x2F"))
    assert wait_until(lambda: run.poller.counters["cycles"] >= 2)
    data = [r for r in service01_pids(sim.requests) if r[0] % 0x20]  # skip the bitmap reads
    assert {p for r in data for p in r} == {0x0D, 0x2F}
    assert run.paths() == {"Vehicle.Speed", "Vehicle.Powertrain.FuelSystem.RelativeLevel"}
    assert not [r for r in sim.requests if not r.startswith("01")]  # no VIN, no DTCs: not configured


def test_consent_filter_on_the_request_log(make_sim: Any, run_poller: Any) -> None:
    sim, port = make_sim()
    run = run_poller(port, frozenset({"read_speedometer"}))
    assert wait_until(lambda: run.poller.counters["cycles"] >= 3)
    data = [r for r in service01_pids(sim.requests) if r[0] % 0x20]
    assert data and all(r == b"\x0d" for r in data)
    assert not [r for r in sim.requests if not r.startswith("01")]  # no VIN, no DTCs without their scope
    assert run.paths() == {"Vehicle.Speed"}

    run.scopes = frozenset()  # everything revoked: poll nothing
    time.sleep(0.3)
    before = len(sim.requests)
    time.sleep(0.5)
    assert len(sim.requests) == before

    run.scopes = frozenset({"read_fuel", "read_vin"})
    assert wait_until(lambda: "0902" in sim.requests[before:] and "012F" in sim.requests[before:])
    later = sim.requests[before:]
    assert set(later) <= {"012F", "0902"}


def test_nothing_requested_without_any_grant(make_sim: Any, run_poller: Any) -> None:
    sim, port = make_sim()
    run = run_poller(port, frozenset())
    time.sleep(0.5)
    assert sim.commands == [] and run.samples == []  # not even opened


# ---------------------------------------------------------------- safety


def test_choke_point_every_service() -> None:
    for service in range(0x100):
        for scopes, allowed in ((ALL, {0x01, 0x03, 0x07, 0x09}), (frozenset(), {0x01, 0x09}),
                                (ALL - {"read_diagnostics"}, {0x01, 0x09})):
            args = [0x00] if service in (0x01, 0x09) else []
            if service in allowed:
                assert build_request(service, args, scopes=scopes).service == service
            else:
                with pytest.raises(ForbiddenRequest):
                    build_request(service, args, scopes=scopes)
                for extra in ([], [0x00], [0x01, 0x02]):  # no argument shape makes a forbidden service pass
                    with pytest.raises(ForbiddenRequest):
                        build_request(service, extra, scopes=scopes)


def test_choke_point_shapes() -> None:
    with pytest.raises(ForbiddenRequest):
        build_request(0x01, range(7), scopes=ALL)  # > 6 PIDs
    with pytest.raises(ForbiddenRequest):
        build_request(0x01, [], scopes=ALL)
    with pytest.raises(ForbiddenRequest):
        build_request(0x09, [0x02, 0x04], scopes=ALL)
    with pytest.raises(ForbiddenRequest):
        build_request(0x03, [0x04], scopes=ALL)
    with pytest.raises(ForbiddenRequest):
        build_request(0x01, [0x100], scopes=ALL)
    with pytest.raises(ForbiddenRequest):
        build_request(0x104, [], scopes=ALL)  # not a byte: cannot alias 0x04
    for payload in (b"\x04", b"\x08\x01", b"\x14\xff\xff\xff", b"\x11\x01", b"\x27\x01", b"\x2e\xf1\x90"):
        with pytest.raises(ForbiddenRequest):
            ObdRequest(payload)  # cannot be made without the choke point's token
        with pytest.raises(ForbiddenRequest):
            ObdRequest(payload, object())


def test_transports_send_only_checked_requests(make_sim: Any) -> None:
    sim, port = make_sim()
    elm = Elm327(port, timeout_s=1.0)
    try:
        elm.open()
        for raw in ("04", "0400", "08", "1101", "2701", "14FFFFFF"):
            with pytest.raises(ValueError, match="not an AT command"):
                elm.at(raw)
            with pytest.raises(TypeError):
                elm.query(raw)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            elm.query(b"\x04")  # type: ignore[arg-type]
    finally:
        elm.close()
    assert not [r for r in sim.requests if r[:2] not in ("01", "09")]


def test_no_code_path_sends_a_forbidden_service(make_sim: Any, run_poller: Any) -> None:
    """With every scope granted, a long poll (and reconnects) only ever sends 01, 09, 03 and 07."""
    sim, port = make_sim()
    run = run_poller(port)
    assert wait_until(lambda: run.poller.counters["cycles"] >= 3 and "07" in sim.requests)
    sim.unplug()
    time.sleep(0.5)
    sim.replug()
    assert wait_until(lambda: run.poller.counters["reconnects"] >= 2)
    services = {r[:2] for r in sim.requests}
    assert services == {"01", "09", "03", "07"}
    assert not sim.ecus.cleared  # the car's codes were never cleared


def test_no_module_makes_requests_around_the_choke_point() -> None:
    """Static check: only agent/vgw/pipeline/obd/request.py constructs ObdRequest; no literal service 04/08 request."""
    forbidden_text = re.compile(r"^(04|08|10|11|14|22|27|2E|2F|31|34|3E|85)[0-9A-F]*$")
    for path in (ROOT / "agent").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name == "ObdRequest":
                    assert path.name == "request.py", f"{path}: builds an ObdRequest itself"
                if name == "build_request" and node.args and isinstance(node.args[0], ast.Constant):
                    assert node.args[0].value in (0x01, 0x09), f"{path}:{node.lineno}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and path.parent.name == "obd":
                text = node.value.upper().replace(" ", "")
                if len(text) >= 2 and forbidden_text.match(text):
                    pytest.fail(f"{path}:{node.lineno}: literal {node.value!r} looks like a forbidden request")


@pytest.mark.parametrize("tcp", [False, True], ids=["pty", "tcp"])
def test_sim_elm327_says_which_obd_lines_make_the_agent_read_it(tcp: bool) -> None:
    """Like `vgw sim can`, the ELM327 simulator prints on stderr the [obd] lines to paste into the config."""
    import subprocess
    import sys
    import tomllib

    from vgw.config.settings import ObdConfig

    proc = subprocess.Popen([sys.executable, "-m", "vgw", "sim", "elm327", *(["--tcp"] if tcp else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        where = proc.stdout.readline().strip()
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
    said = err.splitlines(keepends=True)[:3]
    assert "put into [obd]" in said[0], said
    snippet = tomllib.loads("".join(said[1:]))
    assert snippet == {"port": where, "protocol": "auto"}
    assert set(snippet) <= {f for f in ObdConfig.__dataclass_fields__}
