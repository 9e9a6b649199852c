"""The reference cloud peer: the cloud side of CONTRACT §4-§7, for the demo and the tests.

Offline parts (no I/O, usable by ``vgw cloud`` later):

- consent authority: :class:`SigningKey` (Ed25519; make several for rotation), :func:`consent_claims`,
  :func:`grant`, :func:`sign_consent` (compact JWS, ``alg`` EdDSA, ``typ`` ``vgw-consent+jwt``, §5);
- recipients: :class:`RecipientKey` (HPKE X25519, or ``MLKEM768-X25519`` as an extension beyond §5);
- :func:`seal_envelope` / :func:`open_envelope` (the §6 telemetry envelope) and :func:`verify_receipt` (§7).

Online part: :class:`CloudPeer`, an MQTT v5 client over mutual TLS (>= 1.2) that publishes retained consent
and records decrypted telemetry (de-duplicated by seq, gaps found), verified receipts and status. paho stays a
private member; its callbacks only decode and record under one lock; no paho type leaves this module.

Errors::

    VgwError
     +-- UplinkError       CloudPeer could not connect, subscribe or get a PUBACK
     +-- EnvelopeError     a telemetry envelope failed a rule of §6 (``reason`` says which)
     +-- ReceiptError      a receipt is not a valid ES256 JWS of its device (§7)
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mlkem, x25519
from cryptography.hazmat.primitives.hpke import (
    AEAD,
    KDF,
    KEM,
    MLKEM768X25519PrivateKey,
    MLKEM768X25519PublicKey,
    Suite,
)
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.errors import UplinkError, VgwError
from simulators.pki import device_public_key_from_cert

if TYPE_CHECKING:
    from simulators.broker import Mosquitto
    from simulators.pki import TestPKI

__all__ = [
    "CONSENT_TYP",
    "BadReceipt",
    "CloudPeer",
    "EnvelopeError",
    "Receipt",
    "ReceiptError",
    "ReceivedBatch",
    "ReceivedSample",
    "RecipientKey",
    "RejectedMessage",
    "SigningKey",
    "consent_claims",
    "envelope_info",
    "grant",
    "open_envelope",
    "recipient_public_key",
    "seal_envelope",
    "sign_consent",
    "verify_receipt",
]

log = logging.getLogger("vgw.cloud")

CONSENT_TYP = "vgw-consent+jwt"
ENVELOPE_VERSION = 0x01
MAX_PLAINTEXT = 4 * 1024 * 1024  # decompression bound: a hostile zlib stream must not exhaust memory
RECEIPT_LEEWAY_S = 300
_SUITES = {
    "X25519": Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
    "MLKEM768-X25519": Suite(KEM.MLKEM768_X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
}
_ENC_LEN = {"X25519": 32, "MLKEM768-X25519": 1088 + 32}
_MLKEM768_PK_LEN = 1184
_X25519_LEN = 32

HpkePrivateKey = x25519.X25519PrivateKey | MLKEM768X25519PrivateKey
HpkePublicKey = x25519.X25519PublicKey | MLKEM768X25519PublicKey


class EnvelopeError(VgwError):
    """A telemetry envelope broke CONTRACT §6; ``reason`` is a short tag (version, hpke, zlib, json, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReceiptError(VgwError):
    """A receipt is not a valid compact JWS signed ES256 by the device it names (CONTRACT §7)."""


# ---------------------------------------------------------------- base64url


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding. Raises ``ValueError`` on padding or a character outside it."""
    if "=" in text:
        raise ValueError("base64url must not be padded")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except ValueError as exc:
        raise ValueError(f"invalid base64url: {exc}") from exc


# ---------------------------------------------------------------- keys


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 consent signing key. ``kid`` is a short fingerprint of the public key."""

    private_key: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        """Load a PEM (PKCS#8) Ed25519 private key. Raises ``OSError``, or ``ValueError`` if not Ed25519."""
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{os.fspath(path)}: not an Ed25519 private key")
        return cls(key)

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def kid(self) -> str:
        raw = self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return b64url(hashlib.sha256(raw).digest()[:12])

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (what ``[consent] trust_keys`` names)."""
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def write_public_pem(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`public_pem` to ``path`` (mode 0644) and return the path. Raises ``OSError``."""
        out = Path(path)
        out.write_bytes(self.public_pem())
        os.chmod(out, 0o644)
        return out

    def write_private_pem(self, path: str | os.PathLike[str]) -> Path:
        """Write the private key (PKCS#8 PEM, mode 0600) to ``path``. Raises ``OSError``."""
        out = Path(path)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                self.private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return out


@dataclass(frozen=True)
class RecipientKey:
    """An HPKE recipient key pair of one grant/controller.

    ``kem`` is ``"X25519"`` (CONTRACT §5-6) or ``"MLKEM768-X25519"`` (hybrid post-quantum; an extension the
    contract does not yet name, public key = ML-KEM-768 public key (1184 B) || X25519 public key (32 B)).
    """

    kem: str
    private_key: HpkePrivateKey
    public_raw: bytes

    @classmethod
    def generate(cls, kem: str = "X25519") -> RecipientKey:
        """A fresh key pair. Raises ``ValueError`` for an unknown ``kem``."""
        if kem == "X25519":
            sk = x25519.X25519PrivateKey.generate()
            return cls(kem, sk, sk.public_key().public_bytes_raw())
        if kem == "MLKEM768-X25519":
            m = mlkem.MLKEM768PrivateKey.generate()
            x = x25519.X25519PrivateKey.generate()
            raw = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()
            return cls(kem, MLKEM768X25519PrivateKey(m, x), raw)
        raise ValueError(f"unknown KEM {kem!r}: expected X25519 or MLKEM768-X25519")

    @property
    def pk_b64(self) -> str:
        """The public key as base64url without padding (the ``recipient.pk`` of a grant)."""
        return b64url(self.public_raw)

    def recipient(self) -> dict[str, str]:
        """The grant's ``recipient`` object: ``{"kem": ..., "pk": ...}``."""
        return {"kem": self.kem, "pk": self.pk_b64}

    def public_key(self) -> HpkePublicKey:
        return recipient_public_key(self.recipient())


def recipient_public_key(recipient: Mapping[str, Any]) -> HpkePublicKey:
    """Parse a grant's ``recipient`` object into an HPKE public key.

    Raises ``ValueError`` for an unknown ``kem``, bad base64url or a wrong key length.
    """
    kem, pk = recipient.get("kem"), recipient.get("pk")
    if not isinstance(pk, str):
        raise ValueError("recipient.pk must be a base64url string")
    raw = b64url_decode(pk)
    if kem == "X25519":
        if len(raw) != _X25519_LEN:
            raise ValueError(f"recipient.pk: X25519 key must be 32 bytes, got {len(raw)}")
        return x25519.X25519PublicKey.from_public_bytes(raw)
    if kem == "MLKEM768-X25519":
        if len(raw) != _MLKEM768_PK_LEN + _X25519_LEN:
            raise ValueError(f"recipient.pk: MLKEM768-X25519 key must be 1216 bytes, got {len(raw)}")
        return MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PK_LEN]),
            x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PK_LEN:]),
        )
    raise ValueError(f"recipient.kem {kem!r} is not supported")


# ---------------------------------------------------------------- consent documents (§5)


def grant(
    id: str,
    scopes: Iterable[str],
    recipient_pk: RecipientKey | x25519.X25519PublicKey | Mapping[str, str] | bytes,
    *,
    controller: str = "com.example.fleet",
    purpose: str = "fleet-maintenance",
    limits: Mapping[str, Any] | None = None,
    retention_s: int | None = None,
) -> dict[str, Any]:
    """One grant object of a consent document. No validation: attack tests need invalid grants too."""
    if isinstance(recipient_pk, RecipientKey):
        recipient: dict[str, str] = recipient_pk.recipient()
    elif isinstance(recipient_pk, x25519.X25519PublicKey):
        recipient = {"kem": "X25519", "pk": b64url(recipient_pk.public_bytes_raw())}
    elif isinstance(recipient_pk, bytes):
        recipient = {"kem": "X25519", "pk": b64url(recipient_pk)}
    else:
        recipient = dict(recipient_pk)
    out: dict[str, Any] = {
        "id": id,
        "controller": controller,
        "purpose": purpose,
        "scopes": list(scopes),
        "recipient": recipient,
    }
    if limits is not None:
        out["limits"] = dict(limits)
    if retention_s is not None:
        out["retention_s"] = retention_s
    return out


def consent_claims(
    device: str,
    ver: int,
    grants: Iterable[Mapping[str, Any]],
    iat: int | None = None,
    exp: int | None = None,
    iss: str = "consent-service",
) -> dict[str, Any]:
    """The claims of a consent document (§5). ``iat`` defaults to now, ``exp`` to ``iat`` + 1 day."""
    issued = int(time.time()) if iat is None else iat
    return {
        "iss": iss,
        "sub": device,
        "ver": ver,
        "iat": issued,
        "exp": issued + 86400 if exp is None else exp,
        "grants": [dict(g) for g in grants],
    }


def sign_consent(
    claims: Mapping[str, Any],
    key: SigningKey | ed25519.Ed25519PrivateKey | Any,
    *,
    headers: Mapping[str, Any] | None = None,
    algorithm: str = "EdDSA",
) -> str:
    """Sign ``claims`` as a compact JWS: ``alg`` EdDSA, ``typ`` ``vgw-consent+jwt`` (§5).

    ``headers`` override or add header fields (``{"typ": None}`` removes ``typ``); ``algorithm`` and a
    non-Ed25519 ``key`` exist for attack tests. Raises PyJWT's errors for an unusable key/algorithm pair.
    """
    pk = key.private_key if isinstance(key, SigningKey) else key
    hdr: dict[str, Any] = {"typ": CONSENT_TYP}
    hdr.update(headers or {})
    return jwt.encode(dict(claims), pk, algorithm=algorithm, headers=hdr)


# ---------------------------------------------------------------- envelopes (§6) and receipts (§7)


def envelope_info(device: str, grant_id: str) -> bytes:
    """The HPKE ``info`` of a grant's envelopes: ``b"vgw/1 " + device + b"/" + grant`` (UTF-8)."""
    return b"vgw/1 " + device.encode() + b"/" + grant_id.encode()


def _kem_of(key: HpkePrivateKey | HpkePublicKey) -> str:
    if isinstance(key, x25519.X25519PrivateKey | x25519.X25519PublicKey):
        return "X25519"
    return "MLKEM768-X25519"


def seal_envelope(
    batch: Mapping[str, Any], recipient: RecipientKey | HpkePublicKey, device: str, grant_id: str
) -> bytes:
    """Reference sealer: ``0x01 || enc || ct`` of zlib(JSON(batch)) to ``recipient`` (§6).

    For simulators and tests; the agent has its own. Raises ``TypeError``/``ValueError`` for unserialisable
    batches.
    """
    pub = recipient.public_key() if isinstance(recipient, RecipientKey) else recipient
    plaintext = zlib.compress(json.dumps(dict(batch), separators=(",", ":")).encode())
    ct = _SUITES[_kem_of(pub)].encrypt(plaintext, pub, info=envelope_info(device, grant_id))
    return bytes([ENVELOPE_VERSION]) + ct


def open_envelope(
    payload: bytes, recipient_sk: HpkePrivateKey | RecipientKey, device: str, grant_id: str
) -> dict[str, Any]:
    """Open a telemetry envelope of ``device``/``grant_id`` (§6) and return the batch object.

    Checks, in order: version byte 0x01; HPKE open (base mode, ``info`` bound to device and grant, so an
    envelope replayed onto another device's or grant's topic fails); zlib within ``MAX_PLAINTEXT``; a JSON
    object with ``v`` 1, matching ``device`` and ``grant``, integer ``seq`` >= 1 and a list of samples.
    Raises :class:`EnvelopeError` naming the failed rule.
    """
    sk = recipient_sk.private_key if isinstance(recipient_sk, RecipientKey) else recipient_sk
    kem = _kem_of(sk)
    where = f"envelope {device}/{grant_id}"
    if len(payload) < 1 + _ENC_LEN[kem] + 16:
        raise EnvelopeError(f"{where}: {len(payload)} bytes is too short", "length")
    if payload[0] != ENVELOPE_VERSION:
        raise EnvelopeError(f"{where}: version byte {payload[0]:#04x}, expected 0x01", "version")
    try:
        compressed = _SUITES[kem].decrypt(payload[1:], sk, info=envelope_info(device, grant_id))
    except Exception as exc:  # cryptography raises InvalidTag or ValueError; both mean "not for us"
        raise EnvelopeError(
            f"{where}: HPKE open failed (wrong key, device, grant or tampered)", "hpke"
        ) from exc
    try:
        dec = zlib.decompressobj()
        plaintext = dec.decompress(compressed, MAX_PLAINTEXT)
        if dec.unconsumed_tail or not dec.eof:
            raise EnvelopeError(f"{where}: plaintext over {MAX_PLAINTEXT} bytes or truncated", "zlib")
    except zlib.error as exc:
        raise EnvelopeError(f"{where}: not a zlib stream: {exc}", "zlib") from exc
    try:
        batch = json.loads(plaintext.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(f"{where}: plaintext is not UTF-8 JSON: {exc}", "json") from exc
    if not isinstance(batch, dict) or batch.get("v") != 1:
        raise EnvelopeError(f"{where}: batch must be an object with v = 1", "schema")
    # The topic names device and grant; the sealed copy must agree (blocks re-labelling by a relay).
    if batch.get("device") != device or batch.get("grant") != grant_id:
        raise EnvelopeError(
            f"{where}: sealed device/grant {batch.get('device')!r}/{batch.get('grant')!r} differ from topic",
            "mismatch",
        )
    seq = batch.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise EnvelopeError(f"{where}: seq must be an integer >= 1, got {seq!r}", "schema")
    samples = batch.get("samples")
    if not isinstance(samples, list) or not all(
        isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("t"), int | float)
        for s in samples
    ):
        raise EnvelopeError(f"{where}: samples must be a list of {{t, path, value}} objects", "schema")
    return batch


def verify_receipt(
    token: str, public_key: ec.EllipticCurvePublicKey, *, device: str | None = None
) -> dict[str, Any]:
    """Verify a receipt (§7): compact JWS, ES256 only, under the device certificate's key; return its claims.

    Requires ``typ``, ``sub`` and ``iat`` (``iat`` at most 300 s in the future); if ``device`` is given,
    ``sub`` must equal it. Raises :class:`ReceiptError` naming the failed rule.
    """
    try:
        # algorithms pinned to ES256: a token claiming "none" or HS256 (key confusion) is refused.
        claims: dict[str, Any] = jwt.decode(
            token,
            public_key,
            algorithms=["ES256"],
            options={"require": ["typ", "sub", "iat"], "verify_aud": False},
            leeway=RECEIPT_LEEWAY_S,
        )
    except jwt.PyJWTError as exc:
        raise ReceiptError(f"receipt rejected: {exc}") from exc
    if not isinstance(claims.get("typ"), str) or not isinstance(claims.get("sub"), str):
        raise ReceiptError("receipt rejected: typ and sub must be strings")
    if device is not None and claims["sub"] != device:
        raise ReceiptError(f"receipt rejected: sub {claims['sub']!r} is not device {device!r}")
    return claims


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class ReceivedBatch:
    """One accepted (decrypted, first-seen) telemetry batch."""

    device: str
    grant: str
    seq: int
    samples: tuple[dict[str, Any], ...]
    arrived: float
    size: int


@dataclass(frozen=True)
class ReceivedSample:
    """One sample of an accepted batch, with the batch's seq and arrival time (``time.time()``)."""

    device: str
    grant: str
    seq: int
    t: float
    path: str
    value: Any
    arrived: float


@dataclass(frozen=True)
class RejectedMessage:
    """A data or status message that could not be opened or parsed."""

    topic: str
    reason: str
    detail: str
    arrived: float


@dataclass(frozen=True)
class Receipt:
    """A receipt whose signature verified under its device's certificate key."""

    device: str
    claims: dict[str, Any]
    token: str
    arrived: float

    @property
    def typ(self) -> str:
        return str(self.claims.get("typ"))


@dataclass(frozen=True)
class BadReceipt:
    """A receipt that did not verify (unknown device, bad signature, wrong subject, malformed)."""

    device: str
    reason: str
    token: str
    arrived: float


@dataclass
class _Stream:
    seen: set[int] = field(default_factory=set)
    batches: list[ReceivedBatch] = field(default_factory=list)
    duplicates: int = 0


# ---------------------------------------------------------------- the online peer


class CloudPeer:
    """The cloud's MQTT client: publishes consent, records telemetry, receipts and status (CONTRACT §4).

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
        self.host, self.port, self.prefix = host, port, prefix
        self.protocol = protocol
        self._share_group = share_group
        self._persistent = persistent
        self._keepalive = keepalive
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._recipients: dict[tuple[str | None, str], HpkePrivateKey] = {}
        self._device_keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._rejected: list[RejectedMessage] = []
        self._receipts: list[Receipt] = []
        self._bad_receipts: list[BadReceipt] = []
        self._status: dict[str, list[dict[str, Any] | None]] = {}
        self._acks: dict[int, str | None] = {}  # mid -> None (ok) or the refusal reason
        self._pending_sub: int | None = None
        self._connected = False
        self._subscribed = False
        self._connect_error: str | None = None
        self._connections = 0
        self._started = False
        self._closed = False

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
        v5 = protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            # MQTT 3.1.1 (e.g. the NATS server): the session is kept with clean_session=False.
            clean_session=None if v5 else not persistent,
        )
        client.tls_set_context(ctx)
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
        """A peer for a :class:`~simulators.broker.Mosquitto` with ``pki``'s CA and cloud certificate."""
        return cls(
            broker.host,
            broker.port,
            ca_file=pki.ca.cert,
            cert_file=pki.cloud.cert,
            key_file=pki.cloud.key,
            **kwargs,
        )

    # ------------------------------------------------------------ registration

    def add_recipient(
        self, grant_id: str, key: HpkePrivateKey | RecipientKey, device: str | None = None
    ) -> None:
        """Open envelopes of ``grant_id`` with ``key`` (for every device, or only ``device``)."""
        sk = key.private_key if isinstance(key, RecipientKey) else key
        with self._lock:
            self._recipients[(device, grant_id)] = sk

    def add_device(self, device_id: str, cert: str | os.PathLike[str] | ec.EllipticCurvePublicKey) -> None:
        """Verify ``device_id``'s receipts with the key of its certificate (a path) or a given public key.

        Raises ``OSError``/``ValueError`` if the certificate cannot be read or has no P-256 key.
        """
        key = cert if isinstance(cert, ec.EllipticCurvePublicKey) else device_public_key_from_cert(cert)
        with self._lock:
            self._device_keys[device_id] = key

    # ------------------------------------------------------------ connection

    def connect(self, timeout: float = 10.0) -> None:
        """Connect, subscribe, and return once the broker acknowledged the subscriptions.

        Raises :class:`~agent.errors.UplinkError` if TLS or MQTT refuse or ``timeout`` passes,
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

        Raises :class:`~agent.errors.UplinkError` if not acknowledged in ``timeout`` or refused.
        """
        payload = jws.encode("ascii") if isinstance(jws, str) else jws
        self._publish(f"{self.prefix}/{device}/consent", payload, timeout)

    def clear_consent(self, device: str, *, timeout: float = 10.0) -> None:
        """Remove the retained consent of ``device`` (empty retained message). Raises like publish_consent."""
        self._publish(f"{self.prefix}/{device}/consent", b"", timeout)

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
        data = f"{self.prefix}/+/data/+"
        if self._share_group:
            data = f"$share/{self._share_group}/{data}"
        topics = [(data, opts), (f"{self.prefix}/+/receipt", opts), (f"{self.prefix}/+/status", opts)]
        _rc, mid = client.subscribe(topics)
        with self._cond:
            self._pending_sub = mid

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

    # ------------------------------------------------------------ message handling

    def _handle(self, topic: str, payload: bytes, arrived: float) -> None:
        head = self.prefix + "/"
        if not topic.startswith(head):
            return
        parts = topic[len(head) :].split("/")
        if len(parts) == 3 and parts[1] == "data":
            self._handle_data(topic, parts[0], parts[2], payload, arrived)
        elif len(parts) == 2 and parts[1] == "receipt":
            self._handle_receipt(parts[0], payload, arrived)
        elif len(parts) == 2 and parts[1] == "status":
            self._handle_status(topic, parts[0], payload, arrived)

    def _handle_data(self, topic: str, device: str, grant_id: str, payload: bytes, arrived: float) -> None:
        with self._lock:
            sk = self._recipients.get((device, grant_id)) or self._recipients.get((None, grant_id))
        if sk is None:
            self._record_rejected(topic, "no-key", f"no recipient key for grant {grant_id!r}", arrived)
            return
        try:
            batch = open_envelope(payload, sk, device, grant_id)  # outside the lock: HPKE + zlib + JSON
        except EnvelopeError as exc:
            self._record_rejected(topic, exc.reason, str(exc), arrived)
            return
        seq: int = batch["seq"]
        record = ReceivedBatch(device, grant_id, seq, tuple(batch["samples"]), arrived, len(payload))
        with self._cond:
            stream = self._streams.setdefault((device, grant_id), _Stream())
            # A seq seen before is a QoS 1 re-delivery (or a replay): drop the copy (§6).
            if seq in stream.seen:
                stream.duplicates += 1
            else:
                stream.seen.add(seq)
                stream.batches.append(record)
            self._cond.notify_all()

    def _handle_receipt(self, device: str, payload: bytes, arrived: float) -> None:
        token = payload.decode("ascii", errors="replace")
        with self._lock:
            key = self._device_keys.get(device)
        try:
            if key is None:
                raise ReceiptError(f"receipt from unregistered device {device!r}")
            claims = verify_receipt(token, key, device=device)
        except ReceiptError as exc:
            with self._cond:
                self._bad_receipts.append(BadReceipt(device, str(exc), token, arrived))
                self._cond.notify_all()
            return
        with self._cond:
            self._receipts.append(Receipt(device, claims, token, arrived))
            self._cond.notify_all()

    def _handle_status(self, topic: str, device: str, payload: bytes, arrived: float) -> None:
        status: dict[str, Any] | None = None
        if payload:
            try:
                parsed = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                self._record_rejected(topic, "status-json", str(exc), arrived)
                return
            if not isinstance(parsed, dict):
                self._record_rejected(topic, "status-json", "status is not a JSON object", arrived)
                return
            status = parsed
        with self._cond:
            self._status.setdefault(device, []).append(status)
            self._cond.notify_all()

    def _record_rejected(self, topic: str, reason: str, detail: str, arrived: float) -> None:
        with self._cond:
            self._rejected.append(RejectedMessage(topic, reason, detail, arrived))
            self._cond.notify_all()

    # ------------------------------------------------------------ accessors

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` is true (re-checked on every recorded message and every 50 ms).

        ``predicate`` may call this peer's accessors. Returns False if ``timeout`` passed first.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Wait until connected and subscribed (e.g. after a broker restart). False on timeout."""
        return self.wait_for(lambda: self._connected and self._subscribed, timeout)

    def streams(self) -> list[tuple[str, str]]:
        """The (device, grant) pairs that delivered at least one batch."""
        with self._lock:
            return sorted(self._streams)

    def batches(self, device: str | None = None, grant: str | None = None) -> list[ReceivedBatch]:
        """Accepted batches (duplicates dropped) in arrival order, optionally for one device/grant."""
        with self._lock:
            out = [
                b
                for (d, g), s in self._streams.items()
                if (device is None or d == device) and (grant is None or g == grant)
                for b in s.batches
            ]
        return sorted(out, key=lambda b: b.arrived)

    def samples(self, device: str | None = None, grant: str | None = None) -> list[ReceivedSample]:
        """Every sample of the accepted batches, in arrival order."""
        return [
            ReceivedSample(b.device, b.grant, b.seq, float(s["t"]), s["path"], s.get("value"), b.arrived)
            for b in self.batches(device, grant)
            for s in b.samples
        ]

    def seqs(self, device: str, grant: str) -> list[int]:
        """The accepted seqs of one stream, in arrival order."""
        return [b.seq for b in self.batches(device, grant)]

    def duplicates(self, device: str | None = None, grant: str | None = None) -> int:
        """How many re-delivered copies were dropped."""
        with self._lock:
            return sum(
                s.duplicates
                for (d, g), s in self._streams.items()
                if (device is None or d == device) and (grant is None or g == grant)
            )

    def missing(self, device: str, grant: str, first: int = 1) -> list[int]:
        """Seqs in ``first`` .. highest seen that never arrived (data lost). ``seq`` starts at 1 (§6)."""
        with self._lock:
            seen = set(self._streams[(device, grant)].seen) if (device, grant) in self._streams else set()
        if not seen:
            return []
        return [n for n in range(first, max(seen) + 1) if n not in seen]

    def gaps(self, device: str, grant: str, first: int = 1) -> list[tuple[int, int]]:
        """:meth:`missing` as inclusive ranges, e.g. ``[(4, 6)]`` when 4, 5 and 6 never arrived."""
        out: list[tuple[int, int]] = []
        for n in self.missing(device, grant, first):
            if out and out[-1][1] == n - 1:
                out[-1] = (out[-1][0], n)
            else:
                out.append((n, n))
        return out

    def rejected(self) -> list[RejectedMessage]:
        """Data and status messages that could not be opened or parsed."""
        with self._lock:
            return list(self._rejected)

    @property
    def undecryptable(self) -> int:
        """How many data messages could not be opened (no key, bad version, HPKE, zlib, JSON, mismatch)."""
        with self._lock:
            return sum(1 for r in self._rejected if r.reason != "status-json")

    def receipts(self, device: str | None = None, typ: str | None = None) -> list[Receipt]:
        """Verified receipts in arrival order, optionally of one device and/or ``typ``."""
        with self._lock:
            return [
                r
                for r in self._receipts
                if (device is None or r.device == device) and (typ is None or r.claims.get("typ") == typ)
            ]

    def bad_receipts(self, device: str | None = None) -> list[BadReceipt]:
        """Receipts that did not verify."""
        with self._lock:
            return [r for r in self._bad_receipts if device is None or r.device == device]

    def status(self, device: str) -> dict[str, Any] | None:
        """The latest status of ``device`` (``None`` if none, or the retained status was cleared)."""
        with self._lock:
            history = self._status.get(device)
            return dict(history[-1]) if history and history[-1] is not None else None

    def status_history(self, device: str) -> list[dict[str, Any] | None]:
        """Every status message of ``device`` in arrival order (``None`` for a cleared retained status)."""
        with self._lock:
            return [dict(s) if s is not None else None for s in self._status.get(device, [])]

    def clear(self) -> None:
        """Forget everything recorded (keys and registrations stay)."""
        with self._cond:
            self._streams.clear()
            self._rejected.clear()
            self._receipts.clear()
            self._bad_receipts.clear()
            self._status.clear()

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: per stream batches, samples by path, duplicates, gaps; receipt counts."""
        with self._lock:
            streams = {}
            for d, g in sorted(self._streams):
                by_path: dict[str, int] = {}
                for s in self.samples(d, g):
                    by_path[s.path] = by_path.get(s.path, 0) + 1
                streams[f"{d}/{g}"] = {
                    "batches": len(self._streams[(d, g)].batches),
                    "samples_by_path": by_path,
                    "duplicates": self._streams[(d, g)].duplicates,
                    "gaps": [list(r) for r in self.gaps(d, g)],
                }
            return {
                "streams": streams,
                "undecryptable": self.undecryptable,
                "receipts": len(self._receipts),
                "bad_receipts": len(self._bad_receipts),
            }
