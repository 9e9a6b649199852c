"""A fleet on a real 3-node NATS cluster: the harness, the deploy/ definitions, the cloud's durable JetStream
workers, and the agent moving between nodes when the one it uses dies (README "Fleet", docs/fleet.md).

Three nats-server processes on loopback (routes, clustered JetStream, MQTT over mutual TLS on every node).
Skipped, with the reason, only where nats-server is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from simulators.cloud import recipient_public_key, seal_envelope
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
from tests.agentkit import ROOT, vgw

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


# ---------------------------------------------------------------- the cloud: workers on one durable consumer


class Workers:
    """`vgw cloud listen --nats` worker processes (real CLI), each writing JSON lines to its own file."""

    def __init__(self, tmp: Path, pki: TestPKI, cluster: NatsCluster, keys: Path) -> None:
        self.tmp, self.pki, self.cluster, self.keys = tmp, pki, cluster, keys
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> subprocess.Popen[bytes]:
        err = open(self.tmp / f"{name}.err", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "cloud", "listen", "--nats", ",".join(
                f"127.0.0.1:{n.client_port}" for n in self.cluster.nodes),
             "--ca", str(self.pki.ca.cert), "--cert", str(self.pki.cloud.cert), "--tls-key", str(self.pki.cloud.key),
             "--recipient", str(self.keys), "--device-cert", str(self.pki.dir), "--ack-wait", "2", "--batch", "5",
             "--out", str(self.tmp / f"{name}.jsonl")],
            stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        err.close()
        self.procs[name] = proc
        assert wait_until(lambda: "pulling (NATS JetStream)" in self.err(name) or proc.poll() is not None, 60)
        assert proc.poll() is None, self.err(name)
        return proc

    def err(self, name: str) -> str:
        path = self.tmp / f"{name}.err"
        return path.read_text(errors="replace") if path.exists() else ""

    def events(self, name: str, typ: str = "batch") -> list[dict[str, Any]]:
        path = self.tmp / f"{name}.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by kill -9
            if e.get("type") == typ:
                out.append(e)
        return out

    def seqs(self, *names: str) -> list[tuple[str, str, int]]:
        """(device, epoch, seq) of every batch line of the named workers (with repeats)."""
        return [(e["device"], e["epoch"], e["seq"]) for n in names for e in self.events(n)]

    def stop(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.terminate()
            proc.wait(20)

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def workers(tmp_path: Path, pki: TestPKI, cluster: NatsCluster) -> Iterator[Workers]:
    assert vgw("cloud", "keygen", "--dir", str(tmp_path / "keys"), "--recipient", "fleet").returncode == 0
    w = Workers(tmp_path, pki, cluster, tmp_path / "keys")
    try:
        yield w
    finally:
        w.close()


def _sealer(keys: Path) -> Any:
    pub = recipient_public_key(json.loads((keys / "recipients" / "fleet.pub.json").read_text()))

    def seal(device: str, seq: int) -> bytes:
        batch = {"v": 1, "device": device, "grant": "g-1", "seq": seq, "samples": [
            {"t": time.time(), "path": "Vehicle.Speed", "value": 1.0}]}
        return seal_envelope(batch, pub, device, "g-1")

    return seal


def _publish(client: Client, device: str, seqs: range, seal: Any, pause: float = 0.0) -> None:
    for seq in seqs:
        client.c.publish(f"vgw/{device}/data/g-1", seal(device, seq), qos=1).wait_for_publish(10)
        if pause:
            time.sleep(pause)  # pacing the publisher, not waiting for a condition


def _expected(devices: tuple[str, ...], seqs: range) -> set[tuple[str, str, int]]:
    return {(d, "", s) for d in devices for s in seqs}


def test_workers_share_one_durable_consumer_each_batch_once(
    workers: Workers, pki: TestPKI, cluster: NatsCluster
) -> None:
    seal = _sealer(workers.keys)
    workers.start("w1")
    workers.start("w2")
    a = Client(pki, "dev-0001", cluster.nodes[0].port)
    b = Client(pki, "dev-0002", cluster.nodes[1].port)
    _publish(a, "dev-0001", range(1, 31), seal, 0.01)
    _publish(b, "dev-0002", range(1, 31), seal, 0.01)
    want = _expected(("dev-0001", "dev-0002"), range(1, 31))
    assert wait_until(lambda: set(workers.seqs("w1", "w2")) >= want, 30)
    got = workers.seqs("w1", "w2")
    assert sorted(got) == sorted(want), "every batch handled once, by one worker"
    assert workers.events("w1") and workers.events("w2"), "both workers pulled from the shared consumer"


def test_unacked_batches_of_a_dead_worker_go_to_another_and_stopped_workers_catch_up(
    workers: Workers, pki: TestPKI, cluster: NatsCluster
) -> None:
    import asyncio

    import nats

    seal = _sealer(workers.keys)
    workers.start("w1")  # creates the stream and the durable consumer
    workers.stop("w1")
    a = Client(pki, "dev-0001", cluster.nodes[2].port)
    _publish(a, "dev-0001", range(1, 21), seal)  # no worker running: the stream keeps them

    async def die_holding(n: int) -> int:
        """A worker that pulls n messages and dies before acknowledging any."""
        ctx = tls_context(pki.ca.cert, pki.cloud.cert, pki.cloud.key)
        nc = await nats.connect(servers=cluster.nats_urls, tls=ctx)
        sub = await nc.jetstream().pull_subscribe_bind(durable="vgw-workers", stream="VGW")
        msgs = await sub.fetch(n, timeout=5)
        await nc.close()
        return len(msgs)

    assert asyncio.run(die_holding(8)) == 8
    workers.start("w2")
    want = _expected(("dev-0001",), range(1, 21))
    assert wait_until(lambda: set(workers.seqs("w2")) >= want, 30)
    assert sorted(workers.seqs("w2")) == sorted(want)
    workers.stop("w2")
    summary = json.loads(workers.err("w2").strip().splitlines()[-1])["summary"]
    assert summary["redelivered"] >= 8, summary


def test_kill_a_worker_mid_stream_nothing_lost(workers: Workers, pki: TestPKI, cluster: NatsCluster) -> None:
    seal = _sealer(workers.keys)
    workers.start("w1")
    workers.start("w2")
    a = Client(pki, "dev-0001", cluster.nodes[0].port)
    killed = threading.Event()

    def killer() -> None:
        if wait_until(lambda: len(workers.events("w1")) >= 5, 30):
            workers.kill("w1")
            killed.set()

    t = threading.Thread(target=killer)
    t.start()
    _publish(a, "dev-0001", range(1, 61), seal, 0.02)
    t.join(40)
    assert killed.is_set()
    want = _expected(("dev-0001",), range(1, 61))
    assert wait_until(lambda: set(workers.seqs("w1", "w2")) >= want, 30)
    assert set(workers.seqs("w1", "w2")) == want  # after de-duplication on (device, epoch, seq): all, once
