"""TLS faults: the agent refuses the connection, says why once (not per retry), and keeps collecting."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from vgw_sim.broker import Mosquitto

from tests.agentkit import AgentThread, Authority, wait_until, write_config
from tests.faultkit import Tls11Server, apply_offline, record_trace

RUN_S = 6.0


@contextmanager
def _server(kind: str, pki) -> Iterator[tuple[int, Tls11Server | None]]:
    if kind == "tls1.1-only":
        with Tls11Server(pki) as srv:
            yield srv.port, srv
        return
    if kind == "wrong-ca":
        rogue = pki.other_ca("rogue-tls-faults")
        server = (rogue.server.cert, rogue.server.key)
    elif kind == "expired-cert":
        p = pki.expired_server_cert("server-expired-faults")
        server = (p.cert, p.key)
    else:
        p = pki.wrong_host_server_cert("server-wronghost-faults")
        server = (p.cert, p.key)
    broker = Mosquitto.from_pki(pki, server=server)
    try:
        broker.start()
        yield broker.port, None
    finally:
        broker.close()


@pytest.mark.parametrize(("kind", "why"), [
    ("wrong-ca", "unable to get local issuer certificate"),
    ("expired-cert", "certificate has expired"),
    ("hostname-mismatch", "Hostname mismatch"),
    ("tls1.1-only", "TLS handshake failed"),
])
def test_tls_fault_refused_logged_once_and_collection_goes_on(tmp_path: Path, pki, caplog, kind, why):
    auth = Authority(tmp_path)
    trace = record_trace(tmp_path, 10.0)
    with _server(kind, pki) as (port, tls11):
        cfg = write_config(tmp_path, pki, port, auth.trust,
                           can={"replay": str(trace), "replay_rate": 2.0, "replay_loop": True})
        apply_offline(cfg, auth, {"g-1": ["read_speedometer"]}, tmp_path)
        caplog.set_level(logging.DEBUG, logger="vgw.uplink.link")
        with AgentThread(cfg) as runner:
            up = runner.agent.uplink
            assert wait_until(lambda: up.view().connect_attempts >= 4, RUN_S + 3)
            assert wait_until(lambda: why in (up.view().last_error or ""), 10), up.view().last_error
            assert up.view().connects == 0 and up.view().state != "connected"
            rows = runner.agent.outbox.stats().get("g-1", {}).get("rows", 0)
            assert rows >= 2, "collection must go on while the broker is refused"
            attempts = up.view().connect_attempts
        warnings = [r for r in caplog.records if r.name == "vgw.uplink.link" and r.levelno >= logging.WARNING]
        # One line says why; the identical retries that followed are at debug level only.
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert why in warnings[0].getMessage()
        assert attempts >= 4
        if tls11 is not None:
            assert tls11.attempts >= 3 and tls11.completed == 0  # the client pins TLS >= 1.2 (README "Topics")
