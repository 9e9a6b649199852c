"""The broker refuses this device's client certificate: the log names the TLS alert and what to do, the agent
never falls back to MQTT 3.1.1 for it, and collection goes on."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from vgw_sim.broker import Mosquitto
from vgw_sim.pki import CertPaths

from tests.agentkit import AgentThread, Authority, wait_until, write_config
from tests.faultkit import apply_offline, record_trace


def with_client_cert(cfg: Path, pair: CertPaths) -> Path:
    """Point the config's [mqtt] cert_file/key_file at ``pair``."""
    lines = []
    for line in cfg.read_text().splitlines():
        if line.startswith("cert_file"):
            line = f'cert_file = "{pair.cert}"'
        elif line.startswith("key_file"):
            line = f'key_file = "{pair.key}"'
        lines.append(line)
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


@pytest.mark.parametrize(("kind", "alert", "advice"), [
    ("expired", "certificate_expired", "renew"),
    ("unknown-ca", "unknown_ca", "enroll again"),
])
def test_refused_client_certificate_is_named_and_never_falls_back(tmp_path: Path, pki, broker: Mosquitto, caplog,
                                                                  kind: str, alert: str, advice: str) -> None:
    auth = Authority(tmp_path)
    trace = record_trace(tmp_path, 10.0)
    pair = (pki.expired_client_cert("dev-0001", name="dev-0001-expired-tls") if kind == "expired"
            else pki.other_ca("rogue-client-tls", devices=["dev-0001"]).device("dev-0001"))
    cfg = with_client_cert(write_config(tmp_path, pki, broker.port, auth.trust,
                                        can={"replay": str(trace), "replay_rate": 2.0, "replay_loop": True}), pair)
    apply_offline(cfg, auth, {"g-1": ["read_speedometer"]}, tmp_path)
    caplog.set_level(logging.DEBUG, logger="vgw.uplink.link")
    with AgentThread(cfg) as runner:
        up = runner.agent.uplink
        assert wait_until(lambda: up.view().connect_attempts >= 3, 20)
        assert wait_until(lambda: runner.agent.outbox.stats().get("g-1", {}).get("rows", 0) >= 2, 20), \
            "collection must go on while the broker refuses the certificate"
        time.sleep(0.2)
        assert up.view().connects == 0
        error = up.view().last_error
        assert error is not None and alert in error and advice in error, error
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "vgw.uplink.link")
    assert "3.1.1" not in text, text  # a TLS refusal says nothing about the MQTT version
    assert "Unspecified error" not in text
    warnings = [r for r in caplog.records if r.name == "vgw.uplink.link" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once, not per retry
