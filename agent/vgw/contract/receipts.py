"""Receipts (README "Receipts"): compact JWS, ES256, signed with the private key of the device's TLS client cert.

The receipt types and erasure reasons are :mod:`vgw.contract.receipt_types`'; the simulated fleet signs with this
same :class:`ReceiptSigner`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from vgw.base.errors import ConfigError
from vgw.base.fsutil import MAX_KEY_BYTES, check_owner, read_small_file
from vgw.contract.receipt_types import ReceiptType

RECEIPT_TYP = "vgw-receipt+jwt"


class ReceiptSigner:
    """Signs receipts for one device."""

    def __init__(self, device: str, key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("receipts need a P-256 key")
        self.device = device
        self._key = key

    @classmethod
    def from_file(cls, device: str, path: Path) -> ReceiptSigner:
        try:
            data = read_small_file(path, what="device private key", max_bytes=MAX_KEY_BYTES, error=ConfigError)
            check_owner(path, what="device private key", allow_root=True, error=ConfigError)
            key = load_pem_private_key(data, password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot load the device private key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ConfigError(f"{path}: the device key must be an EC P-256 key (receipts are ES256)")
        return cls(device, key)

    def use_key(self, key: ec.EllipticCurvePrivateKey) -> None:
        """Sign with ``key`` from now on (the certificate was renewed with a new key, README "Enrollment")."""
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("receipts need a P-256 key")
        self._key = key  # one assignment: a receipt is signed with the old key or the new, never a mix

    def sign(self, typ: ReceiptType, **claims: Any) -> str:
        """A receipt of type ``typ`` with ``claims``, signed now (``iat``) for this device (``sub``)."""
        body = {"typ": str(typ), "sub": self.device, "iat": int(time.time()), **claims}
        return jwt.encode(body, self._key, algorithm="ES256", headers={"typ": RECEIPT_TYP})

