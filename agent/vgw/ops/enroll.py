"""`vgw enroll`: zero-touch enrollment on the device (README "Enrollment").

With the batch's claim identity (a certificate and key whose only right at the broker is the enrollment
topics) and this device's one-time token: make the device key at ``[mqtt] key_file`` if missing (0600; it
never leaves the device), build a CSR for ``[device] id``, subscribe to ``vgw/enroll/<id>/response``, then
publish ``{"csr", "token"}`` on ``vgw/enroll/<id>/request`` (again every :data:`RESEND_S` until answered, so a
service that was down or restarted still answers), check the issued chain against the key, the id and
``[mqtt] ca_file``, and install it at ``[mqtt] cert_file``. A device that holds a valid certificate for its key
is already enrolled: nothing changes.

Raises :class:`~vgw.base.errors.EnrollmentRefused` (the service's reason), :class:`~vgw.base.errors.EnrollmentTimeout`,
:class:`~vgw.base.errors.EnrollmentError` (the issued chain failed a check; nothing is installed),
:class:`~vgw.base.errors.ConfigError` and :class:`~vgw.base.errors.StorageError`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from vgw.base.errors import (
    ConfigError,
    EnrollmentError,
    EnrollmentRefused,
    EnrollmentTimeout,
    EnrollReason,
    StorageError,
)
from vgw.base.fsutil import MAX_KEY_BYTES, acting_for_owner, owner_of, read_small_file
from vgw.config.settings import Config, load_config
from vgw.contract.backoff import ENROLL_RESEND_S as RESEND_S  # no answer this long: publish the request again
from vgw.contract.enrollment import (
    Kind,
    build_csr,
    check_issued,
    decode_response,
    encode_request,
    request_topic,
    response_topic,
)
from vgw.state.audit import AuditLog
from vgw.state.credentials import device_credentials, ensure_key, install_chain, load_key
from vgw.transport.mqttversion import refuses_mqtt5
from vgw.transport.tlsctx import client_context
from vgw.uplink.link import MAX_PACKET_BYTES
from vgw.uplink.packetguard import guard_context
from vgw.uplink.tlsfailure import describe as describe_tls

__all__ = ["RESEND_S", "Enrolled", "enroll", "enrolled_already"]

log = logging.getLogger(__name__)

CONNECT_WAIT_S = 10.0


@dataclass(frozen=True)
class Enrolled:
    """What `vgw enroll` did: ``already`` (nothing changed) or a new certificate installed."""

    device: str
    serial: str
    not_after: dt.datetime
    already: bool
    key_made: bool = False


def _anchors(cfg: Config) -> list[x509.Certificate]:
    data = read_small_file(cfg.mqtt.ca_file, what="CA file", max_bytes=MAX_KEY_BYTES * 16, error=ConfigError)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{cfg.mqtt.ca_file}: [mqtt] ca_file is not a PEM certificate") from exc


def enrolled_already(cfg: Config, now: dt.datetime) -> Enrolled | None:
    """The installed certificate, if it is valid now, for this device and key, and chains to the CA."""
    cert_file, key_file = device_credentials(cfg.mqtt.cert_file, cfg.mqtt.key_file, cfg.state_dir)
    if not cert_file.exists() or not key_file.exists():
        return None
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_file.read_bytes()))
        leaf = check_issued(chain, load_key(key_file), cfg.device.id, _anchors(cfg), now)
    except (OSError, ValueError, EnrollmentError, ConfigError):
        return None
    return Enrolled(cfg.device.id, format(leaf.serial_number, "x"), leaf.not_valid_after_utc, already=True)


def enroll(config: Path, claim_cert: Path, claim_key: Path, token: str, timeout: float = 60.0) -> Enrolled:
    """Enroll this device (see the module docstring)."""
    cfg = load_config(config, enrolling=True)
    now = dt.datetime.now(dt.UTC)
    done = enrolled_already(cfg, now)
    if done is not None:
        return done
    for what, path in (("claim certificate", claim_cert), ("claim key", claim_key)):
        read_small_file(path, what=what, max_bytes=MAX_KEY_BYTES, error=ConfigError)
    anchors = _anchors(cfg)
    key, made = ensure_key(cfg.mqtt.key_file)
    if made:
        _give_to_agent(cfg)
    device = cfg.device.id
    request = encode_request(build_csr(key, device), token)
    prefix = cfg.mqtt.topic_prefix
    exchange = _Exchange(cfg, claim_cert, claim_key)

    def ours(payload: bytes) -> bool:
        # Every holder of the claim may read this topic and ask for this id: a certificate issued over another
        # key answered someone else's request (the service refused theirs or ours follows); wait for ours.
        try:
            chain = decode_response(payload).chain
        except EnrollmentError:
            return True  # malformed: reported as such
        return not chain or chain[0].public_key() == key.public_key()

    try:
        payload = exchange.ask(request_topic(prefix, Kind.ENROLL, device), response_topic(prefix, Kind.ENROLL, device),
                               request, time.monotonic() + timeout, ours)
    finally:
        exchange.close()
    answer = decode_response(payload)
    if answer.refused is not None:
        raise EnrollmentRefused(f"enrollment of {device!r} refused: {answer.refused}", _reason(answer.refused))
    leaf = check_issued(answer.chain, key, device, anchors, dt.datetime.now(dt.UTC))
    install_chain(cfg.mqtt.cert_file, answer.chain)
    serial = format(leaf.serial_number, "x")
    if cfg.state_dir.is_dir():
        try:
            with acting_for_owner(cfg.state_dir):  # root enrolling: the audit log stays the agent's user's
                AuditLog(cfg.state_dir).append("enrolled", serial=serial,
                                               not_after=int(leaf.not_valid_after_utc.timestamp()))
        except (OSError, StorageError) as exc:  # the certificate is installed; the agent audits its own start
            log.warning("enroll: not audited: %s", exc)
    return Enrolled(device, serial, leaf.not_valid_after_utc, already=False, key_made=made)


def _give_to_agent(cfg: Config) -> None:
    """Root made the device key: hand it to the agent's user (the owner of the state dir), who must read it."""
    owner = owner_of(cfg.state_dir)
    if owner is None or os.geteuid() != 0:
        return
    try:
        os.chown(cfg.mqtt.key_file, owner.uid, owner.gid, follow_symlinks=False)
    except OSError as exc:
        raise StorageError(f"{cfg.mqtt.key_file}: cannot give the new key to uid {owner.uid}: {exc.strerror}") from exc


def _reason(text: str) -> EnrollReason:
    word = text.split(":", 1)[0]
    return next((r for r in EnrollReason if r.value == word), EnrollReason.SERVICE)


class _Exchange:
    """One request and its answer over the claim identity. paho's callbacks only enqueue; the caller's thread
    decides."""

    def __init__(self, cfg: Config, claim_cert: Path, claim_key: Path) -> None:
        self.cfg = cfg
        self.claim = (claim_cert, claim_key)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.client: mqtt.Client | None = None
        self.protocol = "3.1.1" if cfg.mqtt.protocol == "3.1.1" else "5"
        self.last_error = "no broker answered"

    def _context(self) -> ssl.SSLContext:
        try:
            ctx = client_context(self.cfg.mqtt.ca_file, *self.claim)
        except ConfigError as exc:
            raise ConfigError(f"not a usable claim certificate and key: {exc}") from exc
        return guard_context(ctx, MAX_PACKET_BYTES, mqtt5=self.protocol == "5",
                             on_tls_error=lambda exc: self.events.put(("tls", exc)))

    def _connect(self, host: str, port: int, deadline: float) -> bool:
        self.close()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"vgw-enroll-{self.cfg.device.id}",
                             protocol=mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311)
        client.tls_set_context(self._context())
        client.on_connect = lambda _c, _u, _f, rc, _p: self.events.put(("refused" if rc.is_failure else "connected",
                                                                         rc))
        client.on_disconnect = lambda _c, _u, _f, rc, _p: self.events.put(("disconnected", rc))
        client.on_subscribe = lambda _c, _u, mid, rcs, _p: self.events.put(("suback", (mid, rcs)))
        client.on_message = lambda _c, _u, msg: self.events.put(("message", (msg.topic, bytes(msg.payload))))
        self.client = client
        try:
            client.connect(host, port, keepalive=30)
        except ssl.SSLError as exc:
            self.last_error = describe_tls(exc)
            return False
        except (OSError, ValueError) as exc:
            self.last_error = f"cannot reach broker {host}:{port}: {exc}"
            return False
        client.loop_start()
        tls: ssl.SSLError | None = None
        wait_until = min(deadline, time.monotonic() + CONNECT_WAIT_S)
        while (left := wait_until - time.monotonic()) > 0:
            try:
                kind, value = self.events.get(timeout=left)
            except queue.Empty:
                break
            if kind == "connected":
                return True
            if kind == "tls":
                tls = value
            elif kind in ("refused", "disconnected"):
                if tls is not None:
                    # The broker refused the claim certificate: a person must act; retrying will not help.
                    raise EnrollmentRefused(f"the broker refused the claim certificate: {describe_tls(tls)}",
                                            EnrollReason.SERVICE)
                if self.protocol == "5" and self.cfg.mqtt.protocol == "auto" and \
                        refuses_mqtt5(value if kind == "refused" else None):
                    self.protocol = "3.1.1"  # a 3.1.1-only broker (vgw.transport.mqttversion)
                    return self._connect(host, port, deadline)
                self.last_error = f"broker {host}:{port} refused the claim identity: {value}"
                return False
        self.last_error = f"broker {host}:{port} did not answer CONNECT"
        return False

    def ask(self, topic: str, reply_topic: str, request: bytes, deadline: float,
            accept: Callable[[bytes], bool]) -> bytes:
        """Subscribe to ``reply_topic`` (SUBACK awaited), publish ``request`` (again every RESEND_S) and return
        the first answer. Raises EnrollmentTimeout at ``deadline``."""
        endpoints = self.cfg.mqtt.endpoints
        i = 0
        while time.monotonic() < deadline:
            host, port = endpoints[i % len(endpoints)]
            i += 1
            if not self._connect(host, port, deadline):
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            answer = self._serve(topic, reply_topic, request, deadline, accept)
            if answer is not None:
                return answer
        raise EnrollmentTimeout(f"no answer from the enrollment service within the time given ({self.last_error})",
                                EnrollReason.TIMEOUT)

    def _serve(self, topic: str, reply_topic: str, request: bytes, deadline: float,
               accept: Callable[[bytes], bool]) -> bytes | None:
        assert self.client is not None
        _rc, mid = self.client.subscribe(reply_topic, qos=1)
        subscribed = False
        next_send = float("inf")
        while (left := deadline - time.monotonic()) > 0:
            if subscribed and time.monotonic() >= next_send:
                self.client.publish(topic, request, qos=1)
                next_send = time.monotonic() + RESEND_S
            try:
                kind, value = self.events.get(timeout=min(left, max(0.01, next_send - time.monotonic()), 0.5))
            except queue.Empty:
                continue
            if kind == "suback" and value[0] == mid:
                if any(getattr(rc, "is_failure", False) for rc in value[1]):
                    raise EnrollmentRefused(f"the broker refused the subscription to {reply_topic} (is the claim "
                                            "identity allowed the enrollment topics?)", EnrollReason.SERVICE)
                subscribed = True
                next_send = time.monotonic()  # subscribed first, then the request (README "Enrollment")
            elif kind == "message" and value[0] == reply_topic and accept(bytes(value[1])):
                return bytes(value[1])
            elif kind == "disconnected":
                self.last_error = f"connection lost: {value}"
                return None
        return None

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()
        while not self.events.empty():
            self.events.get_nowait()
