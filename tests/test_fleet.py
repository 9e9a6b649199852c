"""The fleet load simulator, short form: 20 devices for a few seconds on each engine, and its CLI.

Checks that every device connects over its own mTLS identity and applies consent, that batches flow with no
loss and open under HPKE, that revocations produce verified erasure receipts, and that the report carries
the figures docs/fleet.md quotes. The N = 100 / 1,000 runs are in docs/fleet.md (minutes, not for CI).
"""

from __future__ import annotations

import json

import pytest
from vgw.simulators.fleet import FleetConfig, FleetSim
from vgw.simulators.nats import NatsNotFound, find_nats_server

from tests.agentkit import vgw


def _nats_missing() -> bool:
    try:
        find_nats_server()
    except NatsNotFound:
        return True
    return False


@pytest.mark.parametrize("engine", ["mosquitto", pytest.param("nats", marks=pytest.mark.skipif(
    _nats_missing(), reason="nats-server is not installed"))])
def test_fleet_short_run(engine: str) -> None:
    report = FleetSim(FleetConfig(devices=20, rate_hz=2.0, duration_s=4.0, churn_hz=2.0, broker=engine,
                                  threads=3)).run()
    assert report["devices_ready"] == 20 and report["connect_failures"] == 0
    assert report["batches_sent"] >= 20 * 2 * 3
    assert report["lost"] == 0 and report["undecryptable"] == 0 and report["bad_receipts"] == 0
    assert report["batches_delivered"] == report["batches_sent"]
    assert report["e2e_latency_ms"]["n"] == report["batches_delivered"]
    assert report["revocations"] >= 3
    assert report["revocation_to_receipt_ms"]["n"] == report["revocations"]
    assert report["grant_to_applied_ms"]["n"] >= 1
    assert 0 < report["e2e_latency_ms"]["p50"] < 1000
    assert report["ingress_msgs_per_s"] > 0 and report["egress_msgs_per_s"] > 0


def test_fleet_cli_json_and_bad_input() -> None:
    r = vgw("sim", "fleet", "--devices", "5", "--rate", "2", "--duration", "2", "--churn", "0", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["devices_ready"] == 5 and report["lost"] == 0
    bad = vgw("sim", "fleet", "--devices", "0")
    assert bad.returncode == 1 and "--devices 0" in bad.stderr and "Traceback" not in bad.stderr
    ext = vgw("sim", "fleet", "--broker", "127.0.0.1:1")
    assert ext.returncode == 1 and "--pki" in ext.stderr
