"""The reference cloud peer: the cloud side of README "The contract, in our words", for the demo and the tests.

The peer is built on the cloud tools of :mod:`vgw.cloud` (product code, the same ones ``vgw cloud`` runs) and
re-exports their public names, so a test or simulator writes ``from vgw_sim.cloud import ...`` for all of
them (product code imports them from :mod:`vgw.cloud` itself):

- :mod:`vgw.cloud.consent_authority` (offline): :class:`SigningKey` (Ed25519; make
  several for rotation), :class:`RecipientKey` (HPKE X25519, or ``MLKEM768-X25519`` as an extension beyond
  the contract), :func:`consent_claims`, :func:`grant`, :func:`sign_consent` (compact JWS, ``alg`` EdDSA, ``typ``
  ``vgw-consent+jwt``, README "Consent document");
- :mod:`vgw.cloud.envelopes` (offline): :func:`seal_envelope` / :func:`open_envelope` (the telemetry
  envelope) and :func:`verify_receipt` (README "Receipts");
- :mod:`vgw.cloud.records` (no I/O): the records and :class:`~vgw.cloud.records.CloudRecorder`,
  which opens, de-duplicates (by epoch and seq, gaps found) and verifies what arrives;
- here, the online part: :class:`CloudPeer`, an MQTT v5 client over mutual TLS (>= 1.2) that publishes
  retained consent and feeds a recorder with telemetry, receipts and status. paho stays a private member;
  its callbacks only decode and record under one lock; no paho type leaves this module.

Errors::

    VgwError
     +-- UplinkError       CloudPeer could not connect, subscribe or get a PUBACK
     +-- EnvelopeError     an envelope broke a rule of README "Telemetry envelope" (``reason``)
     +-- ReceiptError      a receipt is not a valid ES256 JWS of its device (README "Receipts")
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from typing import TYPE_CHECKING, Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from vgw.base.errors import UplinkError
from vgw.cloud.consent_authority import (
    CONSENT_TYP,
    HpkePrivateKey,
    HpkePublicKey,
    RecipientKey,
    SigningKey,
    b64url,
    b64url_decode,
    consent_claims,
    grant,
    recipient_public_key,
    sign_consent,
)
from vgw.cloud.envelopes import (
    ENVELOPE_VERSION,
    MAX_PLAINTEXT,
    RECEIPT_LEEWAY_S,
    EnvelopeError,
    ReceiptError,
    open_envelope,
    seal_envelope,
    verify_receipt,
)
from vgw.cloud.mqttclient import make_client
from vgw.cloud.records import (
    BadReceipt,
    CloudRecorder,
    Receipt,
    ReceivedBatch,
    ReceivedSample,
    RejectedMessage,
)
from vgw.contract.topics import consent_topic, device_filters
from vgw.transport.tlsctx import client_context

if TYPE_CHECKING:
    from vgw_sim.broker import Mosquitto
    from vgw_sim.pki import TestPKI

__all__ = [
    "CONSENT_TYP",
    "ENVELOPE_VERSION",
    "MAX_PLAINTEXT",
    "RECEIPT_LEEWAY_S",
    "BadReceipt",
    "CloudPeer",
    "CloudRecorder",
    "EnvelopeError",
    "HpkePrivateKey",
    "HpkePublicKey",
    "Receipt",
    "ReceiptError",
    "ReceivedBatch",
    "ReceivedSample",
    "RecipientKey",
    "RejectedMessage",
    "SigningKey",
    "b64url",
    "b64url_decode",
    "consent_claims",
    "grant",
    "open_envelope",
    "recipient_public_key",
    "seal_envelope",
    "sign_consent",
    "verify_receipt",
]

log = logging.getLogger("vgw.cloud")


# ---------------------------------------------------------------- the online peer


class CloudPeer(CloudRecorder):
    """The cloud's MQTT client: publishes consent, records telemetry, receipts and status (README "Topics").

    Connects as an MQTT v5 client (``protocol="3.1.1"`` for brokers without MQTT 5, such as the NATS server;
    the session then persists through ``clean_session=False``) over mutual TLS (>= 1.2, broker certificate and
    host name verified) with
    ``cert_file``/``key_file`` (CN ``cloud``), subscribes ``<prefix>/+/data/+``, ``<prefix>/+/receipt`` and
    ``<prefix>/+/status`` at QoS 1 (data through ``$share/<share_group>/`` when given), and re-subscribes
    after every reconnect. Register recipient keys with :meth:`add_recipient` and device certificates with
    :meth:`add_device` before the messages they open arrive. All accessors are thread-safe and return copies.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca_file: str | os.PathLike[str],
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        prefix: str = "vgw",
        client_id: str = "cloud",
        share_group: str | None = None,
        persistent: bool = False,
        keepalive: int = 30,
        protocol: str = "5",
    ) -> None:
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol {protocol!r}: expected '5' or '3.1.1'")
        super().__init__(prefix)
        self.host, self.port = host, port
        self.protocol = protocol
        self._share_group = share_group
        self._persistent = persistent
        self._keepalive = keepalive
        self._acks: dict[int, str | None] = {}  # mid -> None (ok) or the refusal reason
        self._pending_sub: int | None = None
        self._connected = False
        self._subscribed = False
        self._connect_error: str | None = None
        self._connections = 0
        self._started = False
        self._closed = False

        # MQTT 3.1.1 (e.g. the NATS server): the session is kept with clean_session=False.
        client = make_client(client_id, protocol, client_context(ca_file, cert_file, key_file), persistent)
        client.reconnect_delay_set(1, 4)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._client = client

    @classmethod
    def for_broker(cls, broker: Mosquitto, pki: TestPKI, **kwargs: Any) -> CloudPeer:
        """A peer for a :class:`~vgw_sim.broker.Mosquitto` with ``pki``'s CA and cloud certificate."""
        return cls(
            broker.host,
            broker.port,
            ca_file=pki.ca.cert,
            cert_file=pki.cloud.cert,
            key_file=pki.cloud.key,
            **kwargs,
        )

    # ------------------------------------------------------------ connection

    def connect(self, timeout: float = 10.0) -> None:
        """Connect, subscribe, and return once the broker acknowledged the subscriptions.

        Raises :class:`~vgw.base.errors.UplinkError` if TLS or MQTT refuse or ``timeout`` passes,
        ``RuntimeError`` if already connected or closed.
        """
        if self._closed or self._started:
            raise RuntimeError("CloudPeer.connect() may be called once, before close()")
        props = None
        if self._persistent and self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        try:
            if self.protocol == "5":
                self._client.connect(
                    self.host,
                    self.port,
                    keepalive=self._keepalive,
                    clean_start=not self._persistent,
                    properties=props,
                )
            else:
                self._client.connect(self.host, self.port, keepalive=self._keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise UplinkError(f"cloud peer cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._started = True
        self._client.loop_start()
        with self._cond:
            ok = self._cond.wait_for(lambda: self._subscribed or self._connect_error is not None, timeout)
            error = self._connect_error
        if not ok or error is not None:
            self.close()
            raise UplinkError(
                f"cloud peer not subscribed at {self.host}:{self.port}: "
                f"{error or f'timeout after {timeout}s'}"
            )

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        with self._lock:
            return self._connected and self._subscribed

    @property
    def connections(self) -> int:
        """How many times the peer has (re)connected."""
        with self._lock:
            return self._connections

    def close(self) -> None:
        """Disconnect and stop the network thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()

    def __enter__(self) -> CloudPeer:
        if not self._started:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ publishing

    def _publish(self, topic: str, payload: bytes, timeout: float) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=True)
        mid = info.mid
        try:
            with self._cond:
                if not self._cond.wait_for(lambda: mid in self._acks, timeout):
                    raise UplinkError(f"no PUBACK for {topic} within {timeout}s (rc {info.rc})")
                refused = self._acks[mid]
            if refused is not None:
                raise UplinkError(f"broker refused publish to {topic}: {refused}")
        finally:
            with self._lock:
                self._acks.pop(mid, None)

    def publish_consent(self, device: str, jws: str | bytes, *, timeout: float = 10.0) -> None:
        """Publish a consent document to ``<prefix>/<device>/consent`` (QoS 1, retained) and await PUBACK.

        Raises :class:`~vgw.base.errors.UplinkError` if not acknowledged in ``timeout`` or refused.
        """
        payload = jws.encode("ascii") if isinstance(jws, str) else jws
        self._publish(consent_topic(self.prefix, device), payload, timeout)

    def clear_consent(self, device: str, *, timeout: float = 10.0) -> None:
        """Remove the retained consent of ``device`` (empty retained message). Raises like publish_consent."""
        self._publish(consent_topic(self.prefix, device), b"", timeout)

    # ------------------------------------------------------------ paho callbacks (paho's thread)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cond:
            if reason_code.is_failure:
                self._connect_error = f"CONNACK {reason_code}"
                self._cond.notify_all()
                return
            self._connected = True
            self._subscribed = False
            self._connections += 1
        opts: SubscribeOptions | int = SubscribeOptions(qos=1) if self.protocol == "5" else 1  # 3.1.1: plain QoS
        _rc, mid = client.subscribe([(topic, opts) for topic in self._subscriptions()])
        with self._cond:
            self._pending_sub = mid

    def _subscriptions(self) -> list[str]:
        """The topic filters subscribed on every connect (a subclass that hears more adds to them)."""
        return device_filters(self.prefix, self._share_group)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self._cond:
            if mid != self._pending_sub:
                return
            failed = [str(rc) for rc in reason_codes if rc.is_failure]
            if failed:
                self._connect_error = f"SUBACK refused: {', '.join(failed)}"
            else:
                self._subscribed = True
            self._cond.notify_all()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        with self._cond:
            if self._connections == 0 and self._connect_error is None:
                # Never got in (TLS or CONNACK refused): let connect() fail now, not at its timeout.
                self._connect_error = f"disconnected before CONNACK: {reason_code}"
            self._connected = False
            self._subscribed = False
            self._cond.notify_all()

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        with self._cond:
            if self._connections == 0 and self._connect_error is None:
                self._connect_error = "connection failed"
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self._acks[mid] = str(reason_code) if reason_code.is_failure else None
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        # An exception escaping a paho callback would kill the network thread: record it instead.
        arrived = time.time()
        topic: str = message.topic
        try:
            self._handle(topic, bytes(message.payload), arrived)
        except Exception as exc:
            log.exception("cloud peer: failed to handle %s", topic)
            self._record_rejected(topic, "internal", repr(exc), arrived)

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Wait until connected and subscribed (e.g. after a broker restart). False on timeout."""
        return self.wait_for(lambda: self._connected and self._subscribed, timeout)
