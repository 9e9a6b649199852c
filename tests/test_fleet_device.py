"""One simulated fleet device against a real mosquitto: it speaks the device contract through the agent's code.

The fleet figures of docs/fleet.md are only about vgw if the simulated device is vgw on the wire: it judges
consent documents by every rule of the agent's verifier (README "Consent document"), sends the version 2
envelope the agent sends (README "Telemetry envelope"), signs its receipts with the agent's signer (README
"Receipts") and asks again for a refused consent subscription by the agent's rule (README "Topics").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from vgw.base.errors import ConsentReason
from vgw.contract.backoff import (
    SUBACK_TIMEOUT_S,
    SUBSCRIBE_RETRY_FIRST_S,
    SUBSCRIBE_RETRY_MAX_S,
    Resubscribe,
)
from vgw.contract.certs import load_private_key
from vgw.contract.receipt_types import ErasureReason, ReceiptType
from vgw.contract.receipts import RECEIPT_TYP
from vgw.contract.sealing import SENT_VERSION
from vgw.contract.topics import (
    PREFIX,
    Kind,
    Stream,
    consent_topic,
    data_topic,
    device_filters,
    parse_device_topic,
    parse_request_topic,
    request_filters,
    request_topic,
)
from vgw.transport.tlsctx import client_context
from vgw_sim.broker import Mosquitto
from vgw_sim.cloud import CloudPeer, open_envelope
from vgw_sim.fleet_device import SimDevice, Worker, make_client
from vgw_sim.pki import TestPKI

from tests.agentkit import wait_until
from tests.consentkit import Authority

DEVICE = "dev-0001"


@pytest.fixture
def device(broker: Mosquitto, pki: TestPKI, tmp_path: Path) -> Iterator[tuple[SimDevice, Authority]]:
    """One simulated device on its own worker thread, connected to ``broker``; stopped when the test ends."""
    authority = Authority(tmp_path)
    worker = Worker("t", period_s=0.2, n_samples=5)
    paths = pki.device(DEVICE)
    client = make_client(DEVICE, "5", client_context(pki.ca.cert, paths.cert, paths.key), True)
    dev = SimDevice(DEVICE, load_private_key(paths.key), authority.key.public_key, worker, client)
    dev.replay_window = 600.0  # keeps every acknowledged envelope: the test reads them after the worker stopped
    worker.devices.append(dev)
    worker.connect_args = (broker.host, broker.port, "5", True)
    worker.thread.start()
    try:
        assert wait_until(lambda: dev.connected, 15)
        yield dev, authority
    finally:
        worker.stop.set()
        worker.thread.join(10)


def test_sim_device_judges_consent_with_the_agents_verifier_and_speaks_v2(
        device: tuple[SimDevice, Authority], cloud: CloudPeer) -> None:
    dev, authority = device
    recipient = authority.recipient("g-1")
    cloud.add_recipient("g-1", recipient)
    # A bare signature check took the first two; the agent's verifier refuses each with its own reason.
    cloud.publish_consent(DEVICE, authority.doc(DEVICE, 5, [authority.grant("g-x", ["control_security"])]))
    cloud.publish_consent(DEVICE, authority.sign(authority.claims(DEVICE, 6, [authority.grant(
        "g-x", ["read_speedometer"])]), headers={"typ": "JWT"}))
    cloud.publish_consent(DEVICE, authority.doc(DEVICE, 7, [authority.grant("g-1", ["read_speedometer"])]))
    assert wait_until(lambda: cloud.receipts(DEVICE, ReceiptType.CONSENT_APPLIED))
    applied = cloud.receipts(DEVICE, ReceiptType.CONSENT_APPLIED)
    assert [r.claims["ver"] for r in applied] == [7]
    assert dev.rejected == {ConsentReason.CONTROL_SCOPE: 1, ConsentReason.TYP: 1}
    assert jwt.get_unverified_header(applied[0].token)["typ"] == RECEIPT_TYP  # the agent's signer's header
    # Rollback: a genuine older document is refused by the version rule (it was silently ignored before).
    cloud.publish_consent(DEVICE, authority.doc(DEVICE, 6, [authority.grant("g-1", ["read_speedometer"])]))
    assert wait_until(lambda: dev.rejected[ConsentReason.VERSION_ROLLBACK] == 1)
    assert dev.consent is not None and dev.consent.ver == 7

    dev.worker.publishing.set()
    assert wait_until(lambda: len(cloud.batches(DEVICE, "g-1")) >= 3, 15)
    # What goes out is the version 2 (columnar) plaintext the agent sends; the cloud kit opens it.
    batch = open_envelope(dev.kept[0][2], recipient, DEVICE, "g-1")
    assert batch["v"] == SENT_VERSION == 2 and "series" in batch and batch["epoch"] == dev.epoch
    assert len(batch["samples"]) == 5 and all(isinstance(s["t"], float) for s in batch["samples"])
    assert [b.seq for b in cloud.batches(DEVICE, "g-1")][:3] == [1, 2, 3]

    kept = sum(1 for _a, gid, _e in list(dev.kept) if gid == "g-1")
    cloud.publish_consent(DEVICE, authority.doc(DEVICE, 8, []))
    assert wait_until(lambda: cloud.receipts(DEVICE, ReceiptType.ERASURE))
    erasure = cloud.receipts(DEVICE, ReceiptType.ERASURE)[0].claims
    assert erasure["grant"] == "g-1" and erasure["ver"] == 8 and erasure["key_destroyed"] is True
    assert erasure["reason"] == ErasureReason.REVOKED and erasure["batches_deleted"] >= kept >= 3
    assert not cloud.bad_receipts()


def test_resubscribe_backs_off_as_readme_topics_says() -> None:
    """README "Topics": a refused consent subscription is asked again after 1 s, doubling up to 30 s; no answer
    at all, after 30 s; a granted one (or a new connection) starts afresh."""
    r = Resubscribe()
    r.sent(100.0, queued=True)
    assert r.due == 100.0 + SUBACK_TIMEOUT_S and not r.is_due(129.0) and r.is_due(130.0)
    waits = [r.refused(0.0) for _ in range(8)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert waits[0] == SUBSCRIBE_RETRY_FIRST_S and max(waits) == SUBSCRIBE_RETRY_MAX_S and r.refusals == 8
    r.sent(50.0, queued=False)  # could not even be queued: the current delay, not the SUBACK timeout
    assert r.due == 50.0 + SUBSCRIBE_RETRY_MAX_S
    r.granted()
    assert r.due is None and r.refused(10.0) == SUBSCRIBE_RETRY_FIRST_S and r.due == 11.0


def test_topics_of_readme() -> None:
    assert consent_topic(PREFIX, "d1") == "vgw/d1/consent" and data_topic("p", "d1", "g") == "p/d1/data/g"
    assert device_filters("vgw", "w") == ["$share/w/vgw/+/data/+", "vgw/+/receipt", "vgw/+/status"]
    parsed = parse_device_topic("vgw", "vgw/d1/data/g-1")
    assert parsed is not None and (parsed.stream, parsed.device, parsed.grant) == (Stream.DATA, "d1", "g-1")
    for other in ("vgw/d1/data", "vgw//receipt", "vgw/d1/data/", "x/d1/status", "vgw/d1/status/x", "vgw/d1/cert"):
        assert parse_device_topic("vgw", other) is None, other
    assert request_filters("vgw") == ["vgw/enroll/+/request", "vgw/+/cert/request"]
    for kind in Kind:
        assert parse_request_topic("vgw", request_topic("vgw", kind, "d1")) == (kind, "d1")
