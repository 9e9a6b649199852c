"""Deadlines that hold on hostile hardware: ELM327 adapters that never stop talking, ECUs that chatter.

Real ptys and TCP sockets against the ELM327 simulator's hostile scenarios (``endless``, ``drip``,
``flood``, ``echo-probe``), a python-can virtual bus for ISO-TP, and a real agent process whose
``vgw status`` shows OBD health. See docs/obd.md, "Deadlines".
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import can
import psutil
import pytest
from vgw.config.settings import ObdConfig
from vgw.pipeline.obd.request import build_request
from vgw.sources.obd.elm327 import MAX_ANSWER_BYTES, AnswerTimeout, AnswerTooLong, Elm327, baud_matters
from vgw.sources.obd.isotp import IsoTpTransport
from vgw.sources.obd.poller import ObdPoller
from vgw_sim.cloud import CloudPeer
from vgw_sim.elm327_sim import Elm327Simulator
from vgw_sim.obd_ecu import frozen_model

from tests.agentkit import Authority, agent_process, vgw, wait_until, write_config

SPEED = build_request(0x01, [0x0D], scopes=frozenset())
NONE: frozenset[str] = frozenset()


@pytest.fixture
def make_sim() -> Iterator[Callable[..., tuple[Elm327Simulator, str]]]:
    sims: list[Elm327Simulator] = []

    def make(*, tcp: bool = False, **kwargs: Any) -> tuple[Elm327Simulator, str]:
        kwargs.setdefault("realtime", False)
        kwargs.setdefault("model", frozen_model())
        sim = Elm327Simulator(**kwargs)
        sims.append(sim)
        return sim, (f"socket://127.0.0.1:{sim.open_tcp()}" if tcp else sim.open_pty())

    yield make
    for sim in sims:
        sim.close()


def timed(fn: Callable[[], Any], limit: float, on_overrun: Callable[[], None]) -> tuple[float, Any]:
    """Run ``fn`` in a thread; (seconds taken, result or exception). Past ``limit`` call ``on_overrun``
    (which must unblock ``fn``, e.g. close the simulator) and fail: a deadline that does not hold."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(limit)
    took = time.monotonic() - start
    if t.is_alive():
        on_overrun()
        t.join(30)
        pytest.fail(f"still running after {limit:g} s: the deadline did not hold")
    return took, out[0]


# ---------------------------------------------------------------- ELM327: an absolute deadline per exchange


@pytest.mark.parametrize(("scenario", "tcp"), [("endless", False), ("endless", True), ("drip", False)],
                         ids=["endless-pty", "endless-tcp", "drip-pty"])
@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_query_returns_by_its_deadline_while_bytes_keep_arriving(make_sim: Any, scenario: str, tcp: bool) -> None:
    sim, port = make_sim(tcp=tcp)
    elm = Elm327(port, timeout_s=0.6)
    try:
        elm.open()
        sim.set_scenario(scenario)
        took, result = timed(lambda: elm.query(SPEED), 3.0, sim.close)
        assert isinstance(result, AnswerTimeout), result
        assert took < 0.6 + 0.8  # the deadline, one read timeout and a busy machine; never the stream
        assert "no prompt within 0.6 s after 010D" in str(result)
    finally:
        elm.close()


@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_a_20_mb_answer_is_cut_off_at_the_cap_in_bounded_time_and_memory(make_sim: Any) -> None:
    sim, port = make_sim()
    elm = Elm327(port, timeout_s=5.0)
    proc = psutil.Process()
    try:
        elm.open()
        sim.set_scenario("flood")  # 20 MB of hex digits on one line, then a prompt
        rss_before = proc.memory_info().rss
        took, result = timed(lambda: elm.query(SPEED), 10.0, sim.close)
        grew = proc.memory_info().rss - rss_before
        assert isinstance(result, AnswerTooLong), result
        assert f"longer than {MAX_ANSWER_BYTES} bytes" in str(result)
        assert took < 2.0  # not the 5 s deadline: the cap stops it first
        assert grew < 8 * 1024 * 1024
    finally:
        elm.close()


def test_poller_reconnects_after_a_hostile_answer_and_health_says_so(make_sim: Any) -> None:
    sim, port = make_sim()
    samples: list[Any] = []
    stop = threading.Event()
    poller = ObdPoller(ObdConfig(port=port, timeout_s=0.5, interval_s=0.1),
                       wanted_scopes=lambda: frozenset({"read_speedometer"}), sink=samples.extend, stop=stop,
                       backoff_min_s=0.1, backoff_max_s=0.3)
    poller.start()
    try:
        assert wait_until(lambda: bool(samples) and poller.health()["state"] == "connected")
        assert poller.health()["ok"] is True
        sim.set_scenario("drip")
        assert wait_until(lambda: not poller.health()["ok"])
        health = poller.health()
        assert health["state"] == "failing" and "no prompt within" in health["last_error"]
        assert health["counters"]["timeouts"] >= 1
        n = len(samples)
        sim.set_scenario("normal")
        assert wait_until(lambda: len(samples) > n and poller.health()["ok"])
        assert poller.health()["counters"]["reconnects"] >= 2  # the session was dropped and opened again
    finally:
        stop.set()
        poller.join(5)
    assert not poller.is_alive()


# ---------------------------------------------------------------- interop: the baud probe


def test_an_adapter_that_echoes_the_baud_probe_connects_on_a_pty(make_sim: Any) -> None:
    """On a pty the baud rate means nothing: no probe at all (python-OBD connects to the same device)."""
    sim, port = make_sim(scenario="echo-probe")
    elm = Elm327(port, timeout_s=0.5)
    try:
        elm.open()
        assert elm.protocol == "6"
        assert sim.commands[0] == "ATZ"  # straight to the initialisation
    finally:
        elm.close()


def test_baud_probe_falls_back_to_ati_when_the_probe_gets_no_prompt(make_sim: Any) -> None:
    sim, port = make_sim(scenario="echo-probe")
    elm = Elm327(port, timeout_s=0.5, detect_baud=True)  # as on a real serial line
    try:
        elm.open()
        assert elm.baudrate == 38400 and elm.protocol == "6"
        assert sim.commands[:2] == ["ATI", "ATZ"]  # the \x7f\x7f probe went unanswered; ATI answered
    finally:
        elm.close()


def test_baud_probe_on_a_well_behaved_adapter(make_sim: Any) -> None:
    sim, port = make_sim()
    elm = Elm327(port, timeout_s=0.5, detect_baud=True)
    try:
        elm.open()
        assert elm.baudrate == 38400
        assert sim.commands[:2] == ["\x7f\x7f".upper(), "ATZ"]
    finally:
        elm.close()


def test_baud_matters_only_on_a_real_serial_line(make_sim: Any, tmp_path: Path) -> None:
    _sim, pty = make_sim()
    assert not baud_matters(pty)
    link = tmp_path / "elm"
    link.symlink_to(pty)
    assert not baud_matters(str(link))  # a by-id style link to a pty
    assert not baud_matters("socket://127.0.0.1:35000")
    assert not baud_matters("/dev/rfcomm0")
    assert baud_matters("/dev/null")  # a character device that is neither a pty nor rfcomm


# ---------------------------------------------------------------- ISO-TP: absolute deadline, one FC per ECU


class ChatteringEcus:
    """ECUs on ``channel`` that answer every request with first frames, again and again, never finishing."""

    def __init__(self, channel: str, ids: tuple[int, ...], period_s: float = 0.005, run_s: float = 4.0) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.ids = ids
        self.period_s = period_s
        self.run_s = run_s
        self.flow_controls: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        chattering_until = 0.0
        while not self._stop.is_set():
            msg = self.bus.recv(self.period_s)
            if msg is not None and msg.arbitration_id == 0x7DF:
                chattering_until = time.monotonic() + self.run_s
            elif msg is not None and msg.data and msg.data[0] >> 4 == 3:
                self.flow_controls[msg.arbitration_id] = self.flow_controls.get(msg.arbitration_id, 0) + 1
            if time.monotonic() < chattering_until:
                for ecu in self.ids:
                    self.bus.send(can.Message(arbitration_id=ecu, is_extended_id=False,
                                              data=b"\x10\x14\x49\x02\x01\x31\x4d\x38"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.bus.shutdown()


@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_isotp_repeated_first_frames_cannot_move_the_deadline_or_flood_flow_controls(channel: str) -> None:
    ecus = ChatteringEcus(channel, (0x7E8, 0x7E9))
    transport = IsoTpTransport("virtual", channel, timeout_s=0.5)
    transport.open()
    try:
        took, result = timed(lambda: transport.query(build_request(0x09, [0x02], scopes=NONE)), 8.0, ecus.close)
        assert result == {}  # no message ever completed
        assert took < 0.5 + 0.6
        assert wait_until(lambda: sum(ecus.flow_controls.values()) >= 2, 2.0)
        time.sleep(0.2)  # let any late flow control arrive before counting (a negative assertion)
        assert ecus.flow_controls == {0x7E0: 1, 0x7E1: 1}  # one per ECU per exchange
    finally:
        transport.close()
        ecus.close()


@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_isotp_a_chattering_ecu_does_not_stop_the_others_answering(channel: str) -> None:
    """0x7EA floods first frames; the real ECU on 0x7E8 still answers within the same deadline."""
    ecus = ChatteringEcus(channel, (0x7EA,))
    good = can.Bus(interface="virtual", channel=channel)
    stop = threading.Event()

    def ecu() -> None:
        while not stop.is_set():
            msg = good.recv(0.05)
            if msg is not None and msg.arbitration_id == 0x7DF:
                good.send(can.Message(arbitration_id=0x7E8, is_extended_id=False, data=b"\x03\x41\x0d\x32"))

    t = threading.Thread(target=ecu, daemon=True)
    t.start()
    transport = IsoTpTransport("virtual", channel, timeout_s=0.5)
    transport.open()
    try:
        took, result = timed(lambda: transport.query(SPEED), 8.0, ecus.close)
        assert result == {0x7E8: b"\x41\x0d\x32"} and took < 0.5 + 0.6
    finally:
        transport.close()
        stop.set()
        t.join(2)
        good.shutdown()
        ecus.close()


# ---------------------------------------------------------------- OBD health in `vgw status`


def test_vgw_status_shows_obd_failing_then_recovered(tmp_path: Path, pki: Any, broker: Any, cloud: CloudPeer) -> None:
    auth = Authority(tmp_path)
    sim = Elm327Simulator(model=frozen_model(), realtime=False)
    try:
        cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                           obd={"port": sim.open_pty(), "interval_s": 0.2, "timeout_s": 0.5})

        def obd_status() -> dict[str, Any]:
            return json.loads(vgw("status", "--config", str(cfg), "--json").stdout).get("obd") or {}

        with agent_process(cfg) as proc:
            assert cloud.wait_for(lambda: (cloud.status("dev-0001") or {}).get("device") == "dev-0001", 15)
            assert wait_until(lambda: obd_status().get("state") == "idle", 10)  # no grant: adapter closed
            cloud.publish_consent("dev-0001", auth.doc("dev-0001", {"g-speed": ["read_speedometer"]}))
            assert wait_until(lambda: obd_status().get("state") == "connected", 15)
            sim.set_scenario("drip")
            assert wait_until(lambda: obd_status().get("ok") is False, 15)
            failing = obd_status()
            assert failing["state"] == "failing" and "no prompt within" in failing["last_error"]
            text = vgw("status", "--config", str(cfg)).stdout
            assert "obd: failing (FAILING: ELM327 at" in text
            sim.set_scenario("normal")
            assert wait_until(lambda: obd_status().get("ok") is True, 15)
            assert proc.poll() is None
    finally:
        sim.close()

