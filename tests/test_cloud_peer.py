"""The reference cloud peer and the private broker: mutual TLS, per-device ACL, consent, envelopes, receipts.

Everything goes through a real mosquitto over TLS; the device side is a bare paho client in this module, and
envelopes and receipts are made here directly with ``cryptography`` / PyJWT, so the peer is checked against
README "The contract, in our words" rather than against itself.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from vgw.base.errors import UplinkError
from vgw_sim.broker import Mosquitto, device_acl
from vgw_sim.cloud import (
    CONSENT_TYP,
    CloudPeer,
    EnvelopeError,
    ReceiptError,
    RecipientKey,
    SigningKey,
    consent_claims,
    grant,
    open_envelope,
    seal_envelope,
    sign_consent,
    verify_receipt,
)
from vgw_sim.pki import CertPaths, TestPKI, device_public_key_from_cert, load_private_key

GRANT = "g-fleet-1"


# ---------------------------------------------------------------- a bare device client


class Device:
    """A minimal MQTT v5 device over mutual TLS that records what it receives (test helper)."""

    def __init__(self, broker: Mosquitto, ca: Path, creds: CertPaths, client_id: str) -> None:
        self._lock = threading.Condition()
        self.messages: list[tuple[str, bytes, bool]] = []
        self._acks: dict[int, int] = {}
        self._subacks: dict[int, list[int]] = {}
        self._connected = threading.Event()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(str(creds.cert), str(creds.key))
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTProtocolVersion.MQTTv5
        )
        self.client.tls_set_context(ctx)
        self.client.on_connect = lambda c, u, f, rc, p: self._connected.set() if not rc.is_failure else None
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise AssertionError(f"device {client_id} did not connect")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._lock.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._lock:
            self._acks[mid] = rc.value
            self._lock.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._lock:
            self._subacks[mid] = [rc.value for rc in rcs]
            self._lock.notify_all()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish QoS 1 and return the PUBACK reason code (0 = accepted)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            assert self._lock.wait_for(lambda: info.mid in self._acks, 10), f"no PUBACK for {topic}"
            return self._acks.pop(info.mid)

    def subscribe(self, topic: str) -> list[int]:
        """Subscribe QoS 1 and return the SUBACK reason codes."""
        _rc, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        with self._lock:
            assert self._lock.wait_for(lambda: mid in self._subacks, 10), f"no SUBACK for {topic}"
            return self._subacks.pop(mid)

    def wait_messages(self, n: int, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self.messages) >= n, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices(broker: Mosquitto, pki: TestPKI) -> Iterator[dict[str, Device]]:
    """``dev-0001`` and ``dev-0002`` connected with their own certificates."""
    made: dict[str, Device] = {}
    try:
        for device_id in ("dev-0001", "dev-0002"):
            made[device_id] = Device(broker, pki.ca.cert, pki.device(device_id), device_id)
        yield made
    finally:
        for dev in made.values():
            dev.close()


@pytest.fixture
def recipient(cloud: CloudPeer) -> RecipientKey:
    """An X25519 recipient key for ``GRANT``, registered with the cloud peer."""
    key = RecipientKey.generate()
    cloud.add_recipient(GRANT, key)
    return key


def seal(
    pk: x25519.X25519PublicKey, device: str, grant_id: str, seq: int, samples: list[dict[str, Any]]
) -> bytes:
    """README "Telemetry envelope" written out with cryptography alone: 0x01 || HPKE(zlib(JSON))."""
    batch = {"v": 1, "device": device, "grant": grant_id, "seq": seq, "samples": samples}
    plaintext = zlib.compress(json.dumps(batch).encode("utf-8"))
    suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
    sealed = suite.encrypt(plaintext, pk, info=b"vgw/1 " + device.encode() + b"/" + grant_id.encode())
    return b"\x01" + sealed


def speed(t: float, v: float) -> dict[str, Any]:
    return {"t": t, "path": "Vehicle.Speed", "value": v}


# ---------------------------------------------------------------- mutual TLS


def _mqtt_connect_over_tls(port: int, ctx: ssl.SSLContext) -> bytes:
    """Open TLS, send an MQTT v5 CONNECT, and return what the broker answers (b"" if it hangs up)."""
    connect = b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01x"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(connect)
                return tls.recv(16)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


def _client_ctx(ca: Path, creds: CertPaths | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    if creds is not None:
        ctx.load_cert_chain(str(creds.cert), str(creds.key))
    return ctx


def test_broker_requires_a_client_certificate_from_its_ca(broker: Mosquitto, pki: TestPKI) -> None:
    # Positive control: the same raw CONNECT with a good device certificate gets a CONNACK (0x20).
    assert (
        _mqtt_connect_over_tls(broker.port, _client_ctx(pki.ca.cert, pki.device("dev-0001")))[:1] == b"\x20"
    )
    # No certificate at all: the TLS handshake or the first read fails, no CONNACK.
    assert _mqtt_connect_over_tls(broker.port, _client_ctx(pki.ca.cert, None)) == b""
    # A certificate with the right CN from another CA: refused the same way.
    rogue = pki.other_ca("rogue", devices=["dev-0001"])
    assert _mqtt_connect_over_tls(broker.port, _client_ctx(pki.ca.cert, rogue.device("dev-0001"))) == b""


def test_cloud_peer_with_untrusted_certificate_raises(broker: Mosquitto, pki: TestPKI) -> None:
    rogue = pki.other_ca("rogue-cloud")
    peer = CloudPeer(
        broker.host, broker.port, ca_file=pki.ca.cert, cert_file=rogue.cloud.cert, key_file=rogue.cloud.key
    )
    try:
        with pytest.raises(UplinkError):
            peer.connect(timeout=5)
    finally:
        peer.close()


def test_cloud_peer_refuses_broker_with_wrong_host_certificate(pki: TestPKI) -> None:
    bad = pki.wrong_host_server_cert()
    with Mosquitto.from_pki(pki, server=(bad.cert, bad.key)) as mosq:
        peer = CloudPeer.for_broker(mosq, pki)
        try:
            with pytest.raises(UplinkError, match="certificate"):
                peer.connect(timeout=5)
        finally:
            peer.close()


# ---------------------------------------------------------------- per-device ACL


def test_device_cannot_publish_under_another_device_id(
    cloud: CloudPeer, devices: dict[str, Device], recipient: RecipientKey
) -> None:
    pk = recipient.private_key.public_key()
    assert isinstance(pk, x25519.X25519PublicKey)
    # A well-formed envelope for dev-0001 that the cloud would accept if the broker let it through.
    forged = seal(pk, "dev-0001", GRANT, 1, [speed(1.0, 99.0)])
    rc = devices["dev-0002"].publish(f"vgw/dev-0001/data/{GRANT}", forged)
    assert rc in (0, 0x87)  # mosquitto 2 may PUBACK success and silently drop; never deliver
    devices["dev-0002"].publish("vgw/dev-0001/receipt", b"x.y.z")
    devices["dev-0002"].publish("vgw/dev-0001/status", b'{"online": false}')
    # Positive control after the forgeries: MQTT keeps order per publisher/subscriber pair at QoS 1.
    assert devices["dev-0001"].publish(f"vgw/dev-0001/data/{GRANT}", seal(pk, "dev-0001", GRANT, 2, [])) == 0
    assert cloud.wait_for(lambda: cloud.seqs("dev-0001", GRANT) == [2], 5)
    assert cloud.receipts() == [] and cloud.bad_receipts() == []
    assert cloud.status("dev-0001") is None
    assert cloud.rejected() == []


def test_device_cannot_read_another_devices_consent(
    cloud: CloudPeer, devices: dict[str, Device], pki: TestPKI
) -> None:
    key = SigningKey.generate()
    token = sign_consent(consent_claims("dev-0001", 1, []), key)
    cloud.publish_consent("dev-0001", token)
    devices["dev-0002"].subscribe("vgw/dev-0001/consent")
    devices["dev-0002"].subscribe("vgw/+/consent")
    assert devices["dev-0001"].subscribe("vgw/dev-0001/consent") == [1]
    assert devices["dev-0001"].wait_messages(1, 5)
    assert devices["dev-0001"].messages == [("vgw/dev-0001/consent", token.encode(), True)]
    assert not devices["dev-0002"].wait_messages(1, 0.5)


def test_acl_body_names_only_own_topics() -> None:
    body = device_acl("vgw")
    assert "pattern write vgw/%u/data/#" in body and "pattern read vgw/%u/consent" in body
    assert "pattern read vgw/%u/data" not in body  # a device never reads telemetry, not even its own
    with pytest.raises(ValueError):
        device_acl("vgw/#")


# ---------------------------------------------------------------- consent (§5)


def test_consent_jws_round_trip(tmp_path: Path, recipient: RecipientKey) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    g = grant(
        GRANT, ["read_speedometer", "read_location"], recipient, limits={"read_location": {"max_hz": 0.2}}
    )
    claims = consent_claims("dev-0001", 7, [g], iat=1_795_920_000, exp=1_796_006_400)
    token = sign_consent(claims, key)

    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["typ"] == CONSENT_TYP
    pem = key.write_public_pem(tmp_path / "signer.pub.pem")
    public = serialization.load_pem_public_key(pem.read_bytes())
    decoded = jwt.decode(token, public, algorithms=["EdDSA"], options={"verify_exp": False})
    assert decoded == claims
    assert decoded["grants"][0]["recipient"] == {"kem": "X25519", "pk": recipient.pk_b64}
    assert len(jwt.utils.base64url_decode(recipient.pk_b64)) == 32

    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, other.public_key, algorithms=["EdDSA"], options={"verify_exp": False})
    with pytest.raises(jwt.InvalidAlgorithmError):  # pinned: the token's alg must be in the allowed list
        jwt.decode(token, public, algorithms=["ES256"], options={"verify_exp": False})
    assert jwt.get_unverified_header(sign_consent(claims, key, headers={"typ": "JWT"}))["typ"] == "JWT"
    assert "typ" not in jwt.get_unverified_header(sign_consent(claims, key, headers={"typ": None}))


# ---------------------------------------------------------------- telemetry (§6)


def test_envelope_through_broker_is_opened(
    cloud: CloudPeer, devices: dict[str, Device], recipient: RecipientKey
) -> None:
    pk = recipient.private_key.public_key()
    assert isinstance(pk, x25519.X25519PublicKey)
    samples = [speed(1795920000.125, 52.4), {"t": 1795920000.2, "path": "Vehicle.Cabin.Door", "value": True}]
    assert (
        devices["dev-0001"].publish(f"vgw/dev-0001/data/{GRANT}", seal(pk, "dev-0001", GRANT, 1, samples))
        == 0
    )
    assert cloud.wait_for(lambda: len(cloud.samples("dev-0001", GRANT)) == 2, 5)
    got = cloud.samples("dev-0001", GRANT)
    assert [(s.t, s.path, s.value, s.seq) for s in got] == [
        (x["t"], x["path"], x["value"], 1) for x in samples
    ]
    assert abs(got[0].arrived - time.time()) < 10
    assert cloud.undecryptable == 0


def test_undecryptable_envelopes_are_counted_not_accepted(
    cloud: CloudPeer, devices: dict[str, Device], recipient: RecipientKey
) -> None:
    pk = recipient.private_key.public_key()
    assert isinstance(pk, x25519.X25519PublicKey)
    stranger = x25519.X25519PrivateKey.generate().public_key()
    good = seal(pk, "dev-0001", GRANT, 1, [])
    dev = devices["dev-0001"]
    dev.publish(f"vgw/dev-0001/data/{GRANT}", b"\x02" + good[1:])  # unknown version
    dev.publish(f"vgw/dev-0001/data/{GRANT}", seal(stranger, "dev-0001", GRANT, 1, []))  # other recipient
    dev.publish(
        f"vgw/dev-0001/data/{GRANT}", seal(pk, "dev-0001", "g-other", 1, [])
    )  # info for another grant
    dev.publish(f"vgw/dev-0001/data/{GRANT}", good[:-1] + bytes([good[-1] ^ 1]))  # tampered tag
    dev.publish("vgw/dev-0001/data/g-unknown", good)  # no key for that grant
    assert cloud.wait_for(lambda: cloud.undecryptable == 5, 5)
    reasons = sorted(r.reason for r in cloud.rejected())
    assert reasons == ["hpke", "hpke", "hpke", "no-key", "version"]
    assert cloud.batches() == []


def test_duplicates_dropped_and_gaps_detected(
    cloud: CloudPeer, devices: dict[str, Device], recipient: RecipientKey
) -> None:
    pk = recipient.private_key.public_key()
    assert isinstance(pk, x25519.X25519PublicKey)
    for seq in (1, 2, 2, 4, 5, 5, 8):
        payload = seal(pk, "dev-0001", GRANT, seq, [speed(float(seq), 10.0 * seq)])
        assert devices["dev-0001"].publish(f"vgw/dev-0001/data/{GRANT}", payload) == 0
    assert cloud.wait_for(
        lambda: cloud.duplicates("dev-0001", GRANT) == 2 and len(cloud.seqs("dev-0001", GRANT)) == 5, 5
    )
    assert cloud.seqs("dev-0001", GRANT) == [1, 2, 4, 5, 8]
    assert cloud.missing("dev-0001", GRANT) == [3, 6, 7]
    assert cloud.gaps("dev-0001", GRANT) == [(3, 3), (6, 7)]
    assert [s.value for s in cloud.samples("dev-0001", GRANT)] == [10.0, 20.0, 40.0, 50.0, 80.0]
    summary = cloud.summary()["streams"][f"dev-0001/{GRANT}"]
    assert summary["duplicates"] == 2 and summary["gaps"] == [[3, 3], [6, 7]]


def test_open_envelope_offline_rules() -> None:
    for kem in ("X25519", "MLKEM768-X25519"):
        key = RecipientKey.generate(kem)
        batch = {"v": 1, "device": "dev-0001", "grant": GRANT, "seq": 3, "samples": [speed(1.0, 2.0)]}
        payload = seal_envelope(batch, key, "dev-0001", GRANT)
        assert open_envelope(payload, key, "dev-0001", GRANT) == batch
        with pytest.raises(EnvelopeError) as err:
            open_envelope(payload, key, "dev-0002", GRANT)  # replayed onto another device's topic
        assert err.value.reason == "hpke"
    key = RecipientKey.generate()
    relabelled = seal_envelope({**batch, "device": "dev-0002"}, key, "dev-0001", GRANT)
    with pytest.raises(EnvelopeError) as err:
        open_envelope(relabelled, key, "dev-0001", GRANT)
    assert err.value.reason == "mismatch"
    bad_seq = seal_envelope({**batch, "seq": 0}, key, "dev-0001", GRANT)
    with pytest.raises(EnvelopeError, match="seq"):
        open_envelope(bad_seq, key, "dev-0001", GRANT)


# ---------------------------------------------------------------- receipts (§7)


def test_receipts_verified_with_device_certificate_key(
    cloud: CloudPeer, devices: dict[str, Device], pki: TestPKI
) -> None:
    device_key = load_private_key(pki.device("dev-0001").key)
    claims = {"typ": "consent-applied", "sub": "dev-0001", "iat": int(time.time()), "ver": 7}
    good = jwt.encode(claims, device_key, algorithm="ES256")
    forged = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    wrong_sub = jwt.encode({**claims, "sub": "dev-0002"}, device_key, algorithm="ES256")
    dev = devices["dev-0001"]
    for token in (good, forged, wrong_sub, "not-a-jws"):
        assert dev.publish("vgw/dev-0001/receipt", token.encode()) == 0
    assert cloud.wait_for(lambda: len(cloud.receipts()) + len(cloud.bad_receipts()) == 4, 5)
    (receipt,) = cloud.receipts("dev-0001", typ="consent-applied")
    assert receipt.claims == claims and receipt.token == good
    bad = cloud.bad_receipts("dev-0001")
    assert [b.token for b in bad] == [forged, wrong_sub, "not-a-jws"]
    assert "signature" in bad[0].reason.lower() and "dev-0002" in bad[1].reason


def test_verify_receipt_offline_pins_es256(pki: TestPKI) -> None:
    public = device_public_key_from_cert(pki.device("dev-0002").cert)
    key = load_private_key(pki.device("dev-0002").key)
    claims = {
        "typ": "erasure",
        "sub": "dev-0002",
        "iat": int(time.time()),
        "grant": GRANT,
        "ver": 8,
        "batches_deleted": 3,
        "key_destroyed": True,
    }
    assert verify_receipt(jwt.encode(claims, key, algorithm="ES256"), public, device="dev-0002") == claims
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(ReceiptError):
        verify_receipt(unsigned, public)
    with pytest.raises(ReceiptError, match="iat"):
        verify_receipt(jwt.encode({"typ": "erasure", "sub": "dev-0002"}, key, algorithm="ES256"), public)


# ---------------------------------------------------------------- status and outage


def test_status_recorded_and_peer_survives_broker_restart(
    cloud: CloudPeer, devices: dict[str, Device], broker: Mosquitto, recipient: RecipientKey, pki: TestPKI
) -> None:
    devices["dev-0001"].publish("vgw/dev-0001/status", b'{"online": true}', retain=True)
    devices["dev-0002"].publish("vgw/dev-0002/status", b"not json")
    assert cloud.wait_for(lambda: cloud.status("dev-0001") == {"online": True} and cloud.rejected() != [], 5)
    assert [r.reason for r in cloud.rejected()] == ["status-json"]
    assert cloud.undecryptable == 0

    port = broker.port
    broker.restart()
    assert broker.port == port
    assert cloud.wait_connected(15), "cloud peer did not reconnect and resubscribe"
    assert cloud.connections == 2

    pk = recipient.private_key.public_key()
    assert isinstance(pk, x25519.X25519PublicKey)
    fresh = Device(broker, pki.ca.cert, pki.device("dev-0001"), "dev-0001-after-restart")
    try:
        assert fresh.publish(f"vgw/dev-0001/data/{GRANT}", seal(pk, "dev-0001", GRANT, 1, [])) == 0
        assert cloud.wait_for(lambda: cloud.seqs("dev-0001", GRANT) == [1], 5)
    finally:
        fresh.close()


def test_persistent_cloud_session_gets_what_was_sent_while_away(
    broker: Mosquitto, pki: TestPKI, devices: dict[str, Device]
) -> None:
    key = RecipientKey.generate()
    pk = key.private_key.public_key()
    assert isinstance(pk, x25519.X25519PublicKey)
    first = CloudPeer.for_broker(broker, pki, client_id="cloud-durable", persistent=True)
    first.connect()
    first.close()  # the broker keeps the session and its subscriptions (session expiry 1 h)
    assert devices["dev-0001"].publish(f"vgw/dev-0001/data/{GRANT}", seal(pk, "dev-0001", GRANT, 1, [])) == 0
    second = CloudPeer.for_broker(broker, pki, client_id="cloud-durable", persistent=True)
    second.add_recipient(GRANT, key, device="dev-0001")
    try:
        second.connect()
        assert second.wait_for(lambda: second.seqs("dev-0001", GRANT) == [1], 5)
    finally:
        second.close()
