"""SAE J1939 (README "SAE J1939"): identifiers and route keys, the signal map's ``source_address``, the
transport reassembler (TP.BAM, passive TP.CMDT, timeouts, bounds; fuzzed), DM1/VIN/component
identification, routing by PGN value-exact against cantools, and the J1939 truck end to end through the
real broker."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vgw.base.errors import ConfigError
from vgw.config.settings import load_config
from vgw.contract.consent.model import Grant, Recipient
from vgw.pipeline.catalogue import catalogue_from_map, load_catalogue, load_dbc
from vgw.pipeline.j1939 import ids
from vgw.pipeline.j1939.ids import GLOBAL, PGN_TP_CM, PGN_TP_DT, make_id, parse
from vgw.pipeline.j1939.messages import (
    COMPONENT_PATH,
    DM1_PATH,
    VIN_PATH,
    encode_dm1,
    parse_component_id,
    parse_dm1,
    parse_vin,
)
from vgw.pipeline.j1939.request import Requester
from vgw.pipeline.j1939.transport import (
    CM_ABORT,
    CM_BAM,
    CM_CTS,
    CM_EOMA,
    CM_RTS,
    MAX_SESSIONS,
    MAX_SESSIONS_PER_SOURCE,
    MAX_SIZE,
    T1_S,
    Reassembler,
    bam_deadline_s,
)
from vgw.pipeline.router import Pipeline
from vgw.sources.canbus import BusSource
from vgw_sim.can_sim import open_output
from vgw_sim.j1939_sim import COMPONENT_ID, DM1_OFFSET_S, ENGINE, SECOND_ENGINE, J1939Responder, J1939Simulator
from vgw_sim.paths import dbc_dir
from vgw_sim.vehicle import VehicleModel

from tests.agentkit import AgentThread, Authority, vgw, write_config

TRUCK_DBC = dbc_dir() / "truck_j1939.dbc"
TRUCK_MAP = dbc_dir() / "truck_j1939_signals.toml"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dbc" / "cantools"
DEV = "dev-0001"


def _grant(scopes: list[str], gid: str = "g") -> Grant:
    return Grant(gid, "c", "p", tuple(scopes), Recipient("X25519", b"\x09" * 32), {})


# -- identifiers ---------------------------------------------------------------------------------------

def test_identifier_fields_pdu1_and_pdu2() -> None:
    eec1 = parse(0x0CF00400)
    assert (eec1.priority, eec1.pgn, eec1.destination, eec1.source) == (3, 61444, GLOBAL, 0)
    req = parse(0x18EA00F9)  # request PGN 59904 from 0xF9 to 0x00: PDU1, PS is the destination
    assert (req.pgn, req.destination, req.source, req.pdu1) == (0xEA00, 0x00, 0xF9, True)
    assert make_id(0xEA00, 0xF9, destination=0x00) == 0x18EA00F9
    assert make_id(61444, 0x00, priority=3) == 0x0CF00400


def test_route_keys_ignore_priority_and_optionally_source() -> None:
    assert ids.route_key(0x0CF00400) == ids.route_key(0x18F00400) != ids.route_key(0x0CF00401)
    assert ids.any_source_key(0x0CF00400) == ids.any_source_key(0x18F00401)
    # PDU1: the destination is part of the key (a request to 0x00 is not one to 0x17).
    assert ids.any_source_key(0x18EA00F9) != ids.any_source_key(0x18EA17F9)
    assert all(k > 0x1FFFFFFF for k in (ids.route_key(0), ids.any_source_key(0)))  # never an exact id


def test_kernel_filters_match_by_pgn() -> None:
    can_id, mask = ids.kernel_filter(ids.any_source_key(0x0CF00400))
    assert all((fid & mask) == can_id for fid in (0x0CF00400, 0x18F00401, 0x1CF004FE))
    assert (0x18FEF100 & mask) != can_id
    can_id, mask = ids.kernel_filter(ids.route_key(0x0CF00400))
    assert (0x18F00400 & mask) == can_id and (0x18F00401 & mask) != can_id
    can_id, mask = ids.kernel_filter(ids.any_destination_key(PGN_TP_CM))
    assert all((fid & mask) == can_id for fid in (0x1CECFF00, 0x1CEC17F9)) and (0x1CEBFF00 & mask) != can_id


# -- signal map ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, needle", [
    ({"message": "EEC1", "signal": "EngineSpeed", "source_address": 254}, "must be an integer 0..253"),
    ({"message": "EEC1", "signal": "EngineSpeed", "source_address": True}, "must be an integer 0..253"),
    ({"message": "EEC1", "signal": "EngineSpeed", "source_address": "0x00"}, "must be an integer 0..253"),
])
def test_source_address_is_validated(entry: dict[str, Any], needle: str) -> None:
    db = load_dbc([TRUCK_DBC])
    doc = {"signal": [entry | {"path": "Vehicle.Speed", "scope": "read_speedometer"}]}
    with pytest.raises(ConfigError) as info:
        catalogue_from_map(db, doc, Path("m.toml"))
    assert needle in str(info.value)


def test_source_address_only_on_j1939_messages() -> None:
    db = load_dbc([dbc_dir() / "vehicle.dbc"])
    doc = {"signal": [{"message": "VehicleDynamics", "signal": "VehicleSpeed", "path": "Vehicle.Speed",
                       "scope": "read_speedometer", "source_address": 0}]}
    with pytest.raises(ConfigError, match="J1939 messages only"):
        catalogue_from_map(db, doc, Path("m.toml"))


def test_two_ecus_of_one_pgn_map_to_two_paths() -> None:
    db = load_dbc([TRUCK_DBC])
    doc = {"signal": [
        {"message": "EEC1", "signal": "EngineSpeed", "source_address": 0,
         "path": "Vehicle.Powertrain.CombustionEngine.Speed", "scope": "read_diagnostics"},
        {"message": "EEC1", "signal": "EngineSpeed", "source_address": 1,
         "path": "Vehicle.Powertrain.CombustionEngine.SecondSpeed", "scope": "read_diagnostics"},
        {"message": "EEC1", "signal": "ActualEngineTorque",
         "path": "Vehicle.Powertrain.CombustionEngine.Torque", "scope": "read_diagnostics"},
    ]}
    cat = catalogue_from_map(db, doc, Path("m.toml"))
    pipe = Pipeline(cat)
    pipe.swap((_grant(["read_diagnostics"]),))
    msg = db.get_message_by_name("EEC1")
    for source, t in ((0, 1.0), (1, 2.0), (7, 3.0)):
        pipe.process(make_id(61444, source, priority=6), msg.encode({"EngineTorqueMode": 0, "DriversDemandTorque": 0,
                                                                     "ActualEngineTorque": 10 + source,
                                                                     "EngineSpeed": 1000 + source}), t)
    got = sorted((s["t"], s["path"], s["value"]) for s in pipe.batches["g"].samples)
    assert got == [
        (1.0, "Vehicle.Powertrain.CombustionEngine.Speed", 1000),
        (1.0, "Vehicle.Powertrain.CombustionEngine.Torque", 10),
        (2.0, "Vehicle.Powertrain.CombustionEngine.SecondSpeed", 1001),
        (2.0, "Vehicle.Powertrain.CombustionEngine.Torque", 11),
        (3.0, "Vehicle.Powertrain.CombustionEngine.Torque", 17),  # any source: still decoded
    ]


# -- transport -----------------------------------------------------------------------------------------

def _bam(pgn: int, payload: bytes, source: int = 0, t: float = 0.0,
         gap: float = 0.05) -> list[tuple[int, bytes, float]]:
    n = -(-len(payload) // 7)
    out = [(make_id(PGN_TP_CM, source, priority=7),
            bytes([CM_BAM, len(payload) & 0xFF, len(payload) >> 8, n, 0xFF]) + pgn.to_bytes(3, "little"), t)]
    for seq in range(1, n + 1):
        out.append((make_id(PGN_TP_DT, source, priority=7),
                    bytes([seq]) + payload[(seq - 1) * 7: seq * 7].ljust(7, b"\xff"), t + seq * gap))
    return out


def test_bam_reassembles() -> None:
    r = Reassembler()
    payload = b"1M8GDM9AXKP042788*"
    results = [r.feed(*f) for f in _bam(65260, payload, source=0x17, t=10.0)]
    assert results[:-1] == [None] * (len(results) - 1)
    done = results[-1]
    assert done is not None and (done.pgn, done.source, done.destination, done.data) == (65260, 0x17, GLOBAL, payload)
    assert len(r) == 0


def test_bam_gap_longer_than_t1_drops_the_transfer() -> None:
    r = Reassembler()
    frames = _bam(65260, b"1M8GDM9AXKP042788*", t=0.0)
    for f in frames[:2]:
        assert r.feed(*f) is None
    late = [(i, d, t + T1_S + 0.1) for i, d, t in frames[2:]]
    assert all(r.feed(*f) is None for f in late)
    assert r.counters["timed_out"] == 1 and len(r) == 0


def test_passive_cmdt_between_two_nodes() -> None:
    """A tool (0xF9) reads 20 bytes from the engine (0x00) by RTS/CTS: the agent only watches."""
    r = Reassembler()
    payload = bytes(range(20))
    rts = bytes([CM_RTS, 20, 0, 3, 2]) + (65259).to_bytes(3, "little")
    cts1 = bytes([CM_CTS, 2, 1, 0xFF, 0xFF]) + (65259).to_bytes(3, "little")
    cts2 = bytes([CM_CTS, 1, 3, 0xFF, 0xFF]) + (65259).to_bytes(3, "little")
    eoma = bytes([CM_EOMA, 20, 0, 3, 0xFF]) + (65259).to_bytes(3, "little")
    dt = [bytes([s]) + payload[(s - 1) * 7: s * 7].ljust(7, b"\xff") for s in (1, 2, 3)]
    seq = [(make_id(PGN_TP_CM, 0x00, destination=0xF9), rts), (make_id(PGN_TP_CM, 0xF9, destination=0x00), cts1),
           (make_id(PGN_TP_DT, 0x00, destination=0xF9), dt[0]), (make_id(PGN_TP_DT, 0x00, destination=0xF9), dt[1]),
           (make_id(PGN_TP_CM, 0xF9, destination=0x00), cts2), (make_id(PGN_TP_DT, 0x00, destination=0xF9), dt[2]),
           (make_id(PGN_TP_CM, 0xF9, destination=0x00), eoma)]
    out = [r.feed(i, d, 0.1 * k) for k, (i, d) in enumerate(seq)]
    done = [o for o in out if o is not None]
    assert len(done) == 1 and (done[0].pgn, done[0].source, done[0].destination, done[0].data) == \
        (65259, 0x00, 0xF9, payload)


def test_abort_and_bad_announcements() -> None:
    r = Reassembler()
    rts = bytes([CM_RTS, 20, 0, 3, 2]) + (65259).to_bytes(3, "little")
    r.feed(make_id(PGN_TP_CM, 0x00, destination=0xF9), rts, 0.0)
    r.feed(make_id(PGN_TP_CM, 0xF9, destination=0x00), bytes([CM_ABORT, 1, 0xFF, 0xFF, 0xFF]) +
           (65259).to_bytes(3, "little"), 0.1)
    assert len(r) == 0 and r.counters["aborted"] == 1
    # A BAM to one node, a wrong packet count, a size beyond 1785 bytes: refused.
    r.feed(make_id(PGN_TP_CM, 0, destination=0x17), bytes([CM_BAM, 20, 0, 3, 0xFF, 0xEC, 0xFE, 0]), 0.2)
    r.feed(make_id(PGN_TP_CM, 0), bytes([CM_BAM, 20, 0, 4, 0xFF, 0xEC, 0xFE, 0]), 0.2)
    r.feed(make_id(PGN_TP_CM, 0), bytes([CM_BAM, 0xFA, 0x06, 255, 0xFF, 0xEC, 0xFE, 0]), 0.2)
    assert len(r) == 0 and r.counters["bad_packets"] == 3


def test_sessions_are_bounded() -> None:
    r = Reassembler()
    for source in range(MAX_SESSIONS + 10):
        r.feed(*_bam(65260, b"x" * 30, source=source, t=0.001 * source)[0])
    # The oldest give way to the newest (a full table never shuts out a transfer).
    assert len(r) == MAX_SESSIONS and r.counters["evicted"] == 10


def _packet(source: int, seq: int, payload: bytes, t: float) -> tuple[int, bytes, float]:
    return make_id(PGN_TP_DT, source, priority=7), bytes([seq]) + payload[(seq - 1) * 7: seq * 7].ljust(7, b"\xff"), t


def _vin_samples(frames: list[tuple[int, bytes, float]]) -> list[Any]:
    """The VIN samples a pipeline with a ``read_vin`` grant gets from ``frames`` (fed in time order)."""
    pipe = Pipeline(load_catalogue([TRUCK_DBC], TRUCK_MAP))
    pipe.swap((_grant(["read_vin"]),))
    for can_id, data, t in sorted(frames, key=lambda f: f[2]):
        pipe.process(can_id, data, t)
    return [s["value"] for s in pipe.batches["g"].samples if s["path"] == VIN_PATH]


GENUINE_VIN = b"1M8GDM9AXKP042788*"


def test_vin_gets_through_while_32_bams_are_kept_open_by_resending_packet_one() -> None:
    """An attacker announces 32 BAMs (one per spoofed source) and re-sends packet 1 of each every 0.5 s, so no
    gap ever reaches T1; the engine's VIN BAM at t = 5 s must still be reassembled (J1939-21: BAM packets come
    in order, so a repeated packet ends the transfer)."""
    junk = bytes(range(70))
    frames: list[tuple[int, bytes, float]] = []
    for sa in range(0x80, 0x80 + MAX_SESSIONS):
        frames += _bam(65226, junk, source=sa, t=0.0)[:2]
        frames += [_packet(sa, 1, junk, k * 0.5 + 0.01) for k in range(1, 21)]
    frames += _bam(65260, GENUINE_VIN, source=ENGINE, t=5.02)
    assert _vin_samples(frames) == ["1M8GDM9AXKP042788"]


def test_vin_gets_through_while_32_slow_in_order_bams_hold_every_slot() -> None:
    """32 BAMs of 255 packets whose packets come in order, 0.7 s apart (under T1): the table is full when the
    VIN is announced. The oldest transfer gives way, and each slow one ends at its absolute deadline."""
    junk = bytes(7 * 255)
    frames: list[tuple[int, bytes, float]] = []
    for sa in range(0x80, 0x80 + MAX_SESSIONS):
        frames += _bam(65226, junk, source=sa, t=0.01 * (sa - 0x80), gap=0.7)[:40]
    frames += _bam(65260, GENUINE_VIN, source=ENGINE, t=5.02)
    assert _vin_samples(frames) == ["1M8GDM9AXKP042788"]


def test_a_bam_ends_at_its_absolute_deadline_however_its_packets_come() -> None:
    r = Reassembler()
    frames = _bam(65226, bytes(7 * 255), source=0x80, t=0.0, gap=0.7)
    for can_id, data, t in frames:
        assert r.feed(can_id, data, t) is None
        if t > bam_deadline_s(255):
            assert len(r) == 0
    assert r.counters["timed_out"] == 1 and r.counters["completed"] == 0


def test_a_bam_packet_out_of_order_ends_the_transfer() -> None:
    for seqs in ([1, 1, 2, 3], [1, 3, 2], [2, 1, 3]):
        r = Reassembler()
        announce, *packets = _bam(65260, GENUINE_VIN, source=ENGINE, t=0.0)
        r.feed(*announce)
        out = [r.feed(*packets[s - 1][:2], 0.05 * (k + 1)) for k, s in enumerate(seqs)]
        assert out == [None] * len(seqs) and len(r) == 0 and r.counters["out_of_order"] == 1, seqs


def test_one_source_cannot_hold_more_than_its_share_of_sessions() -> None:
    """A node that opens connections (RTS) to 40 destinations keeps at most MAX_SESSIONS_PER_SOURCE of them;
    its own oldest give way, and the engine's VIN BAM has room."""
    r = Reassembler()
    rts = bytes([CM_RTS, 20, 0, 3, 2]) + (65259).to_bytes(3, "little")
    for k, da in enumerate(range(40)):
        r.feed(make_id(PGN_TP_CM, 0x80, destination=da), rts, 0.01 * k)
    assert len(r) == MAX_SESSIONS_PER_SOURCE and r.counters["evicted"] == 40 - MAX_SESSIONS_PER_SOURCE
    done = [r.feed(*f) for f in _bam(65260, GENUINE_VIN, source=ENGINE, t=0.5)]
    assert done[-1] is not None and done[-1].data == GENUINE_VIN


_TP_IDS = st.builds(lambda pgn, sa, da, prio: make_id(pgn, sa, destination=da, priority=prio),
                    st.sampled_from([PGN_TP_CM, PGN_TP_DT, 65260, 0xEA00]), st.integers(0, 255),
                    st.integers(0, 255), st.integers(0, 7))
_CM = st.builds(lambda kind, size, n, rest: bytes([kind]) + size.to_bytes(2, "little") + bytes([n]) + rest,
                st.sampled_from([CM_RTS, CM_CTS, CM_EOMA, CM_BAM, CM_ABORT, 0, 99]), st.integers(0, 0xFFFF),
                st.integers(0, 255), st.binary(max_size=6))


_FRAMES = st.lists(st.tuples(_TP_IDS, st.one_of(_CM, st.binary(max_size=8)), st.floats(0, 0.5)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(_FRAMES)
def test_reassembler_fuzz_never_raises_and_stays_bounded(frames: list[tuple[int, bytes, float]]) -> None:
    _fuzz_reassembler(frames)


@pytest.mark.slow
@settings(max_examples=20_000, deadline=None)
@given(_FRAMES)
def test_reassembler_fuzz_long(frames: list[tuple[int, bytes, float]]) -> None:
    _fuzz_reassembler(frames)


def _fuzz_reassembler(frames: list[tuple[int, bytes, float]]) -> None:
    r = Reassembler()
    t = 0.0
    for can_id, data, dt in frames:
        t += dt
        done = r.feed(can_id, data, t)
        assert len(r) <= MAX_SESSIONS
        if done is not None:
            assert 9 <= len(done.data) <= MAX_SIZE
    r.expire(t + 10)
    assert len(r) == 0


_TRUCK = load_catalogue([TRUCK_DBC], TRUCK_MAP)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(_TP_IDS, st.sampled_from([0x18FECA00, 0x18FEEC00, 0x18FEEB00, 0x0CF00400,
                                                               0x18FEF100])),
                          st.binary(max_size=64)), max_size=100))
def test_pipeline_fuzz_j1939_frames_never_raise(frames: list[tuple[int, bytes]]) -> None:
    """Random and truncated J1939 frames (built-in PGNs, transport, DBC PGNs) through the whole pipeline."""
    pipe = Pipeline(_TRUCK)
    pipe.swap((_grant(["read_speedometer", "read_diagnostics", "read_vin", "read_vehicle_info"]),))
    for i, (can_id, data) in enumerate(frames):
        pipe.process(can_id, data, 1.0 + i * 0.01)
    for sample in pipe.batches["g"].samples:
        if sample["path"] == VIN_PATH:
            assert isinstance(sample["value"], str) and sample["value"].isprintable()


# -- built-in PGNs ---------------------------------------------------------------------------------------

def test_dm1_round_trip_and_no_fault() -> None:
    assert parse_dm1(encode_dm1([(110, 0, 3), (524287, 31, 126)]), 0) == [
        {"sa": 0, "spn": 110, "fmi": 0, "oc": 3}, {"sa": 0, "spn": 524287, "fmi": 31, "oc": 126}]
    assert parse_dm1(encode_dm1([]), 0x17) == []
    assert parse_dm1(b"\x00\x00", 0) is None


def test_vin_and_component_id() -> None:
    assert parse_vin(b"1M8GDM9AXKP042788*") == "1M8GDM9AXKP042788"
    assert parse_vin(b"\x01\x02*") is None and parse_vin(b"*") is None
    assert parse_component_id(COMPONENT_ID.encode(), 0) == {"sa": 0, "make": "VGW", "model": "TRUCK-J1939",
                                                            "serial": "SN000042", "unit": "UNIT7"}


# -- the truck through the pipeline, value-exact against cantools -------------------------------------------

def _message_of_pgn(db: cantools.database.can.Database, can_id: int) -> cantools.database.can.Message | None:
    pgn = parse(can_id).pgn
    for m in db.messages:
        if parse(m.frame_id).pgn == pgn:
            return m
    return None


def check_value_exact(samples: list[Any], frames: list[can.Message], sim: J1939Simulator, base: float) -> int:
    """Every DBC sample equals cantools' decoding, by the message definition of its frame's PGN, of a frame
    sent at its time (EngineSpeed: from source 0x00 only); VIN, component identification and DM1 equal what
    the simulator sent (``base``: the simulation's start time). Returns how many samples were checked."""
    db = cantools.database.load_file(str(TRUCK_DBC))
    catalogue = load_catalogue([TRUCK_DBC], TRUCK_MAP)
    signal_of = {s.path: (s.message, s.signal, s.source_address) for s in catalogue.specs}
    at: dict[float, list[can.Message]] = {}
    for f in frames:
        at.setdefault(round(f.timestamp, 6), []).append(f)
    checked = 0
    for s in samples:
        path, value, t = (s["path"], s["value"], s["t"]) if isinstance(s, dict) else (s.path, s.value, s.t)
        if path == VIN_PATH:
            assert value == sim.model.vin
        elif path == COMPONENT_PATH:
            assert value == parse_component_id(COMPONENT_ID.encode(), ENGINE)
        elif path == DM1_PATH:
            # DM1 starts every second at +0.6 s and completes within 0.1 s; a live bus stamps frames when they
            # are sent, up to some ms after their schedule (``base`` too), hence the 0.05 s of slack.
            event = math.floor(t - base - DM1_OFFSET_S + 0.05) + DM1_OFFSET_S
            want = [{"sa": ENGINE, "spn": spn, "fmi": fmi, "oc": oc} for spn, fmi, oc in sim.dm1_at(event)]
            assert value == want
        else:
            message, signal, source = signal_of[path]
            candidates = [f for f in at[t] if (m := _message_of_pgn(db, f.arbitration_id)) is not None
                          and m.name == message and (source is None or parse(f.arbitration_id).source == source)]
            assert candidates, path
            decoded = [db.get_message_by_name(message).decode(bytes(f.data), decode_choices=False)[signal]
                       for f in candidates]
            assert value in decoded, path
        checked += 1
    return checked


def test_truck_through_the_pipeline_value_exact() -> None:
    sim = J1939Simulator(TRUCK_DBC, VehicleModel(seed=2), fault_period_s=3.0, identity_period_s=2.0)
    frames = list(sim.frames(8.0, start_time=1000.0))
    assert {parse(f.arbitration_id).source for f in frames if parse(f.arbitration_id).pgn == 61444} == \
        {ENGINE, SECOND_ENGINE}
    pipe = Pipeline(load_catalogue([TRUCK_DBC], TRUCK_MAP))
    pipe.swap((_grant(["read_speedometer", "read_diagnostics", "read_fuel", "read_odometer", "read_vin",
                       "read_vehicle_info"]),))
    for f in frames:
        pipe.process(f.arbitration_id, bytes(f.data), f.timestamp)
    samples = pipe.batches["g"].samples
    paths = {s["path"] for s in samples}
    assert paths == {s.path for s in load_catalogue([TRUCK_DBC], TRUCK_MAP).specs} | \
        {VIN_PATH, COMPONENT_PATH, DM1_PATH}
    dm1 = [s["value"] for s in samples if s["path"] == DM1_PATH]
    assert [] in dm1 and any(len(v) == 2 for v in dm1)  # the fault comes and goes
    speeds = [s for s in samples if s["path"] == "Vehicle.Powertrain.CombustionEngine.Speed"]
    assert len(speeds) == sum(1 for f in frames if f.arbitration_id == 0x0CF00400)  # only source 0x00
    assert check_value_exact(samples, frames, sim, 1000.0) == len(samples)


def test_consent_gates_the_builtin_pgns() -> None:
    sim = J1939Simulator(TRUCK_DBC, VehicleModel(seed=2), identity_period_s=1.0)
    pipe = Pipeline(load_catalogue([TRUCK_DBC], TRUCK_MAP))
    pipe.swap((_grant(["read_speedometer"]),))
    for f in sim.frames(3.0, start_time=1000.0):
        pipe.process(f.arbitration_id, bytes(f.data), f.timestamp)
    assert {s["path"] for s in pipe.batches["g"].samples} == {"Vehicle.Speed"}


def test_shared_j1939_dbc_routes_by_pgn() -> None:
    dbc = SHARED / "j1939.dbc"
    if not dbc.exists():
        pytest.skip(f"shared test DBCs not found: {SHARED}")
    db = load_dbc([dbc])
    msg = db.get_message_by_name("Message1")
    cat = catalogue_from_map(db, {"signal": [{"message": "Message1", "signal": "Signal1", "path": "Vehicle.Speed",
                                              "scope": "read_speedometer"}]}, Path("m.toml"))
    pipe = Pipeline(cat)
    pipe.swap((_grant(["read_speedometer"]),))
    jid = parse(msg.frame_id)
    for prio, sa, value in ((jid.priority, jid.source, -5), (7, 0x42, 17)):
        pipe.process(make_id(jid.pgn, sa, destination=jid.destination, priority=prio),
                     msg.encode({"Signal1": value}), 1.0 + sa)
    assert [s["value"] for s in pipe.batches["g"].samples] == [-5, 17]


# -- end to end through the real broker ------------------------------------------------------------------

def test_j1939_truck_end_to_end_value_exact(tmp_path, pki, broker, cloud) -> None:
    auth = Authority(tmp_path)
    channel = f"j1939-e2e-{id(tmp_path)}"
    cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                       can={"channel": channel, "dbc": [str(TRUCK_DBC)], "signal_map": str(TRUCK_MAP)})
    cloud.add_recipient("g-truck", auth.recipient("g-truck"))
    scopes = ["read_speedometer", "read_diagnostics", "read_fuel", "read_odometer", "read_vin"]
    wanted = {s.path for s in load_catalogue([TRUCK_DBC], TRUCK_MAP).specs} | {VIN_PATH, DM1_PATH}

    listener = can.Bus(interface="virtual", channel=channel)
    tx = open_output("virtual", channel)
    sim = J1939Simulator(TRUCK_DBC, VehicleModel(seed=4), fault_period_s=1.5, identity_period_s=1.0)
    stop = threading.Event()
    runner = threading.Thread(target=sim.run, args=(tx,), kwargs={"stop_event": stop}, daemon=True)
    sent: list[can.Message] = []
    try:
        with AgentThread(cfg) as agent:
            assert agent.wait_link()
            runner.start()
            cloud.publish_consent(DEV, auth.doc(DEV, {"g-truck": scopes}))

            def seen() -> bool:
                samples = cloud.samples(DEV, "g-truck")
                dm1 = [s.value for s in samples if s.path == DM1_PATH]
                return {s.path for s in samples} == wanted and [] in dm1 and any(dm1)

            assert cloud.wait_for(seen, 30)
        stop.set()
        runner.join(5)
        while (m := listener.recv(0)) is not None:
            sent.append(m)
    finally:
        stop.set()
        tx.shutdown()
        listener.shutdown()
    samples = cloud.samples(DEV, "g-truck")
    assert {s.path for s in samples} == wanted  # read_vehicle_info not granted: no component identification
    assert check_value_exact(samples, sent, sim, min(f.timestamp for f in sent)) == len(samples)
    assert all(d["sa"] == ENGINE for s in samples if s.path == DM1_PATH for d in s.value)


# -- requests: the only frame the agent sends ----------------------------------------------------------------

def test_requester_only_for_consented_pgns_and_rate_limited() -> None:
    r = Requester(0xF9, interval_s=30.0)
    assert r.due(0.0, ["read_speedometer", "read_diagnostics"]) == []  # no consent for VIN or component id
    assert r.due(1.0, ["read_vin"]) == [(0x18EAFFF9, b"\xec\xfe\x00")]
    assert r.due(2.0, ["read_vin", "read_vehicle_info"]) == [(0x18EAFFF9, b"\xeb\xfe\x00")]
    assert r.due(20.0, ["read_vin", "read_vehicle_info"]) == []  # rate limit
    assert len(r.due(40.0, ["read_vin", "read_vehicle_info"])) == 2
    with pytest.raises(ValueError):
        Requester(254)


def test_bus_source_refuses_every_frame_but_a_request() -> None:
    src = BusSource("virtual", "j1939-send", fd=False)
    rx = can.Bus(interface="virtual", channel="j1939-send")
    try:
        claim = make_id(0xEE00, 0xF9, destination=GLOBAL)  # address claim: never
        for can_id, data in ((claim, b"\x00" * 8), (0x18EAFFF9, b"\xca\xfe\x00"), (0x18FEF100, b"\x00" * 8)):
            with pytest.raises(ValueError):
                src.send_j1939_request(can_id, data)
        src.send_j1939_request(0x18EAFFF9, b"\xec\xfe\x00")
        msg = rx.recv(2.0)
        assert msg is not None and (msg.arbitration_id, bytes(msg.data)) == (0x18EAFFF9, b"\xec\xfe\x00")
        assert rx.recv(0.1) is None
    finally:
        rx.shutdown()
        src.close()


@pytest.mark.parametrize("lines, needle", [
    ("j1939_requests = true", "j1939_address: required with j1939_requests"),
    ("j1939_requests = true\nj1939_address = 254", "must be 0..253"),
    ("j1939_address = true", "expected an integer"),
    ("j1939_request = true", "unknown key 'j1939_request'"),
])
def test_request_config_is_validated(tmp_path: Path, lines: str, needle: str) -> None:
    from tests.test_canfd import _cfg

    with pytest.raises(ConfigError) as info:
        load_config(_cfg(tmp_path, lines))
    assert needle in str(info.value)


@pytest.mark.parametrize("allowed", [True, False])
def test_agent_requests_vin_only_when_allowed(tmp_path, pki, broker, cloud, allowed: bool) -> None:
    """The truck sends its VIN only on request here: with requests allowed the agent asks once (read_vin is
    granted, read_vehicle_info is not) and the answer by TP.BAM reaches the cloud; without, it sends nothing."""
    auth = Authority(tmp_path)
    channel = f"j1939-req-{allowed}-{id(tmp_path)}"
    extra = {"j1939_requests": True, "j1939_address": 0xF9} if allowed else {}
    cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                       can={"channel": channel, "dbc": [str(TRUCK_DBC)], "signal_map": str(TRUCK_MAP)} | extra)
    cloud.add_recipient("g", auth.recipient("g"))
    tx = open_output("virtual", channel)
    ecu_bus = open_output("virtual", channel)
    sim = J1939Simulator(TRUCK_DBC, VehicleModel(seed=4), identity_period_s=None, fault_period_s=10_000)
    responder = J1939Responder(ecu_bus, sim).start()
    stop = threading.Event()
    runner = threading.Thread(target=sim.run, args=(tx,), kwargs={"stop_event": stop}, daemon=True)
    try:
        with AgentThread(cfg) as agent:
            assert agent.wait_link()
            runner.start()
            cloud.publish_consent(DEV, auth.doc(DEV, {"g": ["read_vin", "read_speedometer"]}))
            if allowed:
                assert cloud.wait_for(lambda: VIN_PATH in {s.path for s in cloud.samples(DEV, "g")}, 20)
            else:
                assert cloud.wait_for(lambda: len([s for s in cloud.samples(DEV, "g")
                                                   if s.path == "Vehicle.Speed"]) >= 20, 20)
    finally:
        stop.set()
        runner.join(5)
        responder.close()
        tx.shutdown()
        ecu_bus.shutdown()
    vins = [s.value for s in cloud.samples(DEV, "g") if s.path == VIN_PATH]
    if allowed:
        assert responder.requests == [(0x18EAFFF9, b"\xec\xfe\x00")]
        assert vins and set(vins) == {sim.model.vin}
    else:
        assert responder.requests == [] and vins == []


def test_kernel_filters_pass_a_pgn_from_any_priority_and_source() -> None:
    """The filters BusSource installs, applied by python-can's own filter matching (the same id/mask rule as
    SocketCAN's CAN_RAW_FILTER; there is no kernel CAN here)."""
    cat = load_catalogue([TRUCK_DBC], TRUCK_MAP)
    pipe = Pipeline(cat)
    pipe.swap((_grant(["read_speedometer", "read_diagnostics", "read_vin"]),))
    src = BusSource("virtual", "j1939-filters")
    tx = can.Bus(interface="virtual", channel="j1939-filters")
    try:
        src.interface = "socketcan"  # take the kernel-filter branch; the virtual bus applies them in software
        src.set_filters(pipe.router.frames)
        src.interface = "virtual"
        wanted = [0x0CF00400, 0x18F00400, 0x18FEF117, 0x1CFEF1FE, 0x1CECFF00, 0x1CEB00F9, 0x18FECA03]
        unwanted = [0x0CF00401, 0x18FEFC00, 0x18FEC100, 0x0CF004, 0x18EEFF00]  # EEC1 from 0x01: only 0x00 mapped
        for can_id in unwanted + wanted:
            tx.send(can.Message(arbitration_id=can_id, is_extended_id=True, data=b"\x00" * 8))
        got = []
        while (m := src.recv(0.2)) is not None:
            got.append(m.arbitration_id)
        assert got == wanted
    finally:
        tx.shutdown()
        src.close()


def test_two_dbc_messages_of_one_pgn_need_source_addresses(tmp_path: Path) -> None:
    text = TRUCK_DBC.read_text().replace(
        "BO_ 2566844672 CCVS1: 8 Engine",
        "BO_ 2566844689 CCVS1_Cluster: 8 Cluster\n SG_ ClusterSpeed : 8|16@1+ (0.00390625,0) [0|250.996] \"km/h\" VGW"
        "\n\nBO_ 2566844672 CCVS1: 8 Engine")
    text = text.replace('BA_ "VFrameFormat" BO_ 2566844672 3;', 'BA_ "VFrameFormat" BO_ 2566844672 3;\n'
                        'BA_ "VFrameFormat" BO_ 2566844689 3;')
    dbc = tmp_path / "two.dbc"
    dbc.write_text(text)
    db = load_dbc([dbc])
    assert db.get_message_by_name("CCVS1_Cluster").protocol == "j1939"
    both = [{"message": "CCVS1", "signal": "VehicleSpeed", "path": "Vehicle.Speed", "scope": "read_speedometer"},
            {"message": "CCVS1_Cluster", "signal": "ClusterSpeed", "path": "Vehicle.Speed",
             "scope": "read_speedometer"}]
    with pytest.raises(ConfigError, match="same J1939 PGN 65265: give each entry a different source_address"):
        catalogue_from_map(db, {"signal": both}, Path("m.toml"))
    both[0]["source_address"], both[1]["source_address"] = 0x00, 0x11
    cat = catalogue_from_map(db, {"signal": both}, Path("m.toml"))
    pipe = Pipeline(cat)
    pipe.swap((_grant(["read_speedometer"]),))
    cluster = db.get_message_by_name("CCVS1_Cluster")
    pipe.process(0x18FEF111, cluster.encode({"ClusterSpeed": 50}), 1.0)
    pipe.process(0x18FEF100, db.get_message_by_name("CCVS1").encode({"ParkingBrakeSwitch": 0,
                                                                      "VehicleSpeed": 60}), 2.0)
    assert [s["value"] for s in pipe.batches["g"].samples] == [50, 60]


@settings(max_examples=50, deadline=None)
@given(payload=st.binary(min_size=10, max_size=10), source=st.integers(0, 253), priority=st.integers(0, 7))
def test_multi_packet_dbc_message_decodes_after_bam(payload: bytes, source: int, priority: int) -> None:
    """A 10-byte J1939 message (variable_dlc.dbc, shared data) travels by TP.BAM; reassembled, it decodes
    exactly as cantools decodes the 10 bytes."""
    dbc = SHARED / "variable_dlc.dbc"
    if not dbc.exists():
        pytest.skip(f"shared test DBCs not found: {SHARED}")
    db = load_dbc([dbc], strict=False)
    msg = db.get_message_by_name("TestMessage2")
    names = [s.name for s in msg.signals]
    cat = catalogue_from_map(db, {"signal": [{"message": "TestMessage2", "signal": n, "path": f"Vehicle.Bench.{n}",
                                              "scope": "read_diagnostics"} for n in names]}, Path("m.toml"))
    pipe = Pipeline(cat)
    pipe.swap((_grant(["read_diagnostics"]),))
    pgn = parse(msg.frame_id).pgn
    for can_id, data, t in _bam(pgn, payload, source=source, t=5.0):
        pipe.process((can_id & ~(7 << 26)) | (priority << 26), data, t)
    want = msg.decode(payload, decode_choices=False)
    got = {s["path"].rsplit(".", 1)[1]: s["value"] for s in pipe.batches["g"].samples}
    assert got == want


def test_vgw_sim_can_drives_a_j1939_truck(tmp_path: Path) -> None:
    trace = tmp_path / "truck.log"
    res = vgw("sim", "can", "--dbc", str(TRUCK_DBC), "--record", str(trace), "--duration", "2")
    assert res.returncode == 0, res.stderr
    frames = list(can.LogReader(str(trace)))
    seen = {(parse(f.arbitration_id).pgn, parse(f.arbitration_id).source) for f in frames}
    assert {(61444, ENGINE), (61444, SECOND_ENGINE), (PGN_TP_CM, ENGINE), (PGN_TP_DT, ENGINE)} <= seen


def test_transport_is_not_reassembled_when_no_grant_can_use_it() -> None:
    """Minimisation: with only DBC PGNs of 8 bytes consented, a VIN by TP.BAM is not even put together."""
    pipe = Pipeline(load_catalogue([TRUCK_DBC], TRUCK_MAP))
    pipe.swap((_grant(["read_speedometer"]),))
    assert not any(ids.is_route_key(k) and k & ids.ANY_DESTINATION for k, _ in pipe.router.frames)
    frames = _bam(65260, b"1M8GDM9AXKP042788*", t=1.0)
    for can_id, data, t in frames[:2]:
        pipe.process(can_id, data, t)
    assert len(pipe._j1939.reassembler) == 0  # type: ignore[union-attr]
    pipe.swap((_grant(["read_vin"]),))
    assert (ids.any_destination_key(PGN_TP_CM), True) in pipe.router.frames
    for can_id, data, t in frames:
        pipe.process(can_id, data, t)
    assert [s["value"] for s in pipe.batches["g"].samples] == ["1M8GDM9AXKP042788"]
