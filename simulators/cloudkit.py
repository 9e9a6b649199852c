"""The cloud integration kit behind ``vgw cloud``: keys, consent documents, push, revoke, listen, receipts.

Everything the cloud side of CONTRACT §4-§7 needs, as small functions over :mod:`simulators.cloud`'s
primitives (which stay the one implementation of JWS signing, HPKE and receipt verification):

- :func:`keygen`: the consent signing key (Ed25519) and one HPKE recipient key pair per controller;
- :func:`load_grants` / :func:`sign_documents`: a consent document per device from a TOML or JSON grants
  description; :func:`revoke_document`: the next version without some (or all) grants;
- :class:`CloudLink`: one MQTT connection over mutual TLS (MQTT 5, or 3.1.1 for brokers such as NATS;
  ``auto`` tries 5 first) that publishes retained consent and subscribes;
- :class:`Listener`: opens envelopes with the recipient keys, verifies receipts with the device certificates,
  and turns every message into one JSON-ready event, finding duplicates and seq gaps per device and grant;
- :func:`verify_receipt_file`.

Errors: :class:`CloudKitError` (a ``ConfigError``: bad key file, description, document or option, with the
file and field named), :class:`~agent.errors.UplinkError` (broker), :class:`~simulators.cloud.ReceiptError`.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.errors import ConfigError, UplinkError
from agent.scopes import SCOPES
from simulators.cloud import (
    EnvelopeError,
    HpkePrivateKey,
    ReceiptError,
    RecipientKey,
    SigningKey,
    consent_claims,
    open_envelope,
    recipient_public_key,
    sign_consent,
    verify_receipt,
)
from simulators.pki import device_id_from_cert, device_public_key_from_cert

__all__ = [
    "BrokerOptions",
    "CloudKitError",
    "CloudLink",
    "Listener",
    "keygen",
    "load_device_certs",
    "load_grants",
    "load_recipient_keys",
    "revoke_document",
    "sign_documents",
    "verify_receipt_file",
]

SIGNER_KEY = "consent-signer.key"
SIGNER_PUB = "consent-signer.pub.pem"
RECIPIENTS = "recipients"
DEFAULT_TTL_S = 86400
_GRANT_KEYS = {"id", "controller", "purpose", "scopes", "recipient", "limits", "retention_s"}
_TOP_KEYS = {"grant", "grants", "ttl_s", "iss", "ver", "devices"}


class CloudKitError(ConfigError):
    """A key file, grants description, consent document or option is unusable (message names it)."""


# ---------------------------------------------------------------- files


def _write_private(path: Path, data: bytes, force: bool) -> Path:
    if path.exists() and not force:
        raise CloudKitError(f"{path}: exists (use --force to replace a key)")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    os.chmod(path, 0o600)
    return path


def _write_public(path: Path, data: bytes) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def keygen(directory: Path, recipients: Iterable[str] = (), *, signer: bool = True, force: bool = False
           ) -> list[Path]:
    """Write keys into ``directory``: ``consent-signer.key`` (0600) + ``.pub.pem`` (what devices trust), and
    per controller ``recipients/<name>.key`` (X25519, 0600, PKCS#8 PEM) + ``<name>.pub.json`` (the grant's
    ``recipient`` object). An existing signing key is kept unless ``force``. Returns the written paths.

    Raises :class:`CloudKitError` for a bad name or an existing recipient key without ``force``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    signer_path = directory / SIGNER_KEY
    if signer and (force or not signer_path.exists()):
        key = SigningKey.generate()
        pem = key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        out.append(_write_private(signer_path, pem, True))
        out.append(_write_public(directory / SIGNER_PUB, key.public_pem()))
    for name in recipients:
        if not name or "/" in name or name.startswith(".") or "\x00" in name:
            raise CloudKitError(f"recipient name {name!r}: must be a plain file-name stem")
        rdir = directory / RECIPIENTS
        rdir.mkdir(exist_ok=True)
        rk = RecipientKey.generate("X25519")
        assert isinstance(rk.private_key, x25519.X25519PrivateKey)
        pem = rk.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
        out.append(_write_private(rdir / f"{name}.key", pem, force))
        pub = {**rk.recipient(), "controller": name}
        out.append(_write_public(rdir / f"{name}.pub.json", (json.dumps(pub, indent=2) + "\n").encode()))
    return out


def load_signing_key(path: Path) -> SigningKey:
    """Load the consent signing key. Raises :class:`CloudKitError` naming the file."""
    try:
        return SigningKey.load(path)
    except (OSError, ValueError, TypeError) as exc:
        raise CloudKitError(f"{path}: cannot load the Ed25519 signing key: {exc}") from exc


def load_recipient_keys(paths: Iterable[Path]) -> dict[str, HpkePrivateKey]:
    """Recipient private keys by file stem, from ``*.key`` files or directories holding them.

    Raises :class:`CloudKitError` for an unreadable file or a key that is not X25519.
    """
    out: dict[str, HpkePrivateKey] = {}
    for p in paths:
        files = sorted(p.glob("*.key")) if p.is_dir() else [p]
        if p.is_dir() and (p / RECIPIENTS).is_dir():
            files = sorted((p / RECIPIENTS).glob("*.key"))
        for f in files:
            try:
                key = serialization.load_pem_private_key(f.read_bytes(), password=None)
            except (OSError, ValueError, TypeError) as exc:
                raise CloudKitError(f"{f}: cannot load a recipient key: {exc}") from exc
            if not isinstance(key, x25519.X25519PrivateKey):
                raise CloudKitError(f"{f}: not an X25519 private key")
            out[f.name.removesuffix(".key")] = key
    if not out:
        raise CloudKitError("no recipient keys found (give --recipient FILE|DIR)")
    return out


def load_device_certs(paths: Iterable[Path]) -> dict[str, ec.EllipticCurvePublicKey]:
    """Receipt verification keys by device id, from certificate files or directories of ``*.crt``.

    A certificate's device id is its ``vgw:device:`` URI SAN, else its CN. In a directory, certificates
    without a P-256 key are skipped; a named file must be usable. Raises :class:`CloudKitError`.
    """
    out: dict[str, ec.EllipticCurvePublicKey] = {}
    for p in paths:
        files = sorted(p.glob("*.crt")) if p.is_dir() else [p]
        for f in files:
            try:
                out[device_id_from_cert(f)] = device_public_key_from_cert(f)
            except (OSError, ValueError) as exc:
                if not p.is_dir():
                    raise CloudKitError(f"{f}: {exc}") from exc
    return out


# ---------------------------------------------------------------- consent documents


def _load_structured(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CloudKitError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CloudKitError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise CloudKitError(f"{path}: must be an object/table")
    return data


def load_grants(path: Path) -> dict[str, Any]:
    """Parse a grants description (TOML, or JSON if it ends in ``.json``)::

        ttl_s = 86400                      # optional: exp = iat + ttl_s
        [[grant]]
        id = "g-fleet-1"
        controller = "com.example.fleet"   # optional
        purpose = "fleet-maintenance"      # optional
        scopes = ["read_odometer", "read_location"]
        recipient = "keys/recipients/fleet.pub.json"   # a keygen .pub.json (relative to this file) or {kem, pk}
        retention_s = 86400                # optional
        limits = { read_location = { max_hz = 0.2, precision_m = 1000 } }   # optional

    Returns ``{"grants": [...], "ttl_s": int, "iss": str, "ver": int | None, "devices": [...]}``. Every
    rule the device would apply to the grants (known scopes, unique ids, a usable recipient key) is
    checked here first, so a typo fails at the console, not in the car. Raises :class:`CloudKitError`.
    """
    data = _load_structured(path)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise CloudKitError(f"{path}: unknown key(s) {sorted(unknown)}")
    raw = data.get("grant", data.get("grants", []))
    if not isinstance(raw, list):
        raise CloudKitError(f"{path}: 'grant' must be an array of tables")
    grants: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, g in enumerate(raw):
        where = f"{path}: grant[{i}]"
        if not isinstance(g, dict):
            raise CloudKitError(f"{where}: must be a table")
        extra = set(g) - _GRANT_KEYS
        if extra:
            raise CloudKitError(f"{where}: unknown key(s) {sorted(extra)}")
        gid = g.get("id")
        if not isinstance(gid, str) or not gid or "/" in gid or "+" in gid or "#" in gid or "." in gid:
            raise CloudKitError(f"{where}: id {gid!r} must be a non-empty string without / + # .")
        if gid in seen:
            raise CloudKitError(f"{where}: id {gid!r} is not unique")
        seen.add(gid)
        scopes = g.get("scopes")
        if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
            raise CloudKitError(f"{where}: scopes must be a non-empty list of strings")
        bad = [s for s in scopes if s not in SCOPES]
        if bad:
            raise CloudKitError(f"{where}: scope {bad[0]!r} is not a known read scope (CONTRACT §3)")
        recipient = g.get("recipient")
        if isinstance(recipient, str):
            rpath = (path.parent / recipient) if not Path(recipient).is_absolute() else Path(recipient)
            rdata = _load_structured(rpath if rpath.suffix == ".json" else rpath.with_suffix(".json"))
            recipient = {"kem": rdata.get("kem"), "pk": rdata.get("pk")}
        if not isinstance(recipient, dict):
            raise CloudKitError(f"{where}: recipient must be a .pub.json path or a {{kem, pk}} table")
        try:
            recipient_public_key(recipient)
        except ValueError as exc:
            raise CloudKitError(f"{where}: recipient: {exc}") from exc
        out: dict[str, Any] = {
            "id": gid,
            "controller": str(g.get("controller", "com.example.fleet")),
            "purpose": str(g.get("purpose", "fleet-maintenance")),
            "scopes": list(scopes),
            "recipient": {"kem": recipient["kem"], "pk": recipient["pk"]},
        }
        if "limits" in g:
            if not isinstance(g["limits"], dict) or not set(g["limits"]) <= set(scopes):
                raise CloudKitError(f"{where}: limits must be a table keyed by the grant's scopes")
            out["limits"] = g["limits"]
        if "retention_s" in g:
            if not isinstance(g["retention_s"], int) or g["retention_s"] <= 0:
                raise CloudKitError(f"{where}: retention_s must be a positive integer")
            out["retention_s"] = g["retention_s"]
        grants.append(out)
    ttl = data.get("ttl_s", DEFAULT_TTL_S)
    if not isinstance(ttl, int) or ttl <= 0:
        raise CloudKitError(f"{path}: ttl_s must be a positive integer")
    ver = data.get("ver")
    if ver is not None and (not isinstance(ver, int) or ver < 1):
        raise CloudKitError(f"{path}: ver must be an integer >= 1")
    devices = data.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise CloudKitError(f"{path}: devices must be a list of device ids")
    return {"grants": grants, "ttl_s": ttl, "iss": str(data.get("iss", "consent-service")), "ver": ver,
            "devices": devices}


def default_version(now: float | None = None) -> int:
    """A version that rises without a counter to keep: Unix time in milliseconds.

    The device accepts only a version greater than the one in force (§5), so two documents signed by
    different consent-service replicas in order still apply in order.
    """
    return int((time.time() if now is None else now) * 1000)


def sign_documents(key: SigningKey, description: Mapping[str, Any], devices: Iterable[str], *,
                   ver: int | None = None, now: int | None = None) -> dict[str, str]:
    """One signed consent document (compact JWS) per device. Raises :class:`CloudKitError` for no devices."""
    targets = list(devices) or list(description.get("devices", []))
    if not targets:
        raise CloudKitError("no device: give --device ID (repeatable) or 'devices' in the description")
    version = ver or description.get("ver") or default_version()
    iat = int(time.time()) if now is None else now
    out: dict[str, str] = {}
    for device in targets:
        claims = consent_claims(device, version, description["grants"], iat=iat,
                                exp=iat + int(description["ttl_s"]), iss=description["iss"])
        out[device] = sign_consent(claims, key)
    return out


def read_document(path: Path, key: SigningKey | None = None) -> dict[str, Any]:
    """The claims of a consent document file, verified under ``key`` when given (expiry not checked: a
    revocation of an expired document is still a valid revocation). Raises :class:`CloudKitError`."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise CloudKitError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        if key is None:
            claims = jwt.decode(token, options={"verify_signature": False})
        else:
            claims = jwt.decode(token, key.public_key, algorithms=["EdDSA"],
                                options={"verify_exp": False, "verify_iat": False})
    except jwt.PyJWTError as exc:
        raise CloudKitError(f"{path}: not a consent document signed by this key: {exc}") from exc
    if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("ver"), int):
        raise CloudKitError(f"{path}: consent document lacks sub/ver")
    return dict(claims)


def revoke_document(key: SigningKey, current: Mapping[str, Any], grants: Iterable[str] | None, *,
                    ver: int | None = None, ttl_s: int = DEFAULT_TTL_S) -> str:
    """The next version of ``current`` (claims) without the named grants (``None``: without any grant).

    Raises :class:`CloudKitError` if a named grant is not in ``current`` or ``ver`` does not rise.
    """
    kept = list(current.get("grants", []))
    if grants is not None:
        names = set(grants)
        present = {g.get("id") for g in kept}
        missing = sorted(names - present)
        if missing:
            raise CloudKitError(f"grant {missing[0]!r} is not in consent v{current['ver']} of {current['sub']}")
        kept = [g for g in kept if g.get("id") not in names]
    else:
        kept = []
    version = ver if ver is not None else max(int(current["ver"]) + 1, default_version())
    if version <= int(current["ver"]):
        raise CloudKitError(f"--ver {version} must be greater than the current version {current['ver']}")
    iat = int(time.time())
    claims = consent_claims(str(current["sub"]), version, kept, iat=iat, exp=iat + ttl_s,
                            iss=str(current.get("iss", "consent-service")))
    return sign_consent(claims, key)


def verify_receipt_file(path: Path, keys: Mapping[str, ec.EllipticCurvePublicKey]) -> dict[str, Any]:
    """Verify the receipt in ``path`` (compact JWS, ES256) under the certificate of the device it names.

    Raises :class:`CloudKitError` if unreadable, :class:`ReceiptError` if it does not verify.
    """
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise CloudKitError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if token.startswith("{"):  # a JSON line from `vgw cloud listen`: take its token
        try:
            token = str(json.loads(token)["token"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CloudKitError(f"{path}: JSON without a 'token' field") from exc
    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError as exc:
        raise ReceiptError(f"{path}: not a compact JWS: {exc}") from exc
    if not isinstance(sub, str) or sub not in keys:
        raise ReceiptError(f"{path}: receipt names device {sub!r}, for which no certificate was given")
    return verify_receipt(token, keys[sub], device=sub)


# ---------------------------------------------------------------- the MQTT link


@dataclass(frozen=True)
class BrokerOptions:
    """Where and how to connect: ``protocol`` is ``"auto"``, ``"5"`` or ``"3.1.1"``."""

    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    protocol: str = "auto"
    prefix: str = "vgw"
    client_id: str = "vgw-cloud"
    persistent: bool = False

    @staticmethod
    def parse_address(text: str) -> tuple[str, int]:
        """``HOST:PORT`` -> (host, port). Raises :class:`CloudKitError`."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CloudKitError(f"--broker {text!r}: expected HOST:PORT")
        return host, int(port)


class CloudLink:
    """One MQTT connection of the cloud over mutual TLS; paho is private, its callbacks only record.

    ``on_message(topic, payload)`` runs on paho's network thread. Raises :class:`UplinkError` from
    :meth:`connect`, :meth:`publish` and :meth:`subscribe` when the broker refuses or does not answer.
    """

    def __init__(self, opts: BrokerOptions, on_message: Callable[[str, bytes], None] | None = None) -> None:
        self.opts = opts
        self.protocol = "5" if opts.protocol in ("auto", "5") else "3.1.1"
        self._on_message_cb = on_message
        self._cond = threading.Condition()
        self._connected = False
        self._error: str | None = None
        self._acks: dict[int, str | None] = {}
        self._subacks: dict[int, list[str]] = {}
        self._client: mqtt.Client | None = None
        self._subscriptions: list[tuple[str, int]] = []

    def _make(self) -> mqtt.Client:
        v5 = self.protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.opts.client_id,
                             protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                             clean_session=None if v5 else not self.opts.persistent)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=os.fspath(self.opts.ca_file))
            ctx.load_cert_chain(os.fspath(self.opts.cert_file), os.fspath(self.opts.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise CloudKitError(f"TLS files {self.opts.ca_file}, {self.opts.cert_file}: {exc}") from exc
        client.tls_set_context(ctx)
        client.reconnect_delay_set(1, 4)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def connect(self, timeout: float = 10.0) -> CloudLink:
        """Connect (``auto``: MQTT 5, else 3.1.1 if the broker refuses 5). Raises :class:`UplinkError`."""
        ok = self._try(timeout)
        if not ok and self.opts.protocol == "auto" and self.protocol == "5" and self._error is not None \
                and ("protocol" in self._error.lower() or "before CONNACK" in self._error):
            self.protocol = "3.1.1"
            ok = self._try(timeout)
        if not ok:
            raise UplinkError(f"cannot connect to {self.opts.host}:{self.opts.port}: {self._error or 'timeout'}")
        return self

    def _try(self, timeout: float) -> bool:
        self.close()
        self._error = None
        client = self._make()
        self._client = client
        try:
            if self.protocol == "5":
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties
                props = None
                if self.opts.persistent:
                    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    props.SessionExpiryInterval = 3600
                client.connect(self.opts.host, self.opts.port, keepalive=30,
                               clean_start=not self.opts.persistent, properties=props)
            else:
                client.connect(self.opts.host, self.opts.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self._error = str(exc)
            self._client = None
            return False
        client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connected or self._error is not None, timeout)
            ok = self._connected
        if not ok:
            self.close()
        return ok

    def publish(self, topic: str, payload: bytes, *, retain: bool = True, timeout: float = 10.0) -> None:
        """Publish at QoS 1 and wait for the PUBACK. Raises :class:`UplinkError`."""
        if self._client is None:
            raise RuntimeError("not connected")
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._acks, timeout):
                raise UplinkError(f"no PUBACK for {topic} within {timeout:g} s")
            refused = self._acks.pop(info.mid)
        if refused is not None:
            raise UplinkError(f"broker refused publish to {topic}: {refused}")

    def subscribe(self, topics: list[tuple[str, int]], timeout: float = 10.0) -> list[str]:
        """Subscribe (kept across reconnects); returns the granted/failed reason per topic."""
        if self._client is None:
            raise RuntimeError("not connected")
        self._subscriptions = list(topics)
        _rc, mid = self._client.subscribe(topics)
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise UplinkError("no SUBACK within timeout")
            return self._subacks.pop(mid)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()
        with self._cond:
            self._connected = False

    # paho callbacks (network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            if rc.is_failure:
                self._error = f"CONNACK {rc}"
            else:
                self._connected = True
            self._cond.notify_all()
        if not rc.is_failure and self._subscriptions:
            client.subscribe(self._subscriptions)  # re-subscribe after a reconnect

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            if not self._connected and self._error is None:
                self._error = f"disconnected before CONNACK: {rc}"
            self._connected = False
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._cond:
            self._acks[mid] = str(rc) if getattr(rc, "is_failure", False) else None
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._cond:
            self._subacks[mid] = [str(r) for r in rcs]
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if self._on_message_cb is not None:
            self._on_message_cb(message.topic, bytes(message.payload))


# ---------------------------------------------------------------- the listener


@dataclass
class _Stream:
    seen: set[int] = field(default_factory=set)
    high: int = 0
    duplicates: int = 0


class Listener:
    """Turns messages into events (dicts, one JSON line each); thread-safe.

    Events: ``batch`` (decrypted), ``duplicate`` (a seq seen before: QoS 1 re-delivery, dropped), ``gap``
    (seqs skipped: ``from``..``to``; off with ``detect_gaps=False``, e.g. for one of several ``--share``
    workers that sees only part of each stream), ``receipt`` / ``bad-receipt``, ``status``, ``rejected``.
    """

    def __init__(self, prefix: str, recipients: Mapping[str, HpkePrivateKey],
                 device_keys: Mapping[str, ec.EllipticCurvePublicKey], emit: Callable[[dict[str, Any]], None],
                 *, detect_gaps: bool = True) -> None:
        self.prefix = prefix
        self._recipients = dict(recipients)
        self._keys = dict(device_keys)
        self._emit = emit
        self.detect_gaps = detect_gaps
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._key_of: dict[tuple[str, str], str] = {}
        self.counts: dict[str, int] = {}

    def topics(self, share: str | None = None) -> list[tuple[str, int]]:
        data = f"{self.prefix}/+/data/+"
        if share:
            data = f"$share/{share}/{data}"
        return [(data, 1), (f"{self.prefix}/+/receipt", 1), (f"{self.prefix}/+/status", 1)]

    def handle(self, topic: str, payload: bytes) -> None:
        """Classify one message and emit its event(s). Never raises (a listener must not die on input)."""
        arrived = time.time()
        parts = topic.split("/")
        try:
            if len(parts) == 4 and parts[0] == self.prefix and parts[2] == "data":
                self._data(parts[1], parts[3], payload, arrived)
            elif len(parts) == 3 and parts[0] == self.prefix and parts[2] == "receipt":
                self._receipt(parts[1], payload, arrived)
            elif len(parts) == 3 and parts[0] == self.prefix and parts[2] == "status":
                self._status(parts[1], payload, arrived)
        except Exception as exc:  # noqa: BLE001 - reported as an event, the listener goes on
            self._out({"type": "rejected", "topic": topic, "reason": "internal", "detail": repr(exc),
                       "arrived": arrived})

    def _out(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.counts[event["type"]] = self.counts.get(event["type"], 0) + 1
        self._emit(event)

    def _data(self, device: str, grant: str, payload: bytes, arrived: float) -> None:
        with self._lock:
            cached = self._key_of.get((device, grant))
        names = ([cached] if cached else []) + [n for n in self._recipients if n != cached]
        batch = None
        last: EnvelopeError | None = None
        for name in names:
            try:
                batch = open_envelope(payload, self._recipients[name], device, grant)
            except EnvelopeError as exc:
                last = exc
                if exc.reason != "hpke":
                    break  # opened but malformed: another key would not help
                continue
            with self._lock:
                self._key_of[(device, grant)] = name
            break
        if batch is None:
            reason = last.reason if last else "no-key"
            self._out({"type": "rejected", "topic": f"{self.prefix}/{device}/data/{grant}", "reason": reason,
                       "detail": str(last) if last else "no recipient key", "arrived": arrived})
            return
        seq: int = batch["seq"]
        events: list[dict[str, Any]] = []
        with self._lock:
            st = self._streams.setdefault((device, grant), _Stream())
            if seq in st.seen:
                st.duplicates += 1
                events.append({"type": "duplicate", "device": device, "grant": grant, "seq": seq,
                               "arrived": arrived})
            else:
                # A first-seen seq above high + 1 means seqs in between were lost (or are late). The first
                # message of a stream only counts from 1 when seq restarts there: a listener started
                # mid-stream has not "lost" the history it never subscribed to.
                if self.detect_gaps and st.high and seq > st.high + 1:
                    events.append({"type": "gap", "device": device, "grant": grant, "from": st.high + 1,
                                   "to": seq - 1, "arrived": arrived})
                st.seen.add(seq)
                st.high = max(st.high, seq)
                events.append({"type": "batch", "device": device, "grant": grant, "seq": seq,
                               "samples": batch["samples"], "arrived": arrived, "bytes": len(payload)})
        for e in events:
            self._out(e)

    def _receipt(self, device: str, payload: bytes, arrived: float) -> None:
        token = payload.decode("ascii", errors="replace")
        key = self._keys.get(device)
        try:
            if key is None:
                raise ReceiptError(f"receipt from device {device!r} without a known certificate")
            claims = verify_receipt(token, key, device=device)
        except ReceiptError as exc:
            self._out({"type": "bad-receipt", "device": device, "reason": str(exc), "token": token,
                       "arrived": arrived})
            return
        self._out({"type": "receipt", "device": device, "receipt": claims.get("typ"), "claims": claims,
                   "token": token, "arrived": arrived})

    def _status(self, device: str, payload: bytes, arrived: float) -> None:
        status: Any = None
        if payload:
            try:
                status = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                status = {"unparsable": True}
        self._out({"type": "status", "device": device, "status": status, "arrived": arrived})

    def summary(self) -> dict[str, Any]:
        """Per stream: batches, duplicates, first and highest seq, missing ranges (if gap detection is on)."""
        with self._lock:
            streams = {}
            for (d, g), st in sorted(self._streams.items()):
                lo = min(st.seen) if st.seen else 0
                missing = [n for n in range(lo, st.high + 1) if n not in st.seen]
                ranges: list[list[int]] = []
                for n in missing:
                    if ranges and ranges[-1][1] == n - 1:
                        ranges[-1][1] = n
                    else:
                        ranges.append([n, n])
                streams[f"{d}/{g}"] = {"batches": len(st.seen), "duplicates": st.duplicates, "first": lo,
                                       "high": st.high, **({"missing": ranges} if self.detect_gaps else {})}
            return {"streams": streams, "events": dict(self.counts)}
