"""Reading a device's identity and keys from its certificate: one reading, shared by every layer.

A device certificate names its device in a URI SAN ``vgw:device:<id>`` (README "Provisioning"), else in its
CN. The receipt key is the certificate's EC P-256 key (ES256, RFC 7518 §3.4). Pure functions over
``cryptography`` objects, plus three loaders that read one given PEM file.

Raises: ``OSError`` when a file cannot be read; ``ValueError`` when it is not what the function needs.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "DEVICE_URI_PREFIX",
    "cert_device_id",
    "device_id_from_cert",
    "device_public_key_from_cert",
    "load_cert",
    "load_private_key",
]

DEVICE_URI_PREFIX = "vgw:device:"
"""URI SAN prefix that carries the device id in a device certificate (``vgw:device:dev-0001``)."""


def cert_device_id(cert: x509.Certificate) -> str | None:
    """The device id a certificate names: the ``vgw:device:`` URI SAN if any, else the CN, else None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(DEVICE_URI_PREFIX):
                return uri[len(DEVICE_URI_PREFIX):]
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        return None
    value = cns[0].value
    return value if isinstance(value, str) else value.decode()


def load_cert(path: str | os.PathLike[str]) -> x509.Certificate:
    """The PEM X.509 certificate at ``path``. Raises ``OSError`` if unreadable, ``ValueError`` if not PEM."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: not a PEM X.509 certificate: {exc}") from exc


def device_public_key_from_cert(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    """The EC P-256 public key in the device certificate at ``path`` (verifies its ES256 receipts).

    Raises ``OSError`` if the file cannot be read, ``ValueError`` if it is not a PEM certificate or its key
    is not EC P-256 (ES256 needs exactly that curve, RFC 7518 §3.4).
    """
    key = load_cert(path).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{os.fspath(path)}: certificate key is not EC P-256 (needed for ES256)")
    return key


def device_id_from_cert(path: str | os.PathLike[str]) -> str:
    """The device id in the certificate at ``path`` (see :func:`cert_device_id`).

    Raises ``OSError`` if unreadable, ``ValueError`` if not a certificate or it names no device.
    """
    device = cert_device_id(load_cert(path))
    if device is None:
        raise ValueError(f"{os.fspath(path)}: certificate names no device (no URI SAN, no CN)")
    return device


def load_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM EC private key.

    Raises ``OSError`` if unreadable, ``ValueError`` if it is not an EC private key.
    """
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{os.fspath(path)}: not an EC private key")
    return key
