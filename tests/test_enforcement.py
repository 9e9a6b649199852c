"""Enforcement on the device: privacy defaults, VIN only with read_vin, several trust keys,
retention, and the MLKEM768-X25519 hybrid grant end to end through the real broker and agent."""

from __future__ import annotations

import itertools
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from vgw.base.errors import ConfigError
from vgw.contract.consent.model import Grant, Limits, Recipient
from vgw.contract.scopes import SCOPES
from vgw.pipeline.catalogue import load_catalogue
from vgw.pipeline.router import Pipeline
from vgw.state.consent.manager import load_trust_keys
from vgw_sim.can_sim import CanSimulator
from vgw_sim.cloud import SigningKey
from vgw_sim.paths import default_dbc, default_signal_map
from vgw_sim.vehicle import DEFAULT_VIN, VehicleModel

from tests.consentkit import Authority, State

DEVICE = "dev-0001"
T0 = 1_800_000_000.0


def _grant(scopes: list[str], limits: dict[str, Limits] | None = None, gid: str = "g") -> Grant:
    return Grant(gid, "c", "p", tuple(scopes), Recipient("X25519", b"\x09" * 32), limits or {})


# ---------------------------------------------------------------- defaults (EDPB 01/2020)


def test_location_and_compass_defaults() -> None:
    g = _grant(["read_location", "read_compass", "read_speedometer"])
    assert g.limits_for("read_location") == Limits(max_hz=0.2, precision_m=100.0)
    assert g.limits_for("read_compass") == Limits(max_hz=0.2, precision_m=None)
    assert g.limits_for("read_speedometer") == Limits()  # no default: every sample (README "Telemetry envelope")


def test_grant_limits_override_field_by_field() -> None:
    finer = _grant(["read_location"], {"read_location": Limits(max_hz=1.0, precision_m=10.0)})
    assert finer.limits_for("read_location") == Limits(max_hz=1.0, precision_m=10.0)
    # Setting only the rate does not ask for finer position: the 100 m default stays.
    rate_only = _grant(["read_location"], {"read_location": Limits(max_hz=1.0)})
    assert rate_only.limits_for("read_location") == Limits(max_hz=1.0, precision_m=100.0)
    grid_only = _grant(["read_location"], {"read_location": Limits(precision_m=1000.0)})
    assert grid_only.limits_for("read_location") == Limits(max_hz=0.2, precision_m=1000.0)


def _run(grants: tuple[Grant, ...], seconds: float = 20.0) -> list[dict[str, Any]]:
    pipeline = Pipeline(load_catalogue([default_dbc()], default_signal_map()))
    pipeline.swap(grants)
    for msg in CanSimulator(default_dbc(), VehicleModel(seed=2, start_time=T0)).frames(seconds, start_time=T0):
        pipeline.process(msg.arbitration_id, bytes(msg.data), msg.timestamp)
    return [s for b in pipeline.batches.values() for s in b.samples]


def test_default_location_is_one_sample_per_5s_on_a_100m_grid() -> None:
    samples = _run((_grant(["read_location"]),), seconds=30.0)
    lats = [s for s in samples if s["path"].endswith("Latitude")]
    assert 5 <= len(lats) <= 7  # 30 s at 0.2 Hz
    assert all(b["t"] - a["t"] >= 5.0 - 1e-6 for a, b in itertools.pairwise(lats))
    step = 100.0 / 111_320.0
    assert all(abs(s["value"] / step - round(s["value"] / step)) < 1e-3 for s in lats)


def test_vin_only_with_read_vin() -> None:
    everything_but_vin = sorted(SCOPES - {"read_vin"})
    samples = _run((_grant(everything_but_vin),), seconds=10.0)
    assert samples and not [s for s in samples if "VIN" in s["path"] or s["value"] == DEFAULT_VIN]
    pipeline = Pipeline(load_catalogue([default_dbc()], default_signal_map()))
    pipeline.swap((_grant(everything_but_vin),))
    assert 1264 not in pipeline.router.frame_ids  # the VIN frame is not even decoded
    with_vin = _run((_grant(["read_vin"]),), seconds=10.0)
    assert with_vin and {s["value"] for s in with_vin} == {DEFAULT_VIN}


# ---------------------------------------------------------------- trust keys (rotation)


def test_several_trust_keys_accepted_unknown_key_rejected(tmp_path: Path, pki: Any) -> None:
    auth = Authority(tmp_path, keys=2)
    s = State(tmp_path, pki, auth)
    try:
        now = int(time.time())
        old, new = auth.keys
        v1 = auth.sign(auth.claims(DEVICE, 1, [auth.grant("g-a", ["read_fuel"])], iat=now), key=old)
        v2 = auth.sign(auth.claims(DEVICE, 2, [auth.grant("g-a", ["read_fuel"])], iat=now), key=new)
        v3 = auth.sign(auth.claims(DEVICE, 3, [auth.grant("g-a", ["read_fuel"])], iat=now), key=SigningKey.generate())
        assert s.manager.apply(v1, source="mqtt").status == "applied"
        assert s.manager.apply(v2, source="mqtt").status == "applied"
        r = s.manager.apply(v3, source="mqtt")
        assert r.status == "rejected" and r.error is not None and r.error.reason == "signature"
        assert s.manager.in_force is not None and s.manager.in_force.ver == 2
    finally:
        s.close()


def test_trust_key_must_be_ed25519(tmp_path: Path, pki: Any) -> None:
    with pytest.raises(ConfigError, match="Ed25519"):
        load_trust_keys([_ec_public_pem(tmp_path)])


def _ec_public_pem(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    p = tmp_path / "ec.pem"
    p.write_bytes(pem)
    return p


# ---------------------------------------------------------------- retention (runtime)


def test_retention_deletes_old_rows_unsent_and_counts(tmp_path: Path, pki: Any, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    from vgw.daemon.timing import Timing

    from tests.agentkit import AgentThread, wait_until, write_config

    auth = Authority(tmp_path)
    cfg_path = write_config(tmp_path, pki, 1, auth.trust[0], can={"channel": f"ret-{uuid.uuid4().hex[:8]}"})
    # The main loop sweeps retention every 5 s in the product; every 0.2 s here.
    runner = AgentThread(cfg_path, timing=Timing(retention_every_s=0.2))
    agent = runner.agent
    try:
        now = int(time.time())
        doc = auth.doc(DEVICE, 1, [auth.grant("g-short", ["read_fuel"], retention_s=60),
                                   auth.grant("g-long", ["read_fuel"])], iat=now)
        assert agent.manager.apply(doc, source="mqtt").status == "applied"
        import vgw.state.outbox.batches as outbox_module

        real_time = outbox_module.time.time
        monkeypatch.setattr(outbox_module.time, "time", lambda: real_time() - 120)  # stored 2 minutes ago
        for gid in ("g-short", "g-short", "g-long"):
            agent.outbox.commit_batch(gid, lambda seq: b"envelope", float(now), 1)
        monkeypatch.setattr(outbox_module.time, "time", real_time)
        agent.outbox.commit_batch("g-short", lambda seq: b"fresh", float(now), 1)
        runner.start()  # the agent's own main loop applies retention
        assert wait_until(lambda: any(e["event"] == "retention-delete" for e in agent.audit.entries()), 10)
        stats = agent.outbox.stats()
        assert stats["g-short"]["rows"] == 1 and stats["g-long"]["rows"] == 1
        assert agent.outbox.counters()["retention_deleted:g-short"] == 2
        [entry] = [e for e in agent.audit.entries() if e["event"] == "retention-delete"]
        assert entry["grant"] == "g-short" and entry["batches_deleted"] == 2 and entry["retention_s"] == 60
    finally:
        if runner.thread.is_alive():
            runner.stop()
        elif not runner.thread.ident:  # never started: close what the agent opened
            agent.outbox.close()
            agent.lock_file.release()


# ---------------------------------------------------------------- MLKEM768-X25519 end to end


def test_mlkem768_x25519_grant_end_to_end(tmp_path: Path, pki: Any, broker: Any, cloud: Any, channel: str,
                                          vehicle_on: Any) -> None:
    from tests.agentkit import AgentThread, write_config

    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust[0], can={"channel": channel})
    pq = auth.recipient("g-pq", "MLKEM768-X25519")
    classic = auth.recipient("g-classic")
    cloud.add_recipient("g-pq", pq)
    cloud.add_recipient("g-classic", classic)
    with AgentThread(cfg):
        vehicle_on(channel, 4)
        doc = auth.doc(DEVICE, 1, [auth.grant("g-pq", ["read_speedometer", "read_location"],
                                              kem="MLKEM768-X25519"),
                                   auth.grant("g-classic", ["read_odometer"])], iat=int(time.time()))
        cloud.publish_consent(DEVICE, doc)
        assert cloud.wait_for(lambda: bool(cloud.samples(DEVICE, "g-pq")) and bool(
            cloud.samples(DEVICE, "g-classic")), timeout=15)
    assert cloud.undecryptable == 0
    pq_paths = {s.path for s in cloud.samples(DEVICE, "g-pq")}
    assert pq_paths <= {"Vehicle.Speed", "Vehicle.CurrentLocation.Latitude", "Vehicle.CurrentLocation.Longitude"}
    assert "Vehicle.Speed" in pq_paths
    # The hybrid envelope is bigger: enc is the 1120-byte ML-KEM-768 + X25519 encapsulation.
    assert min(b.size for b in cloud.batches(DEVICE, "g-pq")) > 1 + 1120
