"""The consent authority of ``vgw cloud`` and the reference cloud peer: its keys and its documents (README
"Consent document"). No I/O but key files.

- :class:`SigningKey`: an Ed25519 consent signing key (make several for rotation);
- :class:`RecipientKey` / :func:`recipient_public_key`: the HPKE recipient key a grant names (X25519, or
  ``MLKEM768-X25519`` as an extension beyond the contract);
- :func:`grant`, :func:`consent_claims`, :func:`sign_consent`: a consent document as a compact JWS (``alg``
  EdDSA, ``typ`` ``vgw-consent+jwt``);
- :func:`b64url` / :func:`b64url_decode`: base64url without padding (RFC 7515 §2).

Sealing and opening envelopes with these keys is :mod:`vgw.cloud.envelopes`; the online peer is
:mod:`vgw_sim.cloud`, which re-exports every name here.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from cryptography.hazmat.primitives.hpke import MLKEM768X25519PrivateKey, MLKEM768X25519PublicKey

__all__ = [
    "CONSENT_TYP",
    "HpkePrivateKey",
    "HpkePublicKey",
    "RecipientKey",
    "SigningKey",
    "b64url",
    "b64url_decode",
    "consent_claims",
    "grant",
    "recipient_public_key",
    "sign_consent",
]

CONSENT_TYP = "vgw-consent+jwt"
_MLKEM768_PK_LEN = 1184
_X25519_LEN = 32

HpkePrivateKey = x25519.X25519PrivateKey | MLKEM768X25519PrivateKey
HpkePublicKey = x25519.X25519PublicKey | MLKEM768X25519PublicKey


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

    ``kem`` is ``"X25519"`` (README "Consent document") or ``"MLKEM768-X25519"`` (hybrid post-quantum; an extension the
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


# ---------------------------------------------------------------- consent documents


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
    """The claims of a consent document (README "Consent document"). ``iat`` defaults to now, ``exp`` to ``iat`` + 1
    day."""
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
    """Sign ``claims`` as a compact JWS: ``alg`` EdDSA, ``typ`` ``vgw-consent+jwt`` (README "Consent document").

    ``headers`` override or add header fields (``{"typ": None}`` removes ``typ``); ``algorithm`` and a
    non-Ed25519 ``key`` exist for attack tests. Raises PyJWT's errors for an unusable key/algorithm pair.
    """
    pk = key.private_key if isinstance(key, SigningKey) else key
    hdr: dict[str, Any] = {"typ": CONSENT_TYP}
    hdr.update(headers or {})
    return jwt.encode(dict(claims), pk, algorithm=algorithm, headers=hdr)
