"""Each device's consent document as the service keeps it: signed, checked, pushed, receipted.

:class:`ConsentDesk` turns the grants the store holds for a device into the next version of its consent
document (README "Consent document"): signed with the cloud kit's signing code, then checked by the car's own
verifier (:func:`vgw.contract.consent.verifier.verify_consent`) before anything leaves, so what an owner sees on the
page is exactly what the car will enforce. It publishes retained at QoS 1 on ``<prefix>/<device>/consent``
over mutual TLS (README "Topics") and waits for the broker's PUBACK; a document the broker did not
acknowledge stays pending and is pushed again by the worker thread until it is. The worker also re-signs a
device's document before half its lifetime (``ttl_s``) has passed, since an expired document stops every
grant, and hears the cars' receipts (README "Receipts"), verified against each device's certificate.

Thread: the worker thread ``vgw-service-push`` owns the retries and the receipt queue; :meth:`issue` may run
on any request thread and holds ``_issue_lock`` so a device's versions are signed and pushed in order.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from vgw.base.errors import ConsentError, UplinkError
from vgw.cloud.cloudkit import default_version, load_device_certs
from vgw.cloud.cloudlink import BrokerOptions, CloudLink
from vgw.cloud.consent_authority import SigningKey, consent_claims, grant, sign_consent
from vgw.cloud.envelopes import ReceiptError, verify_receipt
from vgw.cloud.service.config import ServiceConfig
from vgw.cloud.service.store import Document, Store
from vgw.contract.consent.model import version_text
from vgw.contract.consent.verifier import verify_consent
from vgw.contract.topics import consent_topic, receipt_filter

__all__ = ["ConsentDesk"]

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 5.0  # how long an Allow or Withdraw waits for the broker's PUBACK before showing "pending"
RETRY_S = 2.0


class ConsentDesk:
    """Signs, verifies, pushes and re-pushes consent documents; records receipts."""

    def __init__(self, cfg: ServiceConfig, store: Store, key: SigningKey, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.store = store
        self.key = key
        self.clock = clock
        self.prefix = cfg.broker.topic_prefix
        self._issue_lock = threading.Lock()
        self._receipts: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=10_000)
        self._stop = threading.Event()
        self._link: CloudLink | None = None
        self._link_lock = threading.Lock()
        self._device_keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._thread = threading.Thread(target=self._run, name="vgw-service-push", daemon=True)

    # ------------------------------------------------------------ signing

    def issue(self, device: str) -> Document:
        """Sign the device's next document from its active grants, check it with the car's verifier, record
        it and push it. Returns the stored document (``acked_at`` None: the push is pending).

        Raises :class:`~vgw.base.errors.ConsentError` if the car's verifier would refuse it (nothing is recorded
        or sent then).
        """
        with self._issue_lock:
            grants = []
            for g in self.store.active_grants(device):
                app = self.store.app(g.client_id)
                if app is None:  # an app removed from the database: its grant cannot be signed
                    continue
                grants.append(grant(g.id, g.scopes, app.recipient, controller=app.client_id,
                                    purpose=app.purpose or app.name))
            latest = self.store.latest_document(device)
            now = self.clock()
            # Versions always rise (README "Consent document": the car refuses a lower or equal one): Unix time in
            # ms, or one above the last when the clock stands still or ran back.
            ver = max(default_version(now), (latest.ver + 1) if latest else 1)
            iat = int(now)
            token = sign_consent(consent_claims(device, ver, grants, iat=iat, exp=iat + self.cfg.ttl_s), self.key)
            # The car's own verifier, not a second implementation: a document it would reject never leaves.
            verify_consent(token, trust_keys=[self.key.public_key], device=device, now=now)
            doc = Document(device, ver, token, now, None, 0, None)
            self.store.add_document(doc)
            for signed in grants:
                self.store.set_grant_version(signed["id"], ver, withdrawn=False)
            for row in self.store.grants_of_device(device):
                if row.withdrawn_at is not None:
                    self.store.set_grant_version(row.id, ver, withdrawn=True)
            log.info("signed %s for %s (%d grant(s))", version_text(ver), device, len(grants))
            self._push(doc, PUSH_TIMEOUT_S)
            return self.store.latest_document(device) or doc

    def _push(self, doc: Document, timeout: float) -> bool:
        link = self._link
        if link is None:
            self.store.document_pushed(doc.device, doc.ver, acked=False, error="broker not connected")
            return False
        try:
            link.publish(consent_topic(self.prefix, doc.device), doc.token.encode(), retain=True, timeout=timeout)
        except (UplinkError, RuntimeError, OSError) as exc:
            self.store.document_pushed(doc.device, doc.ver, acked=False, error=str(exc))
            log.warning("%s for %s not acknowledged by the broker: %s (retrying)", version_text(doc.ver),
                        doc.device, exc)
            return False
        self.store.document_pushed(doc.device, doc.ver, acked=True)
        log.info("pushed %s to %s", version_text(doc.ver), doc.device)
        return True

    # ------------------------------------------------------------ the worker

    def start(self) -> ConsentDesk:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)
        with self._link_lock:
            link, self._link = self._link, None
        if link is not None:
            link.close()

    def _connect(self) -> None:
        b = self.cfg.broker
        opts = BrokerOptions(host=b.host, port=b.port, ca_file=b.ca_file, cert_file=b.cert_file, key_file=b.key_file,
                             prefix=self.prefix, client_id=f"vgw-cloud-serve-{os.getpid()}")
        link = CloudLink(opts, on_message=self._on_message)
        try:
            link.connect(timeout=5)
            link.subscribe([(receipt_filter(self.prefix), 1)])
        except (UplinkError, OSError) as exc:
            link.close()
            log.warning("broker %s:%d: %s (retrying)", b.host, b.port, exc)
            return
        with self._link_lock:
            self._link = link
        log.info("connected to the broker %s:%d", b.host, b.port)

    def _on_message(self, topic: str, payload: bytes) -> None:
        # paho's network thread: only enqueue (the worker verifies and stores)
        try:
            self._receipts.put_nowait((topic, payload))
        except queue.Full:
            log.warning("receipt queue full: a receipt was dropped (the car re-sends on its next connect)")

    def _run(self) -> None:
        next_retry = next_connect = 0.0
        delay = 1.0
        while not self._stop.is_set():
            if self._link is None and time.monotonic() >= next_connect:
                self._connect()
                # back off while the broker stays away (1 s doubling to 30 s); paho reconnects a made link itself
                delay = 1.0 if self._link is not None else min(delay * 2, 30.0)
                next_connect = time.monotonic() + delay
            try:
                topic, payload = self._receipts.get(timeout=0.2)
            except queue.Empty:
                pass
            else:
                self._receipt(topic, payload)
                continue
            if time.monotonic() >= next_retry:
                next_retry = time.monotonic() + RETRY_S
                self._maintain()

    def _maintain(self) -> None:
        """Push what the broker has not acknowledged; re-sign documents past half their lifetime."""
        for doc in self.store.unacked_latest():
            if self._stop.is_set():
                return
            with self._issue_lock:
                latest = self.store.latest_document(doc.device)
                if latest is not None and latest.ver == doc.ver:
                    self._push(doc, PUSH_TIMEOUT_S)
        now = self.clock()
        for device in self.store.devices_with_documents():
            latest = self.store.latest_document(device)
            if latest is not None and latest.acked_at is not None and now - latest.signed_at > self.cfg.ttl_s / 2:
                try:
                    self.issue(device)
                except ConsentError as exc:
                    log.error("re-signing consent for %s refused by the verifier: %s", device, exc)

    # ------------------------------------------------------------ receipts

    def _key_for(self, device: str) -> ec.EllipticCurvePublicKey | None:
        if device not in self._device_keys and self.cfg.device_certs.is_dir():
            self._device_keys = load_device_certs([self.cfg.device_certs])
        return self._device_keys.get(device)

    def _receipt(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != self.prefix or parts[2] != "receipt":
            return
        device = parts[1]
        key = self._key_for(device)
        token = payload.decode("ascii", errors="replace").strip()
        if key is None:
            log.warning("receipt from %s: no certificate %s/%s.crt to verify it", device, self.cfg.device_certs,
                        device)
            return
        try:
            claims = verify_receipt(token, key, device=device)
        except ReceiptError as exc:
            log.warning("receipt from %s refused: %s", device, exc)
            return
        if self.store.add_receipt(device, claims, token):
            log.info("verified %s receipt from %s", claims.get("typ"), device)

    @property
    def connected(self) -> bool:
        return self._link is not None

    def status(self) -> dict[str, Any]:
        return {"broker": "connected" if self.connected else "not connected"}
