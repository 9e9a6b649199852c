"""`vgw cloud enroll`: the enrollment and renewal service and device revocation (README "Enrollment").

- :class:`AllowList`: the allow file (TOML ``[[device]]`` tables with ``id`` and ``token``).
- :class:`Ledger`: every issuance and revocation, one JSON line each, appended and fsynced before the answer
  goes out; it is read back at start, so a restarted service still refuses a used token.
- :class:`Issuer`: the decision, no MQTT: request bytes in, response bytes out (:meth:`Issuer.answer`).
- :class:`EnrollService`: answers requests on the broker until stopped.
- :func:`revoke`: records a device's certificates as revoked and writes the CRL (PEM) the broker loads.

Errors: :class:`~vgw.base.errors.CloudKitError` for unusable files; a bad request never raises, it is answered with
a refusal (:class:`~vgw.base.errors.EnrollReason` first, then a sentence a device prints).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vgw.base.errors import CloudKitError, EnrollmentError, EnrollReason, UplinkError
from vgw.cloud.cloudlink import BrokerOptions, CloudLink
from vgw.config.settings import DEVICE_ID_PATTERN
from vgw.contract.enrollment import (
    ENROLL_SEGMENT,
    Kind,
    check_csr,
    decode_request,
    encode_issued,
    encode_refused,
    issue_certificate,
    parse_request_topic,
    response_topic,
)
from vgw.contract.topics import request_filters

__all__ = ["AllowList", "EnrollService", "Issuer", "Ledger", "revoke"]

log = logging.getLogger(__name__)

MAX_ALLOW_BYTES = 16 * 2**20
QUEUE_LIMIT = 10_000  # requests waiting for the issuer; beyond it the broker's QoS 1 retry brings them again


# ---------------------------------------------------------------- allow file


@dataclass(frozen=True)
class AllowList:
    """Device id -> its one-time token."""

    tokens: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> AllowList:
        """Raises CloudKitError naming the file and the entry at fault."""
        try:
            if path.stat().st_size > MAX_ALLOW_BYTES:
                raise CloudKitError(f"{path}: allow file over {MAX_ALLOW_BYTES} bytes")
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CloudKitError(f"{path}: cannot read the allow file: {exc.strerror}") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise CloudKitError(f"{path}: not TOML: {exc}") from exc
        unknown = sorted(set(doc) - {"device"})
        if unknown:
            raise CloudKitError(f"{path}: unknown key {unknown[0]!r} (expected [[device]] tables)")
        tokens: dict[str, str] = {}
        for i, entry in enumerate(doc.get("device", [])):
            where = f"{path}: [[device]] #{i + 1}"
            if not isinstance(entry, dict) or set(entry) != {"id", "token"}:
                raise CloudKitError(f"{where}: needs exactly 'id' and 'token'")
            dev, token = entry["id"], entry["token"]
            if not isinstance(dev, str) or not DEVICE_ID_PATTERN.match(dev) or dev == ENROLL_SEGMENT:
                raise CloudKitError(f"{where}: id {dev!r} is not a device id")
            if not isinstance(token, str) or len(token) < 8:
                raise CloudKitError(f"{where}: token of {dev!r} must be a string of at least 8 characters")
            if dev in tokens:
                raise CloudKitError(f"{where}: device {dev!r} is listed twice")
            tokens[dev] = token
        return cls(tokens)


# ---------------------------------------------------------------- ledger


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


@dataclass
class Ledger:
    """The append-only record of issuances and revocations (JSON lines). One owner: the issuer's thread."""

    path: Path
    issued: list[dict[str, Any]] = field(default_factory=list)
    revoked: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # device -> (serial hex, when)
    skipped: int = 0  # lines that were not records (a line torn by a crash)
    _offset: int = 0  # bytes of the file read so far (complete lines only)
    _by_token: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    _serials: dict[str, list[str]] = field(default_factory=dict)  # device -> serials issued

    @classmethod
    def open(cls, path: Path) -> Ledger:
        """Read the ledger (created empty if missing). Raises CloudKitError."""
        ledger = cls(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise CloudKitError(f"{path}: cannot open the ledger: {exc.strerror}") from exc
        with os.fdopen(fd, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.write(b"\n")  # a crash tore the last line: it stays, unreadable, and the next one starts clean
                fh.flush()
                os.fsync(fh.fileno())
        ledger.refresh()
        return ledger

    def refresh(self) -> None:
        """Read the records appended since the last read (by this process or another: `revoke` while the
        service runs). Raises CloudKitError."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError as exc:
            raise CloudKitError(f"{self.path}: cannot read the ledger: {exc.strerror}") from exc
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += end
        for line in data[:end].splitlines():
            try:
                self._apply(json.loads(line))
            except (ValueError, KeyError, TypeError):
                self.skipped += 1

    def _apply(self, rec: dict[str, Any]) -> None:
        if rec["event"] == "issued":
            self.issued.append(rec)
            self._serials.setdefault(rec["device"], []).append(rec["serial"])
            if "token_sha256" in rec:
                self._by_token.setdefault((rec["device"], rec["token_sha256"]), rec)
        elif rec["event"] == "revoked":
            self.revoked.setdefault(rec["device"], []).extend((s, rec["at"]) for s in rec["serials"])

    def append(self, rec: dict[str, Any]) -> None:
        """Write one record and fsync it. Raises CloudKitError (nothing may be issued unrecorded)."""
        line = json.dumps(rec, sort_keys=True).encode() + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise CloudKitError(f"{self.path}: cannot append to the ledger: {exc.strerror}") from exc
        self.refresh()  # reads it back (with whatever another process appended before it)

    def token_use(self, device: str, token: str) -> dict[str, Any] | None:
        return self._by_token.get((device, _sha256(token.encode())))

    def knows(self, device: str) -> bool:
        return device in self._serials

    def serials_of(self, device: str) -> list[str]:
        return list(self._serials.get(device, []))


# ---------------------------------------------------------------- the issuer


@dataclass
class Issuer:
    """Decides and issues (no MQTT). ``answer`` is called on one thread only (the service's worker)."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    allow: AllowList
    ledger: Ledger
    days: int = 365
    clock: Callable[[], float] = time.time
    counts: dict[str, int] = field(default_factory=lambda: {"issued": 0, "refused": 0, "repeated": 0})

    @classmethod
    def load(cls, ca_cert: Path, ca_key: Path, allow: Path, ledger: Path, days: int) -> Issuer:
        cert, key = load_ca(ca_cert, ca_key)
        if days < 1:
            raise CloudKitError(f"--days {days}: must be >= 1")
        return cls(cert, key, AllowList.load(allow), Ledger.open(ledger), days)

    def answer(self, kind: Kind, device: str, payload: bytes) -> bytes:
        """The response payload for one request."""
        try:
            out = self._decide(kind, device, payload)
        except EnrollmentError as exc:
            self.counts["refused"] += 1
            log.info("enroll: refused %s for %s: %s", kind.value, device, exc)
            return encode_refused(exc.reason, str(exc))
        except CloudKitError as exc:  # the ledger cannot be written: issue nothing
            self.counts["refused"] += 1
            log.error("enroll: %s", exc)
            return encode_refused(EnrollReason.SERVICE, "the service cannot record the issuance; try again later")
        return out

    def _decide(self, kind: Kind, device: str, payload: bytes) -> bytes:
        req = decode_request(payload, kind)  # size limit first, then JSON, then the CSR's PEM
        self.ledger.refresh()  # a `revoke` run meanwhile counts now
        # A revoked device stays out: neither a new enrollment nor a renewal brings it back.
        if device in self.ledger.revoked:
            raise EnrollmentError(f"device {device!r} is revoked", EnrollReason.REVOKED)
        if kind is Kind.ENROLL:
            expected = self.allow.tokens.get(device)
            if expected is None:
                raise EnrollmentError(f"device {device!r} is not in the allow list", EnrollReason.UNKNOWN_DEVICE)
            check_csr(req.csr, device)
            assert req.token is not None
            # Constant-time: the comparison must not tell a guesser how much of the token was right.
            if not hmac.compare_digest(req.token.encode(), expected.encode()):
                raise EnrollmentError(f"wrong token for device {device!r}", EnrollReason.TOKEN)
            used = self.ledger.token_use(device, req.token)
            if used is not None:
                # The same key asking again (its answer was lost, or it asked twice): the same certificate.
                if used["key_sha256"] == _sha256(_spki(req.csr.public_key())):
                    self.counts["repeated"] += 1
                    return json.dumps({"status": "issued", "certificate": used["certificate"]}).encode()
                # Anyone else with the token (a copied token, a second device): one token, one key.
                raise EnrollmentError(f"the token of {device!r} was used on {used['at']}", EnrollReason.TOKEN_USED)
        else:
            # Renewal arrives under the device's own identity (the broker lets only it publish on its topic);
            # it is served for devices this service issued to, or the allow file lists (made by the same CA).
            if not self.ledger.knows(device) and device not in self.allow.tokens:
                raise EnrollmentError(f"device {device!r} was not enrolled here", EnrollReason.NOT_ENROLLED)
            check_csr(req.csr, device)
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        cert = issue_certificate(req.csr, device, self.ca_cert, self.ca_key, self.days, now)
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        rec: dict[str, Any] = {"event": "issued", "kind": kind.value, "device": device,
                               "serial": format(cert.serial_number, "x"), "at": now.isoformat(timespec="seconds"),
                               "not_after": cert.not_valid_after_utc.isoformat(timespec="seconds"),
                               "key_sha256": _sha256(_spki(cert.public_key())), "certificate": pem}
        if req.token is not None:
            rec["token_sha256"] = _sha256(req.token.encode())
        self.ledger.append(rec)  # recorded before it is sent: a crash after this still refuses token reuse
        self.counts["issued"] += 1
        log.info("enroll: issued %s certificate %s to %s until %s", kind.value, rec["serial"], device,
                 rec["not_after"])
        return encode_issued([cert])


def load_ca(ca_cert: Path, ca_key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Raises CloudKitError naming the file."""
    try:
        cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise CloudKitError(f"{ca_cert}: not a readable PEM CA certificate") from exc
    try:
        key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CloudKitError(f"{ca_key}: not a readable unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CloudKitError(f"{ca_key}: not the EC private key of {ca_cert}")
    return cert, key


# ---------------------------------------------------------------- the service on the broker


class EnrollService:
    """Answers enrollment and renewal requests on the broker until ``stop`` is set.

    paho's thread only enqueues (bounded); :meth:`run`'s thread decides, records and publishes, so the ledger
    has one writer. ``ready`` is set once the subscriptions are granted.
    """

    def __init__(self, opts: BrokerOptions, issuer: Issuer) -> None:
        self.opts = opts
        self.issuer = issuer
        self.ready = threading.Event()
        self.dropped = 0  # requests beyond QUEUE_LIMIT (the device asks again)
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(QUEUE_LIMIT)
        self._link = CloudLink(opts, on_message=self._on_message)

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            self._queue.put_nowait((topic, payload))
        except queue.Full:
            self.dropped += 1

    def run(self, stop: threading.Event, deadline: float | None = None) -> None:
        """Raises UplinkError if the broker cannot be reached or refuses the subscriptions."""
        prefix = self.opts.prefix
        self._link.connect()
        try:
            self._link.subscribe([(topic, 1) for topic in request_filters(prefix)])
            self.ready.set()
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                try:
                    topic, payload = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                self._serve(topic, payload)
        finally:
            self._link.close()

    def _serve(self, topic: str, payload: bytes) -> None:
        parsed = parse_request_topic(self.opts.prefix, topic)
        if parsed is None:
            return
        kind, device = parsed
        if kind is Kind.RENEW and device == ENROLL_SEGMENT:
            return  # vgw/enroll/cert/request is an enrollment topic shape, never a device's
        answer = self.issuer.answer(kind, device, payload)
        try:
            self._link.publish(response_topic(self.opts.prefix, kind, device), answer, retain=False)
        except UplinkError as exc:
            log.warning("enroll: answer to %s not delivered: %s (it will ask again)", device, exc)


# ---------------------------------------------------------------- revocation


def revoke(ca_cert: Path, ca_key: Path, ledger_path: Path, crl_path: Path, device: str | None,
           clock: Callable[[], float] = time.time) -> list[str]:
    """Revoke every certificate the ledger shows issued to ``device`` (None: only write the CRL) and write the
    CRL of everything revoked so far. Returns the serials revoked now. Raises CloudKitError.

    The CRL's nextUpdate is the CA's expiry: a broker that checks CRLs refuses every client once its CRL is
    out of date, so the CRL must never lapse on its own; it is replaced by the next `revoke`.
    """
    cert, key = load_ca(ca_cert, ca_key)
    ledger = Ledger.open(ledger_path)
    now = dt.datetime.fromtimestamp(clock(), dt.UTC)
    serials: list[str] = []
    if device is not None:
        if not ledger.knows(device):
            raise CloudKitError(f"{ledger_path}: no certificate was issued to {device!r}")
        already = {serial for serial, _at in ledger.revoked.get(device, [])}
        serials = [s for s in ledger.serials_of(device) if s not in already]
        if serials:
            ledger.append({"event": "revoked", "device": device, "serials": serials,
                           "at": now.isoformat(timespec="seconds")})
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(cert.subject)
               .last_update(now - dt.timedelta(minutes=5))
               .next_update(cert.not_valid_after_utc)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
               .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False))
    for dev_serials in ledger.revoked.values():
        for serial, at in dev_serials:
            builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                                                      .revocation_date(dt.datetime.fromisoformat(at)).build())
    crl = builder.sign(key, hashes.SHA256())
    tmp = crl_path.with_name(f".{crl_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        os.chmod(tmp, 0o644)  # the broker (its own user) reads it
        os.replace(tmp, crl_path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CloudKitError(f"{crl_path}: cannot write the CRL: {exc.strerror}") from exc
    return serials
