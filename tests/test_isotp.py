"""ISO-TP OBD on a python-can ``virtual`` bus against simulators/vgw_sim/obd_responder.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import can
import pytest
from vgw.config.settings import ObdConfig
from vgw.pipeline.obd.request import build_request
from vgw.sources.obd.isotp import IsoTpTransport
from vgw.sources.obd.poller import ObdPoller, decode_vin
from vgw_sim.obd_ecu import frozen_model
from vgw_sim.obd_responder import ObdResponder

from tests.agentkit import wait_until

VIN = "1M8GDM9AXKP042788"
NONE: frozenset[str] = frozenset()


@pytest.fixture
def responder(channel: str) -> Iterator[ObdResponder]:
    bus = can.Bus(interface="virtual", channel=channel)
    r = ObdResponder(bus, frozen_model(), realtime=False).start()
    try:
        yield r
    finally:
        r.close()
        bus.shutdown()


@pytest.fixture
def sniffer(channel: str) -> Iterator[can.BusABC]:
    bus = can.Bus(interface="virtual", channel=channel)
    try:
        yield bus
    finally:
        bus.shutdown()


@pytest.fixture
def transport(channel: str) -> Iterator[IsoTpTransport]:
    t = IsoTpTransport("virtual", channel, timeout_s=0.5)
    t.open()
    try:
        yield t
    finally:
        t.close()


def frames(bus: can.BusABC) -> list[can.Message]:
    out = []
    while (msg := bus.recv(0.05)) is not None:
        out.append(msg)
    return out


def test_single_frame_functional_request(responder: ObdResponder, transport: IsoTpTransport,
                                         sniffer: can.BusABC) -> None:
    state = responder.ecus.model.state
    answers = transport.query(build_request(0x01, [0x0D], scopes=NONE))
    assert answers == {0x7E8: bytes((0x41, 0x0D, round(state.speed_kmh))),
                       0x7E9: bytes((0x41, 0x0D, round(state.speed_kmh)))}
    sent = frames(sniffer)
    assert sent[0].arbitration_id == 0x7DF and bytes(sent[0].data[:3]) == b"\x02\x01\x0d"
    assert len(sent[0].data) == 8  # padded (ISO 15765-4)
    assert responder.requests == ["010D"]


def test_multi_frame_vin_with_flow_control(responder: ObdResponder, transport: IsoTpTransport,
                                           sniffer: can.BusABC) -> None:
    answers = transport.query(build_request(0x09, [0x02], scopes=NONE))
    assert decode_vin(answers[0x7E8]) == VIN and set(answers) == {0x7E8}
    sent = frames(sniffer)
    kinds = [(m.arbitration_id, m.data[0] >> 4) for m in sent]
    assert kinds == [(0x7DF, 0), (0x7E8, 1), (0x7E0, 3), (0x7E8, 2), (0x7E8, 2)]
    assert bytes(sent[2].data[:3]) == b"\x30\x00\x00"  # continue to send, BS 0, STmin 0


def test_multi_pid_answer_is_multi_frame(responder: ObdResponder, transport: IsoTpTransport) -> None:
    answers = transport.query(build_request(0x01, [0x0C, 0x0D, 0x05, 0x0F, 0x2F, 0xA6], scopes=NONE))
    assert len(answers[0x7E8]) == 17 and answers[0x7E8][:2] == b"\x41\x0c"
    assert answers[0x7E9] == answers[0x7E8][:1] + answers[0x7E8][4:6]  # the TCM knows only the speed


def test_responder_honours_block_size(responder: ObdResponder, channel: str) -> None:
    tester = can.Bus(interface="virtual", channel=channel)
    try:
        tester.send(can.Message(arbitration_id=0x7DF, is_extended_id=False, data=b"\x02\x09\x02" + b"\xaa" * 5))
        first = [m for m in frames(tester) if m.arbitration_id == 0x7E8]
        assert len(first) == 1 and first[0].data[0] >> 4 == 1
        got = []
        for _ in range(2):  # BS = 1: one consecutive frame per flow control
            tester.send(can.Message(arbitration_id=0x7E0, is_extended_id=False, data=b"\x30\x01\x05" + b"\xaa" * 5))
            cf = [m for m in frames(tester) if m.arbitration_id == 0x7E8]
            assert len(cf) == 1
            got.append(cf[0])
        assert [m.data[0] for m in got] == [0x21, 0x22]
    finally:
        tester.shutdown()


def test_answers_from_the_whole_response_range(channel: str, transport: IsoTpTransport) -> None:
    """ECUs on 0x7EC (multi-frame) and 0x7EF (single frame) are heard; 0x7F0 is not an OBD response id."""
    bus = can.Bus(interface="virtual", channel=channel)
    stop = threading.Event()

    def ecus() -> None:
        while not stop.is_set():
            msg = bus.recv(0.05)
            if msg is None:
                continue
            if msg.arbitration_id == 0x7DF:
                bus.send(can.Message(arbitration_id=0x7EF, is_extended_id=False, data=b"\x03\x41\x0d\x21"))
                bus.send(can.Message(arbitration_id=0x7F0, is_extended_id=False, data=b"\x03\x41\x0d\x99"))
                bus.send(can.Message(arbitration_id=0x7EC, is_extended_id=False,
                                     data=b"\x10\x08\x41\x00\xbe\x3f\xa8\x13"))
            elif msg.arbitration_id == 0x7E4 and msg.data[0] == 0x30:
                bus.send(can.Message(arbitration_id=0x7EC, is_extended_id=False,
                                     data=b"\x21\x0d\x22\xaa\xaa\xaa\xaa\xaa"))

    t = threading.Thread(target=ecus, daemon=True)
    t.start()
    try:
        answers = transport.query(build_request(0x01, [0x00, 0x0D], scopes=NONE))
    finally:
        stop.set()
        t.join(2)
        bus.shutdown()
    assert answers == {0x7EF: b"\x41\x0d\x21", 0x7EC: b"\x41\x00\xbe\x3f\xa8\x13\x0d\x22"}


@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_no_answer_is_empty_not_an_error(transport: IsoTpTransport) -> None:
    start = time.monotonic()
    assert transport.query(build_request(0x01, [0x0D], scopes=NONE)) == {}
    assert time.monotonic() - start < 1.0


def test_poller_over_isotp_respects_consent(responder: ObdResponder, channel: str) -> None:
    samples: list[Any] = []
    stop = threading.Event()
    cfg = ObdConfig(port=channel, transport="isotp", can_interface="virtual", can_channel=channel,
                    interval_s=0.1, timeout_s=0.3)
    poller = ObdPoller(cfg, wanted_scopes=lambda: frozenset({"read_speedometer", "read_vin"}), sink=samples.extend,
                       stop=stop, backoff_min_s=0.1)
    poller.start()
    try:
        wait_until(lambda: {"Vehicle.Speed", "Vehicle.VehicleIdentification.VIN"} <= {s[0] for s in samples}, 5)
    finally:
        stop.set()
        poller.join(5)
    assert {s[0] for s in samples} == {"Vehicle.Speed", "Vehicle.VehicleIdentification.VIN"}
    assert ("Vehicle.VehicleIdentification.VIN", "read_vin") in {(s[0], s[1]) for s in samples}
    data = [r for r in responder.requests if r.startswith("01") and int(r[2:4], 16) % 0x20]
    assert data and set(data) == {"010D"}
    assert {r[:2] for r in responder.requests} == {"01", "09"}
