"""A fleet on a real 3-node NATS cluster: the harness, the deploy/ definitions, the cloud's durable JetStream
workers, and the agent moving between nodes when the one it uses dies (README "Fleet", docs/fleet.md).

Three nats-server processes on loopback (routes, clustered JetStream, MQTT over mutual TLS on every node).
Skipped, with the reason, only where nats-server is not installed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from simulators.mqttclient import make_client, tls_context
from simulators.nats import (
    NatsNotFound,
    authorization_block,
    find_nats_server,
    telemetry_consumer_config,
    telemetry_stream_config,
)
from simulators.nats_cluster import NatsCluster
from simulators.pki import TestPKI

try:
    find_nats_server()
except NatsNotFound:
    pytest.skip("nats-server is not installed (apt-get install nats-server)", allow_module_level=True)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "nats"


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


_open_clients: list[Client] = []


@pytest.fixture
def cluster(pki: TestPKI) -> Iterator[NatsCluster]:
    c = NatsCluster.from_pki(pki, ack_wait="2s")
    try:
        c.start()
        yield c
    finally:
        while _open_clients:
            _open_clients.pop().close()
        c.close()


class Client:
    """A bare MQTT 3.1.1 client on one node (its callbacks only record)."""

    def __init__(self, pki: TestPKI, name: str, port: int, *, persistent: bool = True) -> None:
        paths = pki.cloud if name == "cloud" else pki.device(name)
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self.c = make_client(name if name != "cloud" else "cloud-bare", "3.1.1",
                             tls_context(pki.ca.cert, paths.cert, paths.key), persistent)
        self.c.on_connect = lambda *a: self.connected.set()
        self.c.on_message = self._on_message
        self.c.connect("localhost", port, keepalive=10)
        self.c.loop_start()
        _open_clients.append(self)
        # The first MQTT client on a node after a node was killed waits for JetStream to elect new leaders
        # for the MQTT streams (seconds); paho retries the connection meanwhile.
        assert self.connected.wait(30), f"{name} did not connect to port {port}"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def close(self) -> None:
        if self in _open_clients:
            _open_clients.remove(self)
        self.c.disconnect()
        self.c.loop_stop()


# ---------------------------------------------------------------- the harness and deploy/


def test_cluster_has_mqtt_on_every_node_and_survives_kill_and_restart(cluster: NatsCluster, pki: TestPKI) -> None:
    assert len({p for _h, p in cluster.endpoints}) == 3
    # Retained consent published on node 1 is served by node 3 (clustered JetStream, R3).
    pub = Client(pki, "cloud", cluster.nodes[0].port, persistent=False)
    pub.c.publish("vgw/dev-0001/consent", b"doc-v1", qos=1, retain=True).wait_for_publish(10)
    reader = Client(pki, "dev-0001", cluster.nodes[2].port)
    reader.c.subscribe("vgw/dev-0001/consent", qos=1)
    assert wait_until(lambda: ("vgw/dev-0001/consent", b"doc-v1") in reader.messages, 10)
    reader.close()
    pub.close()
    # kill -9 one node: the other two keep quorum and serve the retained message.
    cluster.kill(2)
    assert not cluster.nodes[2].running
    other = Client(pki, "dev-0002", cluster.nodes[1].port)
    other.c.subscribe("vgw/dev-0002/consent", qos=1)
    pub = Client(pki, "cloud", cluster.nodes[0].port, persistent=False)
    pub.c.publish("vgw/dev-0002/consent", b"doc-v2", qos=1, retain=True).wait_for_publish(10)
    assert wait_until(lambda: ("vgw/dev-0002/consent", b"doc-v2") in other.messages, 10)
    # The node comes back on the same ports with its store, and catches up with what it missed.
    port = cluster.nodes[2].port
    cluster.start_node(2)
    assert cluster.nodes[2].port == port
    late = Client(pki, "dev-0002", port, persistent=False)
    late.c.subscribe("vgw/dev-0002/consent", qos=1)
    assert wait_until(lambda: ("vgw/dev-0002/consent", b"doc-v2") in late.messages, 15)
    for c in (late, other, pub):
        c.close()


def test_deploy_nats_definitions_are_the_tested_ones() -> None:
    assert (DEPLOY / "vgw-users.conf").read_text() == authorization_block(["dev-0001", "dev-0002"])
    assert json.loads((DEPLOY / "stream-vgw.json").read_text()) == telemetry_stream_config()
    assert json.loads((DEPLOY / "consumer-vgw-workers.json").read_text()) == telemetry_consumer_config()
    conf = (DEPLOY / "nats.conf").read_text()
    assert "stream_replicas: 3" in conf and "cluster {" in conf and "verify_and_map: true" in conf
