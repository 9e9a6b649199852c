"""A fleet on a real 3-node NATS cluster: the harness, the deploy/ definitions, the cloud's durable JetStream
workers, and the agent moving between nodes when the one it uses dies (README "Fleet", docs/fleet.md).

Three nats-server processes on loopback (routes, clustered JetStream, MQTT over mutual TLS on every node),
one cluster for the whole module (starting one costs seconds). Each test gets it whole and clean from the
``cluster`` fixture: nodes a test killed are started again and the fixture waits until the cluster is
healthy (every node current with the JetStream metadata leader, every stream's replicas current); the
telemetry stream is deleted (its durable consumer with it, as a test that makes them finds them on a fresh
cluster: the cloud user may only use the one stream ``VGW``, so names per test are no option), the retained
consent and status messages are cleared and the persistent MQTT sessions dropped. The module runs as one
xdist group, so one worker holds the cluster. Skipped, with the reason, only where nats-server is not
installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from vgw.cloud.jetstream import telemetry_consumer_config, telemetry_stream_config
from vgw.cloud.mqttclient import make_client
from vgw.transport.tlsctx import client_context
from vgw_sim.cloud import recipient_public_key, seal_envelope
from vgw_sim.nats import NatsNotFound, authorization_block, find_nats_server
from vgw_sim.nats_cluster import NatsCluster
from vgw_sim.pki import TestPKI

from tests.agentkit import ROOT, vgw, wait_until

if TYPE_CHECKING:
    from tests.conftest import SharedProcesses

try:
    find_nats_server()
except NatsNotFound:
    pytest.skip("nats-server is not installed (apt-get install nats-server)", allow_module_level=True)

pytestmark = pytest.mark.xdist_group("nats-cluster")  # one worker runs the module: one cluster

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "nats"
# The persistent MQTT sessions the tests make: devices (bare clients and agents) and the consent pusher.
SESSIONS = ("cloud-consent",)
RETAINED = ("consent", "status")


_open_clients: list[Client] = []


class ModuleCluster:
    """The module's cluster and the empty directory that was the current one while it started."""

    def __init__(self, cluster: NatsCluster, start_cwd: Path) -> None:
        self.cluster, self.start_cwd = cluster, start_cwd


@pytest.fixture(scope="module")
def module_cluster(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory,
                   shared_processes: SharedProcesses) -> Iterator[ModuleCluster]:
    """One 3-node cluster for the module, started from an empty current directory (a server that writes by a
    relative path would write there: test_servers_run_and_write_in_their_own_work_dirs looks)."""
    start_cwd = tmp_path_factory.mktemp("nats-cwd")
    c = NatsCluster.from_pki(pki, ack_wait="2s")
    unregister = shared_processes.add(lambda: [n.pid for n in c.nodes])
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(start_cwd)
            c.start()
        yield ModuleCluster(c, start_cwd)
    finally:
        c.close()
        unregister()


@pytest.fixture
def cluster(module_cluster: ModuleCluster, pki: TestPKI) -> Iterator[NatsCluster]:
    """The module's cluster, whole (killed nodes started again, every node healthy) and clean (no telemetry
    stream, no retained consent or status, no persistent session)."""
    c = module_cluster.cluster
    _whole_and_clean(c, pki)
    try:
        yield c
    finally:
        while _open_clients:
            _open_clients.pop().close()


def _whole_and_clean(c: NatsCluster, pki: TestPKI) -> None:
    """Start what a test killed, clean what it left, and wait until every node is healthy again (dropping
    the stream and the sessions changes what each node holds)."""
    c.restore()
    _clean(c, pki)
    c.wait_healthy(60)


def _clean(c: NatsCluster, pki: TestPKI) -> None:
    """What one test leaves that another could see: the stream (and its consumers), retained messages,
    persistent sessions (their subscriptions and queued QoS 1 messages)."""
    from nats.js.errors import NotFoundError

    async def drop_stream(js: Any) -> None:
        try:
            await js.delete_stream("VGW")
        except NotFoundError:
            pass

    _on_cluster(pki, c, drop_stream)
    # the delete is the meta leader's; a node that answers stream info from before it would hand the next test
    # the last one's messages
    assert wait_until(lambda: _on_cluster(pki, c, _stream_gone), 30), "stream VGW still there after its delete"
    # ... and no node holds it any more (/jsz of each): a node that keeps a deleted stream (an orphan, see
    # test_servers_run_and_write_in_their_own_work_dirs) could hand the next test the last one's messages
    assert wait_until(lambda: not _holding(c, "VGW"), 30), \
        [(n.server_name, st if isinstance(st := n.streams(), str) else [x for x in st if x["name"] == "VGW"])
         for n in c.nodes]
    port = c.nodes[0].port
    cloud = Client(pki, "cloud", port, persistent=False, client_id="cloud-clean")
    for device in pki.devices:
        for leaf in RETAINED:  # an empty retained message removes the retained one (MQTT 3.1.1, 3.3.1.3)
            info = cloud.c.publish(f"vgw/{device}/{leaf}", b"", qos=1, retain=True)
            info.wait_for_publish(30)
            assert info.is_published(), f"retained vgw/{device}/{leaf} not cleared"
    cloud.close()
    for name in (*pki.devices, *SESSIONS):  # a clean-session CONNECT discards the stored session (3.1.2.4)
        Client(pki, name if name in pki.devices else "cloud", port, persistent=False, client_id=name).close()


async def _stream_gone(js: Any) -> bool:
    """True if the cluster knows no stream VGW."""
    from nats.js.errors import NotFoundError

    try:
        await js.stream_info("VGW")
    except NotFoundError:
        return True
    return False


def _holding(c: NatsCluster, name: str) -> list[int]:
    """The nodes that list stream ``name`` in their /jsz (or cannot say), or still have its files. A node
    killed before it removed a deleted stream's files brings the stream back when it starts (listed there with
    no leader, and the cluster never healthy again), so no test may begin before every node removed them."""
    def holds(node: Any) -> bool:
        if any(node.store_dir.glob(f"jetstream/*/streams/{name}")):
            return True
        streams = node.streams()
        return isinstance(streams, str) or any(st["name"] == name for st in streams)

    return [i for i, n in enumerate(c.nodes) if holds(n)]


class Client:
    """A bare MQTT 3.1.1 client on one node (its callbacks only record)."""

    def __init__(self, pki: TestPKI, name: str, port: int, *, persistent: bool = True,
                 client_id: str | None = None) -> None:
        paths = pki.cloud if name == "cloud" else pki.device(name)
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self.c = make_client(client_id or (name if name != "cloud" else "cloud-bare"), "3.1.1",
                             client_context(pki.ca.cert, paths.cert, paths.key), persistent)
        self.session_present: bool | None = None
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(0.2, 1)
        self.c.connect("localhost", port, keepalive=10)
        self.c.loop_start()
        _open_clients.append(self)
        # The first MQTT client on a node after a node was killed waits for JetStream to elect new leaders
        # for the MQTT streams (seconds); paho retries the connection meanwhile.
        assert self.connected.wait(45), f"{name} did not connect to port {port}"

    def _on_connect(self, _c: Any, _u: Any, flags: Any, *_rest: Any) -> None:
        self.session_present = bool(flags.session_present)
        self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def subscribe_until(self, topic: str, expected: tuple[str, bytes], timeout: float = 60.0) -> bool:
        """Subscribe until ``expected`` (a retained message) arrives: while JetStream re-elects the leaders a
        dead node held, a SUBSCRIBE can fail on the server side; subscribing again is idempotent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.c.subscribe(topic, qos=1)
            if wait_until(lambda: expected in self.messages, 5):
                return True
        return expected in self.messages

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
    pub = Client(pki, "cloud", cluster.nodes[0].port, persistent=False)
    # Until JetStream has re-elected the leaders the dead node held, a retained publish waits (seconds on a
    # loaded machine): give the cluster that time.
    pub.c.publish("vgw/dev-0002/consent", b"doc-v2", qos=1, retain=True).wait_for_publish(45)
    assert other.subscribe_until("vgw/dev-0002/consent", ("vgw/dev-0002/consent", b"doc-v2")), other.messages
    # The node comes back on the same ports with its store, and catches up with what it missed.
    port = cluster.nodes[2].port
    cluster.start_node(2)
    assert cluster.nodes[2].port == port
    late = Client(pki, "dev-0002", port, persistent=False)
    assert late.subscribe_until("vgw/dev-0002/consent", ("vgw/dev-0002/consent", b"doc-v2")), late.messages
    for c in (late, other, pub):
        c.close()


def test_servers_run_and_write_in_their_own_work_dirs(
    module_cluster: ModuleCluster, cluster: NatsCluster, pki: TestPKI, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full run once left JetStream metadata files (meta.inf, meta.sum) in the repository root, where the
    tests run: each node runs in its own work directory, and a cluster's life (a stream made, filled, deleted
    while a node is down, the node started again) leaves nothing in the directory it was started from.

    That life is lived on a cluster of its own: nats-server 2.9.10 may keep a stream deleted while a node was
    down on that node (an orphan, which a restart does not drop), and a stream the module's cluster made again
    under the name could then hand a later test these five messages (CI once saw them, undecryptable)."""

    for node in cluster.nodes:
        assert node.pid is not None and Path(psutil.Process(node.pid).cwd()) == node.workdir.resolve()
    assert sorted(p.name for p in module_cluster.start_cwd.iterdir()) == []
    start_cwd = tmp_path / "cwd"
    start_cwd.mkdir()
    monkeypatch.chdir(start_cwd)
    own = NatsCluster.from_pki(pki, ack_wait="2s")
    try:
        own.start()
        own.wait_healthy(60)
        _a_life_with_a_delete_while_a_node_is_down(pki, own)
        assert Path(psutil.Process(own.nodes[1].pid).cwd()) == own.nodes[1].workdir.resolve()
    finally:
        own.close()
    assert sorted(p.name for p in start_cwd.iterdir()) == []


def _a_life_with_a_delete_while_a_node_is_down(pki: TestPKI, cluster: NatsCluster) -> None:
    from nats.js import api

    async def fill(js: Any) -> None:
        await js.add_stream(api.StreamConfig.from_response(telemetry_stream_config()))
        for seq in range(1, 6):
            await js.publish("vgw-stored.dev-0001.data.g-1", f"m{seq}".encode(), stream="VGW")

    async def delete(js: Any) -> None:
        import asyncio

        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.errors import NotFoundError, ServiceUnavailableError

        deadline = time.monotonic() + 45
        while True:  # until JetStream has re-elected the leaders the dead node held
            try:
                await js.delete_stream("VGW")
                return
            except NotFoundError:
                return  # a try that timed out did delete it
            except (NatsTimeout, ServiceUnavailableError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    _on_cluster(pki, cluster, fill)
    cluster.kill(1)
    _on_cluster(pki, cluster, delete)  # the node that is down is meant to learn of it when it comes back
    cluster.restore()


def test_the_fixture_gives_each_test_the_cluster_whole_and_clean(cluster: NatsCluster, pki: TestPKI) -> None:
    """What one test leaves (a killed node, the stream, a retained message, a persistent session with its
    subscription) is gone when the fixture hands the module's cluster to the next."""
    from nats.js import api

    topic = "vgw/dev-0001/consent"
    pub = Client(pki, "cloud", cluster.nodes[0].port, persistent=False)
    dev = Client(pki, "dev-0001", cluster.nodes[1].port)
    dev.c.subscribe(topic, qos=1)
    info = pub.c.publish(topic, b"left-over", qos=1, retain=True)
    info.wait_for_publish(30)
    assert info.is_published() and dev.subscribe_until(topic, (topic, b"left-over")), dev.messages

    async def make_stream(js: Any) -> None:
        await js.add_stream(api.StreamConfig.from_response(telemetry_stream_config()))

    _on_cluster(pki, cluster, make_stream)
    dev.close()
    pub.close()
    cluster.kill(2)

    _whole_and_clean(cluster, pki)  # what the fixture does before each test

    assert all(n.running for n in cluster.nodes) and cluster.problems() == []

    assert _on_cluster(pki, cluster, _stream_gone)
    again = Client(pki, "dev-0001", cluster.nodes[2].port)
    assert again.session_present is False  # the persistent session (and its subscription) was dropped
    # The retained messages matching a new subscription go out together as the server sets it up: once a
    # retained marker has come, a left-over would have come with it.
    pub = Client(pki, "cloud", cluster.nodes[0].port, persistent=False)
    info = pub.c.publish("vgw/dev-0002/consent", b"marker", qos=1, retain=True)
    info.wait_for_publish(30)
    assert info.is_published()
    assert pub.subscribe_until("vgw/+/consent", ("vgw/dev-0002/consent", b"marker")), pub.messages
    assert not wait_until(lambda: (topic, b"left-over") in pub.messages, 2), pub.messages
    for c in (again, pub):
        c.close()


def test_deploy_nats_definitions_are_the_tested_ones() -> None:
    assert (DEPLOY / "vgw-users.conf").read_text() == authorization_block(["dev-0001", "dev-0002"])
    assert json.loads((DEPLOY / "stream-vgw.json").read_text()) == telemetry_stream_config()
    assert json.loads((DEPLOY / "consumer-vgw-workers.json").read_text()) == telemetry_consumer_config()
    conf = (DEPLOY / "nats.conf").read_text()
    assert "stream_replicas: 3" in conf and "cluster {" in conf and "verify_and_map: true" in conf


# ---------------------------------------------------------------- the cloud: workers on one durable consumer


class Relays:
    """In-process `vgw cloud relay`s (threads), relay i connected to node i first: they get what devices
    publish into the stream (docs/fleet.md "PUBACK is not storage")."""

    def __init__(self, pki: TestPKI, cluster: NatsCluster, n: int = 2) -> None:
        from vgw.cloud.jetstream import NatsOptions
        from vgw.cloud.relay import JetStreamRelay

        opts = NatsOptions(tuple(cluster.nats_urls), pki.ca.cert, pki.cloud.cert, pki.cloud.key)
        self.stop = threading.Event()
        self.relays = [JetStreamRelay(opts, prefer=i, drain_s=10) for i in range(n)]
        self.threads = [threading.Thread(target=r.run, args=(self.stop,), name=f"test-relay-{i}")
                        for i, r in enumerate(self.relays)]
        for t in self.threads:
            t.start()
        assert all(r.ready.wait(30) for r in self.relays)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(20)


class Workers:
    """`vgw cloud listen --nats` worker processes (real CLI), each writing JSON lines to its own file."""

    def __init__(self, tmp: Path, pki: TestPKI, cluster: NatsCluster, keys: Path) -> None:
        self.tmp, self.pki, self.cluster, self.keys = tmp, pki, cluster, keys
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> subprocess.Popen[bytes]:
        err = open(self.tmp / f"{name}.err", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "vgw", "cloud", "listen", "--nats", ",".join(
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
    relays = Relays(pki, cluster)
    w = Workers(tmp_path, pki, cluster, tmp_path / "keys")
    try:
        yield w
    finally:
        w.close()
        relays.close()


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


def test_killing_the_stream_leader_loses_nothing_published_on_the_surviving_nodes(
    workers: Workers, pki: TestPKI, cluster: NatsCluster
) -> None:
    """nats-server 2.9 PUBACKs an MQTT publish before JetStream stores it, and devices on the nodes that
    survive see no failover (so no replay): with the stream capturing device subjects itself, 20 of 250 such
    messages were lost when the leader was killed. The relays hold each message until the stream has stored
    it, so every one arrives (docs/fleet.md "PUBACK is not storage")."""
    from vgw.cloud.jetstream import NatsOptions, stream_leader

    seal = _sealer(workers.keys)
    workers.start("w1")
    opts = NatsOptions(tuple(cluster.nats_urls), pki.ca.cert, pki.cloud.cert, pki.cloud.key)
    leader = [n.server_name for n in cluster.nodes].index(stream_leader(opts))
    survivors = [i for i in range(3) if i != leader]
    a = Client(pki, "dev-0001", cluster.nodes[survivors[0]].port)
    b = Client(pki, "dev-0002", cluster.nodes[survivors[1]].port)
    seqs = range(1, 241)
    threads = [threading.Thread(target=_publish, args=(c, d, seqs, seal, 0.025))
               for c, d in ((a, "dev-0001"), (b, "dev-0002"))]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(workers.seqs("w1")) >= 40, 30)
    cluster.kill(leader)  # kill -9 the stream's leader while both publish through the other nodes
    for t in threads:
        t.join(120)
    cluster.start_node(leader)
    want = _expected(("dev-0001", "dev-0002"), seqs)
    assert wait_until(lambda: set(workers.seqs("w1")) >= want, 60), sorted(want - set(workers.seqs("w1")))[:20]
    assert sorted(set(workers.seqs("w1"))) == sorted(want)


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
        ctx = client_context(pki.ca.cert, pki.cloud.cert, pki.cloud.key)
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


# ---------------------------------------------------------------- the agent: [mqtt] hosts, failover


def test_relay_cli_stores_every_message_once_and_refuses_a_stream_made_for_device_subjects(
    tmp_path: Path, pki: TestPKI, cluster: NatsCluster
) -> None:
    from nats.js import api

    tls = ["--ca", str(pki.ca.cert), "--cert", str(pki.cloud.cert), "--tls-key", str(pki.cloud.key)]
    servers = ",".join(u.removeprefix("tls://") for u in cluster.nats_urls)

    async def old(js: Any) -> None:  # as made before relays: the stream captures what devices publish itself
        await js.add_stream(api.StreamConfig(name="VGW", subjects=["vgw.*.data.>", "vgw.*.receipt"], num_replicas=3))

    async def delete(js: Any) -> None:
        await js.delete_stream("VGW")

    _on_cluster(pki, cluster, old)
    old = vgw("cloud", "relay", "--nats", servers, *tls, "--duration", "5", timeout=60)
    assert old.returncode == 1 and "Traceback" not in old.stderr
    assert "captures" in old.stderr and "stream-vgw.json" in old.stderr, old.stderr
    _on_cluster(pki, cluster, delete)

    def start_relay(i: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "vgw", "cloud", "relay", "--nats", servers, *tls,
                                 "--prefer", str(i)], stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "vgw cloud relay: relaying vgw.*.data.>, vgw.*.receipt into stream VGW" in line, line
        return proc

    relays = [start_relay(0), start_relay(1)]
    a = Client(pki, "dev-0001", cluster.nodes[2].port)
    seal = _sealer_for_test(tmp_path)
    _publish(a, "dev-0001", range(1, 11), seal)
    assert wait_until(lambda: _stream_messages(pki, cluster) >= 10, 20)
    summaries = []
    for proc in relays:
        proc.terminate()  # SIGTERM: store what is held, print the summary, exit 0
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        summaries.append(json.loads(err.strip().splitlines()[-1])["summary"])
    assert [s["received"] for s in summaries] == [10, 10]  # every relay gets every message
    assert sum(s["stored"] for s in summaries) == 10 and sum(s["duplicates"] for s in summaries) == 10
    assert _stream_messages(pki, cluster) == 10  # one copy each: the same Nats-Msg-Id from both relays


def test_a_message_the_stream_can_never_take_does_not_block_a_relay(
    tmp_path: Path, pki: TestPKI, cluster: NatsCluster
) -> None:
    """A device message just under the server's max_payload no longer fits once the relay adds its
    Nats-Msg-Id header: the relay leaves it out and counts it, instead of retrying it for ever (32 such
    messages would have tied up every publisher and stopped the relay storing anything)."""
    relays = Relays(pki, cluster)
    try:
        a = Client(pki, "dev-0001", cluster.nodes[1].port)
        huge = b"x" * (1048576 - 40)  # max_payload is 1 MiB on these nodes
        for _ in range(40):  # more than the 32 publishers of a relay
            a.c.publish("vgw/dev-0001/data/g-1", huge, qos=1).wait_for_publish(10)
        seal = _sealer_for_test(tmp_path)
        _publish(a, "dev-0001", range(1, 6), seal)

        assert wait_until(lambda: _stream_messages(pki, cluster) >= 5, 30), _stream_messages(pki, cluster)
    finally:
        relays.close()
    assert [r.counts.rejected for r in relays.relays] == [40, 40]
    assert [r.counts.unstored_at_exit for r in relays.relays] == [0, 0]
    assert _stream_messages(pki, cluster) == 5


def _on_cluster(pki: TestPKI, cluster: NatsCluster, action: Any) -> Any:
    """Run ``action(js)`` (a coroutine function) on a fresh cloud connection to the cluster; its result."""
    import asyncio

    import nats

    async def run() -> Any:
        nc = await nats.connect(servers=cluster.nats_urls, tls=client_context(pki.ca.cert, pki.cloud.cert,
                                                                           pki.cloud.key))
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


def _stream_messages(pki: TestPKI, cluster: NatsCluster) -> int:
    """How many messages the stream VGW holds."""

    async def count(js: Any) -> int:
        return int((await js.stream_info("VGW")).state.messages)

    return int(_on_cluster(pki, cluster, count))


def _sealer_for_test(tmp_path: Path) -> Any:
    assert vgw("cloud", "keygen", "--dir", str(tmp_path / "keys"), "--recipient", "fleet").returncode == 0
    return _sealer(tmp_path / "keys")


def test_config_hosts_parses_and_refuses_both_forms(tmp_path: Path, pki: TestPKI) -> None:
    from vgw.base.errors import ConfigError
    from vgw.config.settings import load_config

    from tests.agentkit import Authority, write_config

    trust = Authority(tmp_path).trust
    cfg = load_config(write_config(tmp_path, pki, 0, trust, can={"channel": "x"},
                                   mqtt_extra={"hosts": ["a.example:8883", "[::1]:8884", "c:1"]}))
    assert cfg.mqtt.endpoints == (("a.example", 8883), ("::1", 8884), ("c", 1))
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("a.example", 8883)
    single = load_config(write_config(tmp_path, pki, 1883, trust, can={"channel": "x"}))
    assert single.mqtt.endpoints == (("localhost", 1883),)
    for bad, why in ((["a:8883", "a:8883"], "listed twice"), ([], "at least one"), (["a"], "host:port"),
                     (["a:0"], "host:port"), ([8883], "host:port")):
        path = write_config(tmp_path, pki, 0, trust, can={"channel": "x"}, mqtt_extra={"hosts": bad})
        with pytest.raises(ConfigError, match=why):
            load_config(path)
    both = write_config(tmp_path, pki, 0, trust, can={"channel": "x"}, mqtt_extra={"hosts": ["a:1"]})
    both.write_text(both.read_text().replace("[mqtt]\n", '[mqtt]\nhost = "b"\n'))
    with pytest.raises(ConfigError, match="not both"):
        load_config(both)


def test_doctor_checks_every_endpoint(tmp_path: Path, pki: TestPKI, cluster: NatsCluster) -> None:
    from vgw.ops.doctor import FAIL, PASS, Probes, run_checks

    from tests.agentkit import Authority, write_config

    hosts = [f"localhost:{p}" for _h, p in cluster.endpoints]
    cfg = write_config(tmp_path, pki, 0, Authority(tmp_path).trust, can={"channel": "x"},
                       mqtt_extra={"hosts": hosts})
    cluster.kill(1)
    checks = {c.check: c for c in run_checks(cfg, Probes())}
    assert [checks[f"broker {h}"].status for h in hosts] == [PASS, FAIL, PASS]
    assert "cannot connect" in checks[f"broker {hosts[1]}"].detail


class JsRecorder:
    """A cloud recorder fed by one in-process JetStream worker of the durable consumer (a thread)."""

    def __init__(self, pki: TestPKI, cluster: NatsCluster) -> None:
        from vgw.cloud.jetstream import JetStreamWorker, NatsOptions
        from vgw_sim.cloud import CloudRecorder

        self.rec = CloudRecorder()
        for d in pki.devices:
            self.rec.add_device(d, pki.device(d).cert)
        self.relays = Relays(pki, cluster)
        opts = NatsOptions(tuple(cluster.nats_urls), pki.ca.cert, pki.cloud.cert, pki.cloud.key, ack_wait_s=2)
        self.worker = JetStreamWorker(opts, self.rec.record)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,), name="test-js-worker")
        self.thread.start()
        assert self.worker.ready.wait(30)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)
        self.relays.close()


@pytest.fixture
def vehicle_seed() -> int:
    return 7


def _push(peer: Any, device: str, token: str, timeout: float = 60.0) -> None:
    """Publish consent until the cluster acknowledges it, as a consent service does: while JetStream elects
    a new leader for the retained-message stream, a retained publish waits (docs/fleet.md)."""
    from vgw.base.errors import UplinkError

    deadline = time.monotonic() + timeout
    while True:
        try:
            peer.publish_consent(device, token)
            return
        except UplinkError:
            if time.monotonic() > deadline:
                raise


def test_agent_moves_to_another_node_when_its_node_is_killed(
    tmp_path: Path, pki: TestPKI, cluster: NatsCluster, vehicle: Any
) -> None:
    """Agent 1 is on a node that is not the telemetry stream's leader; the leader under an agent is the slow
    test below, and the leader under devices on other nodes is
    test_killing_the_stream_leader_loses_nothing_published_on_the_surviving_nodes."""
    from vgw.cloud.jetstream import stream_leader
    from vgw.daemon.agent import STATUS_FILE
    from vgw_sim.cloud import CloudPeer

    from tests.agentkit import AgentThread, Authority, write_config

    auth = Authority(tmp_path)
    js = JsRecorder(pki, cluster)
    leader = [n.server_name for n in cluster.nodes].index(stream_leader(js.worker.opts))
    k = (leader + 1) % 3  # the node agent 1 starts on, and the one killed
    order = [k, (k + 1) % 3, (k + 2) % 3]
    hosts = [f"localhost:{cluster.nodes[i].port}" for i in order]
    # The consent service talks to the leader's node (not killed); agent 2 starts on the third node.
    peer = CloudPeer("localhost", cluster.nodes[leader].port, ca_file=pki.ca.cert, cert_file=pki.cloud.cert,
                     key_file=pki.cloud.key, protocol="3.1.1", persistent=True, client_id="cloud-consent")
    a2_hosts = [hosts[2], hosts[0], hosts[1]] if order[2] != leader else [hosts[1], hosts[2], hosts[0]]
    try:
        peer.connect(20)
        for gid in ("g-keep", "g-gone", "g-new", "g-2"):
            js.rec.add_recipient(gid, auth.recipient(gid))
        _push(peer, "dev-0001", auth.doc("dev-0001", {"g-keep": ["read_odometer"], "g-gone": ["read_speedometer"]}))
        _push(peer, "dev-0002", auth.doc("dev-0002", {"g-2": ["read_speedometer"]}))
        cfg1 = write_config(tmp_path, pki, 0, auth.trust, can={"channel": vehicle.channel},
                            mqtt_extra={"hosts": hosts, "protocol": "3.1.1"}, state_dir=tmp_path / "s1")
        cfg2 = write_config(tmp_path, pki, 0, auth.trust, device="dev-0002", can={"channel": vehicle.channel},
                            mqtt_extra={"hosts": a2_hosts, "protocol": "3.1.1"}, state_dir=tmp_path / "s2")
        # The nodes the agents must start on take MQTT clients: the first client on a node after a node was
        # killed (the test before killed one) waits until JetStream has elected the MQTT streams' leaders, and an
        # agent would give up on that node meanwhile and rightly start on its next.
        for host in (hosts[0], a2_hosts[0]):
            Client(pki, "cloud", int(host.rpartition(":")[2]), persistent=False, client_id="cloud-ready").close()
        with AgentThread(cfg1) as a1, AgentThread(cfg2) as a2:
            assert a1.wait_link(30) and a2.wait_link(30)
            assert (a1.agent.uplink.view().endpoint, a2.agent.uplink.view().endpoint) == (hosts[0], a2_hosts[0])
            status = tmp_path / "s1" / STATUS_FILE  # what `vgw status` shows
            assert wait_until(lambda: status.exists() and json.loads(status.read_text())["endpoint"] == hosts[0], 10)
            rec = js.rec
            assert rec.wait_for(lambda: len(rec.batches("dev-0001", "g-gone")) >= 3
                                and len(rec.batches("dev-0002", "g-2")) >= 3, 30)
            before = max(rec.seqs("dev-0001", "g-keep"))
            cluster.kill(k)  # kill -9 the node agent 1 is connected to, while data flow
            # Pushed during the failure: revoke g-gone, grant g-new.
            _push(peer, "dev-0001", auth.doc("dev-0001", {"g-keep": ["read_odometer"], "g-new": ["read_speedometer"]}))
            assert wait_until(lambda: (v := a1.agent.uplink.view()).state == "connected" and v.endpoint != hosts[0],
                              60)
            assert rec.wait_for(lambda: rec.receipts("dev-0001", "erasure"), 30), (
                a1.agent.manager.in_force.ver if a1.agent.manager.in_force else None,
                a1.agent.outbox.receipt_count(), js.worker.handled, len(rec.batches()), rec.receipts())
            erasure = rec.receipts("dev-0001", "erasure")[0]
            assert erasure.claims["grant"] == "g-gone" and erasure.claims["key_destroyed"] is True
            assert rec.wait_for(lambda: len(rec.batches("dev-0001", "g-new")) >= 2, 30)
            assert rec.wait_for(lambda: max(rec.seqs("dev-0001", "g-keep")) > before + 5, 30)
            cluster.start_node(k)
            assert a1.agent.uplink.drain(30) and a2.agent.uplink.drain(30)
            for dev, gid in (("dev-0001", "g-keep"), ("dev-0001", "g-gone"), ("dev-0001", "g-new"),
                             ("dev-0002", "g-2")):
                assert rec.wait_for(lambda d=dev, g=gid: rec.missing(d, g) == [], 20), (dev, gid, rec.gaps(dev, gid))
        # every seq once after de-duplication (the recorder drops copies; none are lost)
        for dev, gid in (("dev-0001", "g-keep"), ("dev-0002", "g-2")):
            seqs = rec.seqs(dev, gid)
            assert len(seqs) == len(set(seqs)) and sorted(seqs) == list(range(1, max(seqs) + 1))
        assert [b for b in rec.batches("dev-0001", "g-gone") if b.arrived > erasure.arrived + 1.0] == []
        assert rec.bad_receipts() == [] and rec.undecryptable == 0, \
            [(r.topic, r.reason, r.detail) for r in rec.rejected()]
    finally:
        peer.close()
        js.close()


@pytest.mark.slow
def test_agent_on_the_stream_leader_replays_what_the_dying_leader_acknowledged(
    tmp_path: Path, pki: TestPKI, cluster: NatsCluster, vehicle: Any
) -> None:
    """Kill -9 the telemetry stream's LEADER node while the agent on it publishes: what that node acknowledged
    and lost in the election is replayed through the next node (README "Replay after failover"), so after
    de-duplication every seq arrives. (A device on a node that survives sees no failover; the relays cover
    it: docs/fleet.md, "PUBACK is not storage".)"""
    from vgw.cloud.jetstream import stream_leader
    from vgw_sim.cloud import CloudPeer

    from tests.agentkit import AgentThread, Authority, write_config

    auth = Authority(tmp_path)
    js = JsRecorder(pki, cluster)
    leader = [n.server_name for n in cluster.nodes].index(stream_leader(js.worker.opts))
    order = [leader, (leader + 1) % 3, (leader + 2) % 3]
    hosts = [f"localhost:{cluster.nodes[i].port}" for i in order]
    peer = CloudPeer("localhost", cluster.nodes[order[1]].port, ca_file=pki.ca.cert, cert_file=pki.cloud.cert,
                     key_file=pki.cloud.key, protocol="3.1.1", persistent=True, client_id="cloud-consent")
    try:
        peer.connect(20)
        js.rec.add_recipient("g-keep", auth.recipient("g-keep"))
        _push(peer, "dev-0001", auth.doc("dev-0001", {"g-keep": ["read_speedometer"]}))
        cfg = write_config(tmp_path, pki, 0, auth.trust, can={"channel": vehicle.channel},
                           mqtt_extra={"hosts": hosts, "protocol": "3.1.1"}, state_dir=tmp_path / "s1")
        with AgentThread(cfg) as a1:
            up = a1.agent.uplink
            assert a1.wait_link(30) and up.view().endpoint == hosts[0]
            rec = js.rec
            assert rec.wait_for(lambda: len(rec.batches("dev-0001", "g-keep")) >= 5, 30)
            cluster.kill(leader)  # kill -9 the stream leader, the agent's node, while data flow
            assert wait_until(lambda: up.view().state == "connected" and up.view().endpoint != hosts[0], 60)
            assert wait_until(lambda: up.view().replayed_batches > 0, 60)
            newest = a1.agent.outbox.next_seq("g-keep") - 1
            cluster.start_node(leader)
            assert up.drain(30)
            assert rec.wait_for(lambda: max(rec.seqs("dev-0001", "g-keep"), default=0) >= newest
                                and rec.missing("dev-0001", "g-keep") == [], 60), rec.gaps("dev-0001", "g-keep")
        seqs = rec.seqs("dev-0001", "g-keep")
        assert len(seqs) == len(set(seqs)) and sorted(seqs) == list(range(1, max(seqs) + 1))
    finally:
        peer.close()
        js.close()


def test_deploy_relay_unit_runs_a_relay_command_this_vgw_accepts() -> None:
    from vgw.cli import build_parser
    from vgw.cli.cloud import run_relay

    unit = (DEPLOY / "vgw-cloud-relay@.service").read_text()
    exec_start = next(ln for ln in unit.splitlines() if ln.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").replace("%i", "1").replace(
        "${CREDENTIALS_DIRECTORY}", "/run/credentials/vgw-cloud-relay@1.service").split()
    assert argv[0] == "/opt/vgw/venv/bin/vgw"
    args = build_parser().parse_args(argv[1:])
    assert args.func is run_relay and args.prefer == 1 and args.drain == 60
    # every file it names is a credential the unit loads (a DynamicUser cannot read a 0600 key on disk)
    loaded = {ln.split("=", 1)[1].split(":", 1)[0] for ln in unit.splitlines() if ln.startswith("LoadCredential=")}
    assert {Path(p).name for p in (args.ca, args.cert, args.tls_key)} <= loaded
    timeout = next(ln for ln in unit.splitlines() if ln.startswith("TimeoutStopSec="))
    # the drain, ending both subscriptions together (5 s) and closing (5 s) fit, with room to spare
    assert float(timeout.removeprefix("TimeoutStopSec=").removesuffix("s")) >= args.drain + 20
    families = next(ln for ln in unit.splitlines() if ln.startswith("RestrictAddressFamilies=")).split("=")[1].split()
    assert "AF_UNIX" in families  # asyncio's self-pipe is a Unix socket pair
