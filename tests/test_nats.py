"""The agent against a broker built to cluster: the NATS server's MQTT support (JetStream on, MQTT 3.1.1).

The agent runs unchanged (``[mqtt] protocol`` left at ``auto``: it tries MQTT 5, is refused, and keeps
MQTT 3.1.1 with a persistent session). Then the MQTT features vgw relies on are probed on both engines
with bare clients; ``FEATURES`` is what we observed, asserted here, and copied into docs/fleet.md.
Everything is skipped when nats-server is not installed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from vgw.transport.tlsctx import client_context
from vgw_sim.broker import Mosquitto
from vgw_sim.cloud import CloudPeer
from vgw_sim.nats import NatsMqtt, NatsNotFound, find_nats_server
from vgw_sim.pki import TestPKI

from tests.agentkit import AgentThread, Authority, Vehicle, connected_cloud, wait_until, write_config

try:
    find_nats_server()
except NatsNotFound:
    pytest.skip("nats-server is not installed", allow_module_level=True)

DEV = "dev-0001"

# What each engine honours, as observed by the probes below (docs/fleet.md copies this table).
FEATURES: dict[str, dict[str, bool]] = {
    "mosquitto": {"mqtt5": True, "retained": True, "retained_after_restart": True, "qos1_redelivery": True,
                  "persistent_session": True, "shared_subscriptions": True},
    "nats": {"mqtt5": False, "retained": True, "retained_after_restart": True, "qos1_redelivery": True,
             "persistent_session": True, "shared_subscriptions": False},
}


@pytest.fixture
def nats(pki: TestPKI) -> Iterator[NatsMqtt]:
    server = NatsMqtt.from_pki(pki)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def ncloud(nats: NatsMqtt, pki: TestPKI) -> Iterator[CloudPeer]:
    with connected_cloud(nats, pki, protocol="3.1.1", persistent=True, client_id="cloud-nats") as peer:
        yield peer


@pytest.fixture
def vehicle_seed() -> int:
    return 7  # the seed these tests were written against


# ---------------------------------------------------------------- the agent, unchanged, on NATS


def test_agent_on_nats_retained_consent_data_and_revocation(
    tmp_path: Path, pki: TestPKI, nats: NatsMqtt, ncloud: CloudPeer, vehicle: Vehicle, caplog: pytest.LogCaptureFixture
) -> None:
    auth = Authority(tmp_path)
    for gid in ("g-keep", "g-gone"):
        ncloud.add_recipient(gid, auth.recipient(gid))
    # Consent is published (retained) before the agent exists: it must come from the broker's retained store.
    ncloud.publish_consent(DEV, auth.doc(DEV, {"g-keep": ["read_odometer"], "g-gone": ["read_speedometer"]}))
    cfg = write_config(tmp_path, pki, nats.port, auth.trust, can={"channel": vehicle.channel})
    caplog.set_level(logging.INFO, logger="vgw.uplink.link")
    with AgentThread(cfg) as runner:
        assert runner.wait_link(15)
        assert runner.agent.uplink.view().protocol == "3.1.1"
        assert ncloud.wait_for(lambda: len(ncloud.batches(DEV, "g-gone")) >= 3, 15)
        assert ncloud.wait_for(lambda: ncloud.receipts(DEV, "consent-applied"), 5)
        ncloud.publish_consent(DEV, auth.doc(DEV, {"g-keep": ["read_odometer"]}))
        assert ncloud.wait_for(lambda: ncloud.receipts(DEV, "erasure"), 10)
        receipt = ncloud.receipts(DEV, "erasure")[0]
        keep = len(ncloud.batches(DEV, "g-keep"))
        assert ncloud.wait_for(lambda: len(ncloud.batches(DEV, "g-keep")) > keep, 5)
    assert receipt.claims["grant"] == "g-gone" and receipt.claims["key_destroyed"] is True
    assert [b for b in ncloud.batches(DEV, "g-gone") if b.arrived > receipt.arrived] == []
    for gid in ("g-keep", "g-gone"):
        assert ncloud.missing(DEV, gid) == []
    assert ncloud.bad_receipts() == [] and ncloud.undecryptable == 0
    fallbacks = [r for r in caplog.records if "refused MQTT 5" in r.getMessage()]
    assert len(fallbacks) == 1, "the protocol fallback is logged once"


def test_agent_on_nats_survives_broker_restart_without_loss(
    tmp_path: Path, pki: TestPKI, nats: NatsMqtt, ncloud: CloudPeer, vehicle: Vehicle
) -> None:
    auth = Authority(tmp_path)
    ncloud.add_recipient("g-odo", auth.recipient("g-odo"))
    cfg = write_config(tmp_path, pki, nats.port, auth.trust, can={"channel": vehicle.channel},
                       mqtt_extra={"protocol": "3.1.1"})
    with AgentThread(cfg) as runner:
        assert runner.wait_link(15)
        ncloud.publish_consent(DEV, auth.doc(DEV, {"g-odo": ["read_speedometer"]}))
        assert ncloud.wait_for(lambda: len(ncloud.batches(DEV, "g-odo")) >= 3, 15)
        before = max(ncloud.seqs(DEV, "g-odo"))
        nats.restart()  # JetStream store kept: sessions and retained consent survive
        assert ncloud.wait_connected(20)
        assert runner.wait_link(20)
        assert ncloud.wait_for(lambda: max(ncloud.seqs(DEV, "g-odo")) > before + 5, 20)
        assert runner.agent.uplink.drain(10)
        assert ncloud.wait_for(lambda: ncloud.missing(DEV, "g-odo") == [], 10)
    assert ncloud.missing(DEV, "g-odo") == []
    assert runner.agent.manager.in_force is not None and runner.agent.manager.in_force.ver == 1


# ---------------------------------------------------------------- per-device policy on NATS


def test_nats_device_cannot_touch_another_devices_topics(pki: TestPKI, nats: NatsMqtt, ncloud: CloudPeer) -> None:
    from vgw_sim.cloud import RecipientKey, SigningKey, consent_claims, seal_envelope, sign_consent

    rk = RecipientKey.generate()
    ncloud.add_recipient("g-1", rk)
    token = sign_consent(consent_claims(DEV, 1, []), SigningKey.generate())
    ncloud.publish_consent(DEV, token)
    with Bare(nats, pki, "dev-0002", "3.1.1") as thief, Bare(nats, pki, DEV, "3.1.1") as owner:
        forged = seal_envelope({"v": 1, "device": DEV, "grant": "g-1", "seq": 1, "samples": []}, rk, DEV, "g-1")
        thief.publish(f"vgw/{DEV}/data/g-1", forged)
        thief.publish(f"vgw/{DEV}/receipt", b"x.y.z")
        thief.publish(f"vgw/{DEV}/status", b"{}")
        assert thief.subscribe(f"vgw/{DEV}/consent") != [1]
        assert thief.subscribe("vgw/+/consent") != [1]
        assert thief.subscribe("$MQTT/sub/#") != [1]
        assert owner.subscribe(f"vgw/{DEV}/consent") == [1]
        assert owner.wait(lambda: owner.messages, 5)
        good = seal_envelope({"v": 1, "device": DEV, "grant": "g-1", "seq": 2, "samples": []}, rk, DEV, "g-1")
        owner.publish(f"vgw/{DEV}/data/g-1", good)
        assert ncloud.wait_for(lambda: ncloud.seqs(DEV, "g-1") == [2], 5)
        time.sleep(0.3)
        assert thief.messages == []
    assert ncloud.receipts() == [] and ncloud.bad_receipts() == [] and ncloud.status(DEV) is None
    assert "Publish Violation" in nats.log_text()


# ---------------------------------------------------------------- feature probes, both engines


class Bare:
    """A bare paho client over mutual TLS that records messages (manual acks optional)."""

    def __init__(self, broker: Any, pki: TestPKI, name: str, protocol: str, *, client_id: str | None = None,
                 persistent: bool = False, manual_ack: bool = False) -> None:
        creds = pki.cloud if name == "cloud" else pki.device(name)
        v5 = protocol == "5"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or name,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else not persistent, manual_ack=manual_ack)
        self.c.tls_set_context(client_context(pki.ca.cert, creds.cert, creds.key))
        self.cond = threading.Condition()
        self.messages: list[Any] = []
        self.subacks: dict[int, list[int]] = {}
        self.connack: str | None = None
        self.c.on_message = self._msg
        self.c.on_subscribe = self._sub
        self.c.on_connect = self._conn
        self.c.on_disconnect = lambda *a: None
        kwargs: dict[str, Any] = {}
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if persistent else 0
            kwargs = {"clean_start": not persistent, "properties": props}
        self.c.connect("localhost", broker.port, **kwargs)
        self.c.loop_start()
        assert self.wait(lambda: self.connack is not None, 10), "no CONNACK"

    def _conn(self, c: Any, u: Any, flags: Any, rc: Any, p: Any) -> None:
        with self.cond:
            self.connack = str(rc)
            self.cond.notify_all()

    def _msg(self, c: Any, u: Any, m: Any) -> None:
        with self.cond:
            self.messages.append((m.topic, bytes(m.payload), m.retain, m.dup, m.mid))
            self.cond.notify_all()

    def _sub(self, c: Any, u: Any, mid: int, rcs: Any, p: Any) -> None:
        with self.cond:
            self.subacks[mid] = [r.value if not r.is_failure else 0x80 for r in rcs]
            self.cond.notify_all()

    def wait(self, pred: Any, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def subscribe(self, topic: str) -> list[int]:
        _rc, mid = self.c.subscribe(topic, 1)
        assert self.wait(lambda: mid in self.subacks, 5)
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def drop(self) -> None:
        """Close the socket without DISCONNECT (a lost link, not a clean goodbye)."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()

    def __enter__(self) -> Bare:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(params=["mosquitto", "nats"])
def engine(request: pytest.FixtureRequest, pki: TestPKI) -> Iterator[tuple[str, Any, str]]:
    """(name, started broker with persistence, MQTT protocol to use) for each engine."""
    if request.param == "mosquitto":
        broker: Any = Mosquitto.from_pki(pki, persistence=True)
        proto = "5"
    else:
        broker = NatsMqtt.from_pki(pki)
        proto = "3.1.1"
    try:
        broker.start()
        yield request.param, broker, proto
    finally:
        broker.close()


def test_engine_feature_matrix(engine: tuple[str, Any, str], pki: TestPKI) -> None:
    name, broker, proto = engine
    seen: dict[str, bool] = {}

    # MQTT 5: does the engine accept an MQTT 5 CONNECT?
    probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cloud-v5probe", protocol=mqtt.MQTTv5)
    result: list[str] = []
    probe.on_connect = lambda c, u, f, rc, p: result.append(str(rc))
    probe.tls_set_context(client_context(pki.ca.cert, pki.cloud.cert, pki.cloud.key))
    probe.connect("localhost", broker.port)
    probe.loop_start()
    wait_until(lambda: result, 5)
    probe.disconnect()
    probe.loop_stop()
    seen["mqtt5"] = result == ["Success"]

    # Retained consent: a device that subscribes later gets it; also after a broker restart.
    with Bare(broker, pki, "cloud", proto, client_id="cloud-probe") as cloud:
        cloud.publish(f"vgw/{DEV}/consent", b"doc-1", retain=True)
    with Bare(broker, pki, DEV, proto) as dev:
        dev.subscribe(f"vgw/{DEV}/consent")
        seen["retained"] = dev.wait(lambda: any(m[1] == b"doc-1" and m[2] for m in dev.messages), 3)
    time.sleep(1.2)  # mosquitto autosaves every second
    broker.restart()
    with Bare(broker, pki, DEV, proto) as dev:
        dev.subscribe(f"vgw/{DEV}/consent")
        seen["retained_after_restart"] = dev.wait(lambda: any(m[1] == b"doc-1" for m in dev.messages), 3)

    # Persistent session: subscribe once, go away cleanly, a QoS 1 message is published meanwhile, come back
    # *without* re-subscribing: the session (subscription + queued message) must still be there.
    sub = Bare(broker, pki, "cloud", proto, client_id="cloud-session", persistent=True)
    sub.subscribe("vgw/+/receipt")
    sub.close()
    with Bare(broker, pki, DEV, proto) as dev:
        dev.publish(f"vgw/{DEV}/receipt", b"r-while-away")
    with Bare(broker, pki, "cloud", proto, client_id="cloud-session", persistent=True) as back:
        seen["persistent_session"] = back.wait(lambda: any(m[1] == b"r-while-away" for m in back.messages), 5)

    # QoS 1 redelivery: a message delivered but never PUBACKed (link lost) comes again after reconnect.
    taker = Bare(broker, pki, "cloud", proto, client_id="cloud-redeliver", persistent=True, manual_ack=True)
    taker.subscribe("vgw/+/status")
    with Bare(broker, pki, DEV, proto) as dev:
        dev.publish(f"vgw/{DEV}/status", b"unacked")
    got_first = taker.wait(lambda: any(m[1] == b"unacked" for m in taker.messages), 5)
    taker.drop()
    time.sleep(0.3)
    with Bare(broker, pki, "cloud", proto, client_id="cloud-redeliver", persistent=True) as again:
        # NATS redelivers after the consumer's ack_wait (5 s in vgw_sim.nats), mosquitto at reconnect.
        seen["qos1_redelivery"] = got_first and again.wait(
            lambda: any(m[1] == b"unacked" for m in again.messages), 8)

    # Shared subscriptions: two members of one group, ten messages, each delivered exactly once in total.
    a = Bare(broker, pki, "cloud", proto, client_id="cloud-share-a")
    b = Bare(broker, pki, "cloud", proto, client_id="cloud-share-b")
    try:
        ok = all(x.subscribe("$share/grp/vgw/+/data/#") == [1] for x in (a, b))
        with Bare(broker, pki, DEV, proto) as dev:
            for i in range(10):
                dev.publish(f"vgw/{DEV}/data/g", str(i).encode())
        wait_until(lambda: len(a.messages) + len(b.messages) >= 10, 5)
        time.sleep(0.3)  # a duplicate delivery would arrive meanwhile (the negative half of "exactly once")
        got = [m[1] for m in a.messages] + [m[1] for m in b.messages]
        seen["shared_subscriptions"] = ok and sorted(got) == sorted(str(i).encode() for i in range(10)) \
            and bool(a.messages) and bool(b.messages)
    finally:
        a.close()
        b.close()

    assert seen == FEATURES[name], f"{name}: observed {seen}"


# ---------------------------------------------------------------- the deploy/ examples are the tested policy


def test_deploy_nats_example_is_valid_and_matches_the_tested_permissions(tmp_path: Path, pki: TestPKI) -> None:
    import subprocess

    from vgw_sim.nats import authorization_block

    root = Path(__file__).resolve().parents[1] / "deploy" / "nats"
    users = (root / "vgw-users.conf").read_text()
    assert users == authorization_block(["dev-0001", "dev-0002"])  # the block the tests above run with
    conf = (root / "nats.conf").read_text()
    conf = conf.replace("/etc/vgw/broker/route", str(pki.dir / "server")).replace("/etc/vgw/broker/", f"{pki.dir}/")
    conf = conf.replace("/var/lib/nats", str(tmp_path / "js"))
    (tmp_path / "nats.conf").write_text(conf)
    (tmp_path / "vgw-users.conf").write_text(users)
    r = subprocess.run([find_nats_server(), "-t", "-c", str(tmp_path / "nats.conf")], capture_output=True, text=True,
                       env={**os.environ, "NATS_SERVER_NAME": "nats-1"}, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cloud_listen_on_nats_falls_back_to_311_and_refuses_share_clearly(
    tmp_path: Path, pki: TestPKI, nats: NatsMqtt
) -> None:
    from tests.agentkit import vgw

    assert vgw("cloud", "keygen", "--dir", str(tmp_path / "k"), "--recipient", "f").returncode == 0
    common = ["cloud", "listen", "--broker", f"localhost:{nats.port}", "--ca", str(pki.ca.cert), "--cert",
              str(pki.cloud.cert), "--tls-key", str(pki.cloud.key), "--recipient", str(tmp_path / "k"),
              "--duration", "0.5"]
    ok = vgw(*common)
    assert ok.returncode == 0 and "subscribed (MQTT 3.1.1)" in ok.stderr, ok.stderr
    shared = vgw(*common, "--share", "workers")
    assert shared.returncode == 1 and "refused subscription" in shared.stderr and "$share/workers" in shared.stderr
