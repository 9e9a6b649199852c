"""The supported Python API for the cloud side of vgw: what a backend needs to talk to vgw devices.

Everything a backend reads or writes on the wire (README "Consent document", "Telemetry envelope",
"Receipts") through four functions, each over small frozen types:

- [`open_envelope`][vgw.api.open_envelope]: a telemetry envelope (both plaintext versions) into a
  [`Batch`][vgw.api.Batch] of [`Sample`][vgw.api.Sample] objects;
- [`verify_receipt`][vgw.api.verify_receipt]: a device's receipt, checked against its
  [`DeviceCertificate`][vgw.api.DeviceCertificate], into a [`Receipt`][vgw.api.Receipt];
- [`check_grants`][vgw.api.check_grants]: a grants file (the TOML or JSON that `vgw cloud sign --grants`
  reads) into a [`GrantsFile`][vgw.api.GrantsFile], with every rule the device applies to a grant checked first;
- [`sign_consent`][vgw.api.sign_consent]: a [`GrantsFile`][vgw.api.GrantsFile] signed for one device into a
  [`SignedConsent`][vgw.api.SignedConsent], a document the device's own verifier accepts.

Keys are loaded with [`load_signing_key`][vgw.api.load_signing_key],
[`load_recipient_key`][vgw.api.load_recipient_key] and [`load_device_certificate`][vgw.api.load_device_certificate]
(the files `vgw cloud keygen` and `vgw provision` write).

Only the names in `__all__` are supported; every other module of `vgw` is internal and may change in any
release. Versioning: [`PROTOCOL_VERSION`][vgw.api.PROTOCOL_VERSION] is the version of the public contract
(command line, files, wire formats) this API speaks; [`API_VERSION`][vgw.api.API_VERSION] is the version of this
module's names and signatures: the minor number rises when a name or an optional parameter is added, the major
number when one changes or goes.

Errors are those of the vgw error tree (`vgw.base.errors`):

```text
VgwError
 +-- ConfigError
 |    +-- CloudKitError    a key, certificate or grants file is unusable (names the file and field)
 +-- ConsentError          a document the device would reject (``reason`` names the rule)
 +-- EnvelopeError         an envelope broke a rule of README "Telemetry envelope" (``reason``)
 +-- ReceiptError          a receipt is not a valid ES256 JWS of the certificate's device
```

A function given an argument of the wrong type raises ``TypeError``, as Python does. No function here does
network I/O; the loaders read the one file they are given.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from vgw.base.errors import CloudKitError, ConfigError, ConsentError, EnvelopeError, ReceiptError, VgwError
from vgw.cloud import cloudkit, envelopes
from vgw.cloud.consent_authority import HpkePrivateKey, SigningKey
from vgw.contract.certs import cert_device_id
from vgw.contract.consent.verifier import verify_consent

__all__ = [
    "API_VERSION",
    "PROTOCOL_VERSION",
    "Batch",
    "CloudKitError",
    "ConfigError",
    "ConsentError",
    "DeviceCertificate",
    "EnvelopeError",
    "Grant",
    "GrantsFile",
    "Receipt",
    "ReceiptError",
    "Recipient",
    "RecipientPrivateKey",
    "Sample",
    "SampleValue",
    "SignedConsent",
    "SigningKey",
    "VgwError",
    "check_grants",
    "load_device_certificate",
    "load_recipient_key",
    "load_signing_key",
    "open_envelope",
    "sign_consent",
    "verify_receipt",
]

API_VERSION = "1.0"
"""Version of this module's names and signatures (minor: additions; major: changes or removals)."""

PROTOCOL_VERSION = "1.2"
"""Version of vgw's public contract (command line, files, MQTT topics, consent document, envelope, receipts)
that this API reads and writes."""

RecipientPrivateKey: TypeAlias = HpkePrivateKey
"""An app's HPKE private key: ``cryptography``'s ``X25519PrivateKey`` (the contract's KEM), or the hybrid
``MLKEM768X25519PrivateKey``."""

SampleValue: TypeAlias = "float | int | str | bool | Mapping[str, SampleValue] | tuple[SampleValue, ...] | None"
"""A sample's value as decoded from the plaintext's JSON: a number for most signals, a string (the VIN), or a
read-only mapping (an ``aggregate`` rule's ``{"n", "min", "max", "mean", "last"}``)."""


def _frozen(value: Any) -> SampleValue:
    """A JSON value made read-only: objects become read-only mappings, arrays tuples."""
    if isinstance(value, dict):
        return MappingProxyType({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"not a JSON value: {type(value).__name__}")


# ---------------------------------------------------------------- telemetry


@dataclass(frozen=True)
class Sample:
    """One reading: ``t`` is the frame's time in Unix seconds, ``path`` its COVESA VSS path."""

    t: float
    path: str
    value: SampleValue


@dataclass(frozen=True)
class Batch:
    """One opened telemetry envelope (README "Telemetry envelope").

    A receiver de-duplicates on ``(device, grant, epoch, seq)``: the same pair twice is a QoS 1 re-delivery;
    within one ``epoch`` a gap in ``seq`` means data lost. ``plaintext_version`` is the plaintext's ``v`` (1: one
    object per sample, 2: columnar); ``samples`` are the same either way, in the plaintext's order (for version
    2, series by series). ``epoch`` is ``""`` for an agent older than contract 1.1.
    """

    device: str
    grant: str
    seq: int
    epoch: str
    plaintext_version: int
    samples: tuple[Sample, ...]


def open_envelope(payload: bytes, key: RecipientPrivateKey, *, device: str, grant: str) -> Batch:
    """Open the envelope ``payload`` received on ``<prefix>/<device>/data/<grant>`` with the grant's recipient key.

    Checks the version byte, opens the HPKE seal with ``info`` bound to ``device`` and ``grant`` (an envelope
    replayed onto another device's or grant's topic fails), bounds the decompressed size, and checks that the
    plaintext names the same device and grant and has a valid ``seq``, ``epoch`` and samples, in either
    plaintext version.

    Raises:
        EnvelopeError: the envelope broke one of those rules; ``reason`` says which (``length``, ``version``,
            ``hpke``, ``zlib``, ``json``, ``schema``, ``mismatch``).
    """
    batch = envelopes.open_envelope(payload, key, device, grant)
    try:
        samples = tuple(Sample(float(s["t"]), s["path"], _frozen(s.get("value"))) for s in batch["samples"])
    except TypeError as exc:  # only a JSON library that returns something else could get here
        raise EnvelopeError(f"envelope {device}/{grant}: {exc}", "schema") from exc
    return Batch(device=device, grant=grant, seq=int(batch["seq"]), epoch=str(batch.get("epoch", "")),
                 plaintext_version=int(batch["v"]), samples=samples)


# ---------------------------------------------------------------- receipts


@dataclass(frozen=True)
class DeviceCertificate:
    """A device's TLS client certificate: the device id it names and the EC P-256 key its receipts are signed
    with (README "Receipts")."""

    device: str
    public_key: ec.EllipticCurvePublicKey
    certificate: x509.Certificate = field(repr=False)

    @classmethod
    def from_pem(cls, data: bytes, *, name: str = "certificate") -> DeviceCertificate:
        """Read a PEM certificate. ``name`` is how errors call it (a file name, for instance).

        Raises:
            CloudKitError: not a PEM certificate, no EC P-256 key, or no device id (``vgw:device:`` URI SAN or
                CN).
        """
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise CloudKitError(f"{name}: not a PEM X.509 certificate: {exc}") from exc
        key = cert.public_key()
        # ES256 needs exactly P-256 (RFC 7518 section 3.4): any other key cannot have signed a receipt.
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise CloudKitError(f"{name}: certificate key is not EC P-256 (needed for ES256 receipts)")
        device = cert_device_id(cert)
        if not device:
            raise CloudKitError(f"{name}: certificate names no device (no vgw:device: URI SAN, no CN)")
        return cls(device=device, public_key=key, certificate=cert)


def load_device_certificate(path: str | os.PathLike[str]) -> DeviceCertificate:
    """Load a device certificate from a PEM file.

    Raises:
        CloudKitError: the file cannot be read or is not a usable device certificate (see
            [`DeviceCertificate.from_pem`][vgw.api.DeviceCertificate.from_pem]).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CloudKitError(f"{os.fspath(path)}: cannot read: {exc.strerror or exc}") from exc
    return DeviceCertificate.from_pem(data, name=os.fspath(path))


@dataclass(frozen=True)
class Receipt:
    """A verified receipt (README "Receipts").

    ``typ`` is ``consent-applied``, ``consent-rejected`` or ``erasure``; ``device`` is its ``sub``; ``iat`` when
    the device signed it (Unix seconds). ``ver`` and ``grant`` are those claims when present. ``claims`` holds
    every claim, read-only (an erasure's ``batches_deleted``, ``key_destroyed``, ``reason``, ``audit`` ...);
    ``token`` is the compact JWS itself, the key to store receipts under (a device may publish one twice).
    """

    typ: str
    device: str
    iat: int
    ver: int | None
    grant: str | None
    claims: Mapping[str, Any] = field(repr=False)
    token: str = field(repr=False)


def verify_receipt(token: str | bytes, certificate: DeviceCertificate) -> Receipt:
    """Verify a receipt received on ``<prefix>/<device>/receipt`` against the device's certificate.

    The token must be a compact JWS signed ES256 (no other algorithm is tried) by the certificate's key, with
    ``typ``, ``sub`` and ``iat`` (at most 300 s in the future), and ``sub`` must be the certificate's device.

    Raises:
        ReceiptError: any of these rules is broken; the message names it.
    """
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise ReceiptError("receipt rejected: not a compact JWS (non-ASCII bytes)") from None
    token = token.strip()
    try:
        claims = envelopes.verify_receipt(token, certificate.public_key, device=certificate.device)
    except ReceiptError as exc:
        raise ReceiptError(f"{exc} (checked against the certificate of {certificate.device})") from exc
    iat = claims["iat"]
    ver = claims.get("ver")
    grant = claims.get("grant")
    return Receipt(
        typ=claims["typ"], device=claims["sub"], iat=int(iat),
        ver=ver if isinstance(ver, int) and not isinstance(ver, bool) else None,
        grant=grant if isinstance(grant, str) else None,
        claims=MappingProxyType(dict(claims)), token=token,
    )


# ---------------------------------------------------------------- grants and consent documents


@dataclass(frozen=True)
class Recipient:
    """The HPKE public key a grant's data are sealed to: ``kem`` (``"X25519"``) and ``pk`` (base64url, no
    padding, of the raw public key)."""

    kem: str
    pk: str


@dataclass(frozen=True)
class Grant:
    """One grant of a consent document (README "Consent document"): which app (``controller``, ``purpose``) may
    receive which ``scopes``, sealed to ``recipient``, within optional ``limits`` (scope -> ``max_hz`` /
    ``precision_m``), ``retention_s`` and collection rules (``collect``, README "Collection rules")."""

    id: str
    scopes: tuple[str, ...]
    recipient: Recipient
    controller: str = "com.example.fleet"
    purpose: str = "fleet-maintenance"
    limits: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: MappingProxyType({}))
    retention_s: int | None = None
    collect: tuple[Mapping[str, Any], ...] = ()

    def claim(self) -> dict[str, Any]:
        """The grant as the JSON object a consent document carries."""
        out: dict[str, Any] = {"id": self.id, "controller": self.controller, "purpose": self.purpose,
                               "scopes": list(self.scopes),
                               "recipient": {"kem": self.recipient.kem, "pk": self.recipient.pk}}
        if self.limits:
            out["limits"] = {scope: dict(limit) for scope, limit in self.limits.items()}
        if self.retention_s is not None:
            out["retention_s"] = self.retention_s
        if self.collect:
            out["collect"] = [dict(rule) for rule in self.collect]
        return out


@dataclass(frozen=True)
class GrantsFile:
    """A checked grants description (README "The grants file"): the grants, the documents' lifetime ``ttl_s``
    (``exp = iat + ttl_s``), the issuer ``iss``, a fixed version ``ver`` if the file sets one, and the
    ``devices`` it names (may be empty)."""

    grants: tuple[Grant, ...]
    ttl_s: int = cloudkit.DEFAULT_TTL_S
    iss: str = "consent-service"
    ver: int | None = None
    devices: tuple[str, ...] = ()

    def description(self) -> dict[str, Any]:
        """The description as the signing code of ``vgw cloud sign`` takes it."""
        return {"grants": [g.claim() for g in self.grants], "ttl_s": self.ttl_s, "iss": self.iss,
                "ver": self.ver, "devices": list(self.devices)}


def _grant_of(raw: Mapping[str, Any]) -> Grant:
    limits = raw.get("limits", {})
    return Grant(
        id=raw["id"], scopes=tuple(raw["scopes"]),
        recipient=Recipient(kem=raw["recipient"]["kem"], pk=raw["recipient"]["pk"]),
        controller=raw["controller"], purpose=raw["purpose"],
        limits=MappingProxyType({s: MappingProxyType(dict(lim)) for s, lim in limits.items()}),
        retention_s=raw.get("retention_s"),
        collect=tuple(MappingProxyType(dict(rule)) for rule in raw.get("collect", ())),
    )


def check_grants(path: str | os.PathLike[str]) -> GrantsFile:
    """Read and check a grants file (TOML, or JSON when the name ends in ``.json``), as ``vgw cloud sign`` does.

    Checks every rule the device applies to a grant: known read scopes, unique ids without ``/ + # .``, a usable
    recipient key (a ``vgw cloud keygen`` ``.pub.json`` path relative to the file, or ``{kem, pk}``), limits
    only for the grant's scopes, a positive ``retention_s``, collection rules the device accepts; and no key it
    does not know.

    Raises:
        CloudKitError: the file cannot be read or breaks a rule; the message names the file, the grant and the
            field.
    """
    desc = cloudkit.load_grants(Path(path))
    return GrantsFile(grants=tuple(_grant_of(g) for g in desc["grants"]), ttl_s=int(desc["ttl_s"]),
                      iss=str(desc["iss"]), ver=desc["ver"], devices=tuple(desc["devices"]))


@dataclass(frozen=True)
class SignedConsent:
    """A signed consent document: ``token`` (compact JWS, ``alg`` EdDSA, ``typ`` ``vgw-consent+jwt``) to publish
    retained on ``<prefix>/<device>/consent`` or hand to ``vgw consent apply``, and its claims ``device``
    (``sub``), ``ver``, ``iat``, ``exp`` and the ids of its grants."""

    token: str
    device: str
    ver: int
    iat: int
    exp: int
    grant_ids: tuple[str, ...]


def sign_consent(grants: GrantsFile, key: SigningKey, device: str, *, ver: int | None = None,
                 now: int | None = None) -> SignedConsent:
    """Sign the consent document of ``device`` granting ``grants`` with the consent signing ``key``.

    ``ver`` defaults to the file's ``ver``, else the time in milliseconds (so every signing is newer than the
    last: the device accepts only a rising version). ``iat`` is ``now`` (default: the time now) and ``exp`` is
    ``iat + grants.ttl_s``. An empty ``grants.grants`` gives the document that revokes every grant.

    The signed document is checked by the device's own verifier before it is returned, so a grant built by hand
    that the device would reject never leaves here.

    Raises:
        ConsentError: the device would reject the document; ``reason`` names the rule (``unknown-scope``,
            ``control-scope``, ``duplicate-grant``, ``recipient``, ``unknown-key``, ...).
    """
    iat = int(time.time()) if now is None else now
    token = cloudkit.sign_documents(key, grants.description(), [device], ver=ver, now=iat)[device]
    # The device's verifier (README "Consent document"), at the signing time and trusting this key only.
    consent = verify_consent(token, trust_keys=[key.public_key], device=device, now=iat)
    return SignedConsent(token=token, device=consent.sub, ver=consent.ver, iat=consent.iat, exp=consent.exp,
                         grant_ids=tuple(g.id for g in consent.grants))


# ---------------------------------------------------------------- keys


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Load the consent signing key (Ed25519, PKCS#8 PEM: ``consent-signer.key`` of ``vgw cloud keygen``).

    Raises:
        CloudKitError: the file cannot be read or holds no Ed25519 private key.
    """
    return cloudkit.load_signing_key(Path(path))


def load_recipient_key(path: str | os.PathLike[str]) -> RecipientPrivateKey:
    """Load an app's recipient private key (X25519, PKCS#8 PEM: ``recipients/<name>.key`` of ``vgw cloud
    keygen``).

    Raises:
        CloudKitError: the path is not a readable file holding an X25519 private key.
    """
    p = Path(path)
    if not p.is_file():
        raise CloudKitError(f"{os.fspath(path)}: not a key file")
    keys: Iterable[HpkePrivateKey] = cloudkit.load_recipient_keys([p]).values()
    return next(iter(keys))
