"""End to end through the real parts: virtual CAN -> agent -> mosquitto over mutual TLS -> cloud peer."""

from __future__ import annotations

import json
from pathlib import Path

import can
import pytest
from vgw.pipeline.catalogue import load_catalogue
from vgw_sim.broker import Mosquitto, free_port
from vgw_sim.can_sim import CanSimulator
from vgw_sim.cloud import CloudPeer
from vgw_sim.paths import default_dbc, default_signal_map
from vgw_sim.vehicle import VehicleModel

from tests.agentkit import AgentThread, Authority, agent_process, stop_process, vgw, wait_until, write_config
from tests.faultkit import persistent_world

DEV = "dev-0001"
SCOPE_OF = load_catalogue([default_dbc()], default_signal_map()).scope_of_path()


def paths_of(scopes: list[str]) -> set[str]:
    return {p for p, s in SCOPE_OF.items() if s in scopes}


@pytest.fixture
def auth(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def register(cloud: CloudPeer, auth: Authority, *gids: str) -> None:
    for gid in gids:
        cloud.add_recipient(gid, auth.recipient(gid))


def test_only_consented_paths_reach_each_grant(tmp_path, pki, broker, cloud, auth, channel, vehicle):
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    register(cloud, auth, "g-speed", "g-fleet")
    with AgentThread(cfg) as agent:
        assert agent.wait_link()
        cloud.publish_consent(DEV, auth.doc(DEV, {"g-speed": ["read_speedometer"],
                                                  "g-fleet": ["read_fuel", "read_tires", "read_vin"]}))
        assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-speed")) >= 4
                              and len(cloud.batches(DEV, "g-fleet")) >= 4, 15)
        assert cloud.wait_for(lambda: "Vehicle.VehicleIdentification.VIN" in
                              {s.path for s in cloud.samples(DEV, "g-fleet")}, 10)
    speed_paths = {s.path for s in cloud.samples(DEV, "g-speed")}
    fleet_paths = {s.path for s in cloud.samples(DEV, "g-fleet")}
    assert speed_paths == {"Vehicle.Speed"}
    assert fleet_paths == paths_of(["read_fuel", "read_tires", "read_vin"])
    vins = {s.value for s in cloud.samples(DEV, "g-fleet") if s.path.endswith("VIN")}
    assert vins == {vehicle.sim.model.vin}
    assert cloud.undecryptable == 0
    for gid in ("g-speed", "g-fleet"):
        assert cloud.missing(DEV, gid) == []
        assert cloud.seqs(DEV, gid)[0] == 1
    applied = cloud.receipts(DEV, "consent-applied")
    assert [r.claims["ver"] for r in applied] == [1]


def test_revocation_mid_stream_erases_and_receipts(tmp_path, pki, broker, cloud, auth, channel, vehicle):
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    register(cloud, auth, "g-keep", "g-gone")
    with AgentThread(cfg) as runner:
        agent = runner.agent
        assert runner.wait_link()
        cloud.publish_consent(DEV, auth.doc(DEV, {"g-keep": ["read_odometer"], "g-gone": ["read_speedometer"]}))
        assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-gone")) >= 3, 15)
        assert agent.outbox.has_key("g-gone")

        cloud.publish_consent(DEV, auth.doc(DEV, {"g-keep": ["read_odometer"]}))
        assert cloud.wait_for(lambda: any(r.claims.get("grant") == "g-gone"
                                          for r in cloud.receipts(DEV, "erasure")), 10)
        receipt = next(r for r in cloud.receipts(DEV, "erasure") if r.claims["grant"] == "g-gone")
        assert agent.outbox.stats().get("g-gone") is None
        assert not agent.outbox.has_key("g-gone")
        keep_before = len(cloud.batches(DEV, "g-keep"))
        assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-keep")) > keep_before, 10), \
            "the remaining grant must keep flowing"
    late = [b for b in cloud.batches(DEV, "g-gone") if b.arrived > receipt.arrived]
    assert late == []
    assert receipt.claims["ver"] == 2
    assert receipt.claims["key_destroyed"] is True
    assert isinstance(receipt.claims["batches_deleted"], int)
    assert receipt.claims["sub"] == DEV
    assert cloud.bad_receipts() == []


def test_restart_offline_enforces_cached_consent_and_seq_continues(tmp_path, pki, auth, channel, vehicle):
    with persistent_world(pki, auth, "g-odo", client_id="cloud-restart") as (broker, cloud):
        cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
        with AgentThread(cfg) as runner:
            assert runner.wait_link()
            cloud.publish_consent(DEV, auth.doc(DEV, {"g-odo": ["read_odometer"]}))
            assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-odo")) >= 3, 15)
        first_run = max(cloud.seqs(DEV, "g-odo"))

        broker.stop()
        with AgentThread(cfg) as runner:
            # Broker down, consent only in the cache: the agent must still enforce it and keep collecting.
            wait_until(lambda: runner.agent.outbox.stats().get("g-odo", {}).get("rows", 0) >= 3, 10)
            stats = runner.agent.outbox.stats()
            assert stats.get("g-odo", {}).get("rows", 0) >= 3
            assert set(stats) == {"g-odo"}
            assert runner.agent.uplink.view().state != "connected"
            broker.restart()
            assert cloud.wait_connected(15)
            assert runner.wait_link(15)
            assert cloud.wait_for(lambda: max(cloud.seqs(DEV, "g-odo")) > first_run + 3, 15)
            assert runner.agent.uplink.drain(10)
        seqs = cloud.seqs(DEV, "g-odo")
        assert cloud.missing(DEV, "g-odo") == []
        assert sorted(seqs) == list(range(1, max(seqs) + 1))
        assert {s.path for s in cloud.samples(DEV, "g-odo")} == paths_of(["read_odometer"])


def test_broker_unreachable_at_start_then_drains(tmp_path, pki, auth, channel, vehicle):
    port = free_port()
    cfg = write_config(tmp_path, pki, port, auth.trust, can={"channel": channel})
    doc = tmp_path / "consent.jws"
    doc.write_text(auth.doc(DEV, {"g-fuel": ["read_fuel"]}))
    applied = vgw("consent", "apply", "--config", str(cfg), str(doc))
    assert applied.returncode == 0, applied.stderr
    broker = Mosquitto.from_pki(pki, port=port)
    cloud = None
    try:
        with AgentThread(cfg) as runner:
            wait_until(lambda: runner.agent.outbox.stats().get("g-fuel"), 10)
            assert runner.agent.outbox.stats()["g-fuel"]["rows"] >= 1
            error = runner.agent.uplink.view().last_error
            assert error and "cannot reach broker" in error
            broker.start()
            cloud = CloudPeer.for_broker(broker, pki)
            cloud.add_device(DEV, pki.device(DEV).cert)
            register(cloud, auth, "g-fuel")
            cloud.connect()
            assert runner.wait_link(15)
            assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-fuel")) >= 3, 15)
        assert cloud.missing(DEV, "g-fuel") == []
        # The consent-applied receipt written while offline was queued and delivered.
        assert cloud.wait_for(lambda: cloud.receipts(DEV, "consent-applied"), 5)
    finally:
        if cloud is not None:
            cloud.close()
        broker.close()


def test_replay_gives_same_samples_as_live(tmp_path, pki, broker, cloud, auth, channel):
    start = 1_790_000_000.0
    trace = tmp_path / "drive.log"
    CanSimulator(default_dbc(), VehicleModel(seed=5, start_time=start)).record(trace, 8.0, start_time=start)
    grants = {"g-r": ["read_speedometer", "read_odometer", "read_fuel", "read_vin", "read_tires"]}

    # Replay run: consent applied offline with the CLI, then `vgw run` to the end of the trace.
    cfg_replay = write_config(tmp_path, pki, broker.port, auth.trust, device="dev-0002",
                              can={"replay": str(trace), "replay_rate": 0, "replay_exit": True})
    doc = tmp_path / "replay.jws"
    doc.write_text(auth.doc("dev-0002", grants, ver=1))
    assert vgw("consent", "apply", "--config", str(cfg_replay), str(doc)).returncode == 0
    register(cloud, auth, "g-r")
    with agent_process(cfg_replay) as proc:
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    replayed = cloud.samples("dev-0002", "g-r")
    assert replayed, "replay produced no samples"
    assert min(s.t for s in replayed) >= start  # frame times are the trace's times

    # Live run: the same frames on a virtual bus.
    cfg_live = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    frames = list(CanSimulator(default_dbc(), VehicleModel(seed=5, start_time=start)).frames(8.0, start_time=start))
    with AgentThread(cfg_live) as runner:
        assert runner.wait_link()
        cloud.publish_consent(DEV, auth.doc(DEV, grants, ver=1))
        assert wait_until(lambda: runner.agent.manager.in_force is not None, 10)
        collector = runner.agent.collector
        assert collector is not None
        assert wait_until(lambda: collector.source is not None, 10)  # the agent's bus is open: no frame is lost
        with can.Bus(interface="virtual", channel=channel, receive_own_messages=False) as bus:
            for msg in frames:
                bus.send(msg)
        total = len(replayed)
        assert cloud.wait_for(lambda: len(cloud.samples(DEV, "g-r")) >= total, 20)
    live = cloud.samples(DEV, "g-r")

    def by_path(samples):
        out: dict[str, list[object]] = {}
        for s in sorted(samples, key=lambda s: (s.seq, s.t)):
            out.setdefault(s.path, []).append(s.value)
        return out

    assert by_path(live) == by_path(replayed)


def test_slcan_pty_from_separate_simulator_process(tmp_path, pki, broker, cloud, auth):
    import subprocess
    import sys

    sim = subprocess.Popen([sys.executable, "-m", "vgw", "sim", "can", "--interface", "slcan",
                            "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        pty_path = sim.stdout.readline().strip()
        assert pty_path.startswith("/dev/"), pty_path
        cfg = write_config(tmp_path, pki, broker.port, auth.trust,
                           can={"interface": "slcan", "channel": pty_path, "bitrate": 500000})
        register(cloud, auth, "g-slcan")
        with AgentThread(cfg) as runner:
            assert runner.wait_link()
            cloud.publish_consent(DEV, auth.doc(DEV, {"g-slcan": ["read_speedometer", "read_fuel"]}))
            assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-slcan")) >= 3, 20)
        paths = {s.path for s in cloud.samples(DEV, "g-slcan")}
        assert paths == paths_of(["read_speedometer", "read_fuel"])
    finally:
        stop_process(sim)


def test_cli_consent_apply_show_status(tmp_path, pki, auth):
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": "unused"})
    good = tmp_path / "good.jws"
    good.write_text(auth.doc(DEV, {"g-1": ["read_odometer", "read_location"]}))
    r = vgw("consent", "apply", "--config", str(cfg), str(good))
    assert r.returncode == 0, r.stderr
    again = vgw("consent", "apply", "--config", str(cfg), str(good))
    assert again.returncode == 0 and "already in force" in again.stdout

    tampered = tmp_path / "bad.jws"
    head, payload, sig = good.read_text().strip().split(".")
    tampered.write_text(f"{head}.{payload}.{sig[:-4]}AAAA")
    r = vgw("consent", "apply", "--config", str(cfg), str(tampered))
    assert r.returncode == 3
    assert "signature" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    show = json.loads(vgw("consent", "show", "--config", str(cfg), "--json").stdout)
    assert show["version"] == 1
    assert show["grants"][0]["scopes"] == ["read_odometer", "read_location"]
    assert show["grants"][0]["limits"]["read_location"] == {"max_hz": 0.2, "precision_m": 100.0}

    status = json.loads(vgw("status", "--config", str(cfg), "--json").stdout)
    assert status["device"] == DEV
    assert status["consent_version"] == 1
    assert status["grants"] == [{"id": "g-1", "scopes": ["read_odometer", "read_location"],
                                 "expires": status["grants"][0]["expires"]}]
    assert isinstance(status["grants"][0]["expires"], int)
    assert status["outbox"] == {"g-1": {"rows": 0, "bytes": 0}}
    human = vgw("status", "--config", str(cfg))
    assert human.returncode == 0 and "g-1" in human.stdout


def test_privacy_report_counts_what_left_per_scope(tmp_path, pki, broker, cloud, auth, channel, vehicle):
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    register(cloud, auth, "g-rep")
    with AgentThread(cfg) as runner:
        assert runner.wait_link()
        cloud.publish_consent(DEV, auth.doc(DEV, {"g-rep": ["read_speedometer", "read_fuel"]}))
        assert cloud.wait_for(lambda: len(cloud.batches(DEV, "g-rep")) >= 4, 15)
        assert runner.agent.uplink.drain(10)
    report = json.loads(vgw("report", "--config", str(cfg), "--json").stdout)
    (g,) = [g for g in report["grants"] if g["id"] == "g-rep"]
    got = cloud.samples(DEV, "g-rep")
    assert g["sent"]["batches"] == len(cloud.batches(DEV, "g-rep"))
    assert g["sent"]["samples"] == len(got)
    by_scope = {s["scope"]: s["samples_sent"] for s in g["scopes"]}
    assert by_scope == {"read_speedometer": sum(1 for s in got if s.path == "Vehicle.Speed"),
                        "read_fuel": sum(1 for s in got if s.path.startswith("Vehicle.Powertrain.FuelSystem"))}
    text = json.dumps(report)
    assert str(vehicle.sim.model.vin) not in text
