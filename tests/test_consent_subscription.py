"""A refused consent subscription is asked for again (README "Topics").

Seen on a loaded 3-node NATS cluster: the node could not create the subscription's JetStream consumer in time
("Unable to add JetStream consumer ... timeout") and refused the SUBSCRIBE. The uplink ignored the SUBACK, so
on that connection no consent change, a revocation included, would ever reach the device. Here a NATS
server refuses it by permissions (mosquitto grants a SUBSCRIBE its ACL denies and only withholds delivery),
then the permissions are fixed and reloaded (SIGHUP), as an operator would.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from vgw.daemon.agent import STATUS_FILE
from vgw_sim.nats import NatsMqtt, NatsNotFound, find_nats_server

from tests.agentkit import AgentThread, Authority, connected_cloud, wait_until, write_config

try:
    find_nats_server()
except NatsNotFound:
    pytest.skip("nats-server is not installed (apt-get install nats-server)", allow_module_level=True)
from tests.faultkit import DEV

G = "g-speed"


def _reload(broker: NatsMqtt, text: str) -> None:
    before = broker.log_text().count("Reloaded server configuration")
    broker.conf_path.write_text(text)
    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
    assert wait_until(lambda: broker.log_text().count("Reloaded server configuration") > before, 10)


def test_a_refused_consent_subscription_is_retried_until_the_broker_grants_it(tmp_path: Path, pki) -> None:
    auth = Authority(tmp_path)
    with NatsMqtt.from_pki(pki) as broker, connected_cloud(broker, pki, protocol="3.1.1") as cloud:
        allowed = broker.conf_path.read_text()
        refused = allowed.replace(f'"vgw.{DEV}.consent"', f'"vgw.{DEV}.nothing"')
        assert refused != allowed
        _reload(broker, refused)
        cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": "vgw-test-subscribe"})
        doc = auth.doc(DEV, {G: ["read_speedometer"]})
        cloud.publish_consent(DEV, doc)  # retained: delivered once the subscription is granted
        with AgentThread(cfg) as runner:
            up = runner.agent.uplink
            assert runner.wait_link(30)
            assert wait_until(lambda: up.view().subscribe_refused >= 2, 15), up.view().subscribe_refused  # asked again
            assert not up.view().consent_subscribed and runner.agent.manager.in_force is None
            _reload(broker, allowed)
            assert wait_until(lambda: up.view().consent_subscribed, 40)
            assert wait_until(lambda: runner.agent.manager.in_force is not None
                              and runner.agent.manager.in_force.ver == auth.ver, 10)
            status = tmp_path / "state" / STATUS_FILE
            assert wait_until(lambda: status.exists()
                              and json.loads(status.read_text())["counters"]["consent_subscribe_refused"] >= 2, 10)
