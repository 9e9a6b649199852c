"""Enrollment and renewal as both sides of the wire read them (README "Enrollment"): topics, the request and
response payloads, the CSR a device builds, the certificate the service issues, and the checks each side
makes. Pure: bytes, keys and a clock in; a value or an :class:`~vgw.base.errors.EnrollmentError` out. No MQTT, no
disk.

Topics (prefix ``vgw``)::

    vgw/enroll/<device>/request    device, claim identity -> service   {"csr": PEM, "token": str}
    vgw/enroll/<device>/response   service -> device                   {"status": "issued", "certificate": PEM}
                                                                        or {"status": "refused", "reason": str}
    vgw/<device>/cert/request      device, own identity -> service     {"csr": PEM}             (renewal)
    vgw/<device>/cert/response     service -> device                   as the enrollment response

The topic names are :mod:`vgw.contract.topics`' (re-exported here).
Raises :class:`~vgw.base.errors.EnrollmentError` with an :class:`~vgw.base.errors.EnrollReason`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vgw.base.errors import EnrollmentError, EnrollReason
from vgw.contract.certs import DEVICE_URI_PREFIX, cert_device_id
from vgw.contract.topics import ENROLL_SEGMENT, Kind, parse_request_topic, request_topic, response_topic

__all__ = [
    "ENROLL_SEGMENT",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "Kind",
    "Request",
    "Response",
    "build_csr",
    "check_csr",
    "check_issued",
    "decode_request",
    "decode_response",
    "encode_issued",
    "encode_refused",
    "encode_request",
    "issue_certificate",
    "key_pem",
    "new_key",
    "parse_request_topic",
    "request_topic",
    "response_topic",
]

MAX_REQUEST_BYTES = 16 * 1024  # README "Enrollment": a request over this is refused before it is parsed
MAX_RESPONSE_BYTES = 64 * 1024  # a leaf and a few intermediates; more is not a certificate chain
MAX_CHAIN = 4
BACKDATE = dt.timedelta(minutes=5)  # notBefore a little early: a device clock a minute behind still accepts it


# ---------------------------------------------------------------- keys and CSRs (device side)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A new EC P-256 device key (TLS client key and ES256 receipt key, README "Receipts")."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def build_csr(key: ec.EllipticCurvePrivateKey, device: str) -> x509.CertificateSigningRequest:
    """A CSR for a TLS client certificate: CN, DNS SAN and URI SAN ``vgw:device:<id>`` carry the id."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(device),
                                                    x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device)]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )


# ---------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Request:
    """A parsed request: the CSR and, for enrollment, the token."""

    csr: x509.CertificateSigningRequest
    token: str | None


def encode_request(csr: x509.CertificateSigningRequest, token: str | None) -> bytes:
    body: dict[str, str] = {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
    if token is not None:
        body["token"] = token
    return json.dumps(body).encode()


def decode_request(payload: bytes, kind: Kind) -> Request:
    """The request on a ``kind`` topic. Raises EnrollmentError: too-large, malformed, bad-csr."""
    # Size before parsing: a 100 MB "CSR" must cost nothing (README "Enrollment").
    if len(payload) > MAX_REQUEST_BYTES:
        raise EnrollmentError(f"request of {len(payload)} bytes is over the limit of {MAX_REQUEST_BYTES}",
                              EnrollReason.TOO_LARGE)
    body = _json_object(payload, "request")
    csr_text = body.get("csr")
    if not isinstance(csr_text, str):
        raise EnrollmentError("request: 'csr' must be a PEM string", EnrollReason.MALFORMED)
    token = body.get("token")
    if kind is Kind.ENROLL and (not isinstance(token, str) or not token):
        raise EnrollmentError("request: 'token' must be a non-empty string", EnrollReason.MALFORMED)
    try:
        csr = x509.load_pem_x509_csr(csr_text.encode())
    except ValueError as exc:
        raise EnrollmentError("request: 'csr' is not a PEM certificate signing request", EnrollReason.BAD_CSR) from exc
    return Request(csr=csr, token=token if kind is Kind.ENROLL else None)


@dataclass(frozen=True)
class Response:
    """A parsed response: the issued chain (leaf first) or the service's reason."""

    chain: tuple[x509.Certificate, ...] = ()
    refused: str | None = None


def encode_issued(chain: list[x509.Certificate]) -> bytes:
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain).decode()
    return json.dumps({"status": "issued", "certificate": pem}).encode()


def encode_refused(reason: EnrollReason, detail: str) -> bytes:
    """The refusal a device prints: ``"<reason>: <detail>"`` (the reason word first, stable)."""
    return json.dumps({"status": "refused", "reason": f"{reason.value}: {detail}"}).encode()


def decode_response(payload: bytes) -> Response:
    """Raises EnrollmentError (malformed) for anything but an issued chain or a refusal with a reason."""
    if len(payload) > MAX_RESPONSE_BYTES:
        raise EnrollmentError(f"response of {len(payload)} bytes is over {MAX_RESPONSE_BYTES}", EnrollReason.MALFORMED)
    body = _json_object(payload, "response")
    status = body.get("status")
    if status == "refused":
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason:
            raise EnrollmentError("response: a refusal without a reason", EnrollReason.MALFORMED)
        return Response(refused=reason[:500])
    if status != "issued" or not isinstance(body.get("certificate"), str):
        raise EnrollmentError("response: 'status' must be 'issued' (with 'certificate') or 'refused'",
                              EnrollReason.MALFORMED)
    try:
        chain = x509.load_pem_x509_certificates(body["certificate"].encode())
    except ValueError as exc:
        raise EnrollmentError("response: 'certificate' is not a PEM chain", EnrollReason.MALFORMED) from exc
    if not 1 <= len(chain) <= MAX_CHAIN:
        raise EnrollmentError(f"response: {len(chain)} certificates (expected 1 to {MAX_CHAIN})",
                              EnrollReason.MALFORMED)
    return Response(chain=tuple(chain))


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise EnrollmentError(f"{what} is not JSON", EnrollReason.MALFORMED) from exc
    if not isinstance(body, dict):
        raise EnrollmentError(f"{what} is not a JSON object", EnrollReason.MALFORMED)
    return body


# ---------------------------------------------------------------- the service's checks and issuing


def check_csr(csr: x509.CertificateSigningRequest, device: str) -> None:
    """The CSR may be signed for ``device``. Raises EnrollmentError: bad-csr, subject."""
    # A CSR whose self-signature fails was not made by the holder of its key (or was altered on the way).
    if not csr.is_signature_valid:
        raise EnrollmentError("CSR signature does not verify", EnrollReason.BAD_CSR)
    # The key must serve the device's two uses: TLS client auth and ES256 receipts (RFC 7518 §3.4: P-256 only).
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EnrollmentError("CSR key is not EC P-256", EnrollReason.BAD_CSR)
    # A device (or a claim holder) asking for another device's identity: the subject must be the topic's id.
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != device:
        named = cns[0].value if cns else None
        raise EnrollmentError(f"CSR names {named!r}, the request is for {device!r}", EnrollReason.SUBJECT)
    # SANs the CSR asks for are ignored (the certificate gets exactly the device's), but any other id in them is
    # an attempt to borrow an identity: refuse rather than silently drop it.
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    for name in san:
        if isinstance(name, x509.DNSName) and name.value != device:
            raise EnrollmentError(f"CSR asks for the name {name.value!r} besides {device!r}", EnrollReason.SUBJECT)
        if isinstance(name, x509.UniformResourceIdentifier) and name.value != DEVICE_URI_PREFIX + device:
            raise EnrollmentError(f"CSR asks for the URI {name.value!r}", EnrollReason.SUBJECT)
        if not isinstance(name, (x509.DNSName, x509.UniformResourceIdentifier)):
            raise EnrollmentError("CSR asks for a name that is not the device's", EnrollReason.SUBJECT)


def issue_certificate(csr: x509.CertificateSigningRequest, device: str, ca_cert: x509.Certificate,
                      ca_key: ec.EllipticCurvePrivateKey, days: int, now: dt.datetime) -> x509.Certificate:
    """A TLS client certificate for ``device`` over the CSR's key (call :func:`check_csr` first): CN, DNS SAN
    and URI SAN carry the id (README "Provisioning"); valid ``days`` days, never past the CA."""
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(device),
                                                    x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device)]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


# ---------------------------------------------------------------- the device's check of what it got


def check_issued(chain: tuple[x509.Certificate, ...], key: ec.EllipticCurvePrivateKey, device: str,
                 anchors: list[x509.Certificate], now: dt.datetime) -> x509.Certificate:
    """The leaf of ``chain`` if it is for ``key`` and ``device``, valid now and chains to one of ``anchors``.

    Raises EnrollmentError (bad-certificate) naming the failed check; the caller installs nothing then.
    """
    leaf = chain[0]
    # A certificate over another key is useless (TLS fails) or worse, someone else's identity.
    if leaf.public_key() != key.public_key():
        raise EnrollmentError("the issued certificate is not for this device's key", EnrollReason.BAD_CERTIFICATE)
    if cert_device_id(leaf) != device:
        raise EnrollmentError(f"the issued certificate names {cert_device_id(leaf)!r}, not {device!r}",
                              EnrollReason.BAD_CERTIFICATE)
    if not leaf.not_valid_before_utc - BACKDATE <= now <= leaf.not_valid_after_utc:
        raise EnrollmentError(f"the issued certificate is not valid now (valid {leaf.not_valid_before_utc:%Y-%m-%d} "
                              f"to {leaf.not_valid_after_utc:%Y-%m-%d})", EnrollReason.BAD_CERTIFICATE)
    # The broker checks the chain against its CA; one that does not chain to ours would never connect.
    if not chains_to(leaf, list(chain[1:]), anchors, now):
        raise EnrollmentError("the issued certificate does not chain to the CA in [mqtt] ca_file",
                              EnrollReason.BAD_CERTIFICATE)
    return leaf


def chains_to(leaf: x509.Certificate, intermediates: list[x509.Certificate], anchors: list[x509.Certificate],
              when: dt.datetime) -> bool:
    """True if ``leaf`` chains through ``intermediates`` to one of ``anchors`` (signatures, CA flags, validity)."""
    current, pool = leaf, list(intermediates)
    for _depth in range(MAX_CHAIN + 1):
        for anchor in anchors:
            if _issued_by(current, anchor):
                return anchor.not_valid_before_utc <= when <= anchor.not_valid_after_utc
        nxt = next((c for c in pool if _issued_by(current, c) and _is_ca(c)), None)
        if nxt is None or not nxt.not_valid_before_utc <= when <= nxt.not_valid_after_utc:
            return False
        pool.remove(nxt)
        current = nxt
    return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
