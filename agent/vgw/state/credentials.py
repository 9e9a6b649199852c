"""The device's TLS credentials on disk: its key ([mqtt] key_file) and certificate chain ([mqtt] cert_file).

Used by `vgw enroll` (first certificate) and by the agent's renewal (README "Enrollment"):

- :func:`ensure_key` makes the key if missing, 0600 from its first byte; it never leaves the device.
- :func:`install_chain` writes the issued chain (0644, atomic).
- Renewal keeps the renewed pair in the state directory, ``<state_dir>/identity/device.key|crt`` (the one folder
  the agent may write under its hardened unit; ``[mqtt] key_file``/``cert_file`` stay as installed).
  :func:`device_credentials` is the pair in use: the renewed one once there is one, else the config's. The new
  pair is staged beside it (``device.key.new``, ``device.crt.new``) and :func:`commit_staged` swaps it in only
  after it has connected; :func:`settle` finishes or undoes a swap a crash interrupted, so the files the agent
  loads always match each other.

Raises :class:`~vgw.base.errors.StorageError` (cannot write) and :class:`~vgw.base.errors.ConfigError` (an unusable
key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vgw.base.errors import ConfigError, StorageError
from vgw.base.fsutil import MAX_KEY_BYTES, atomic_write, read_small_file
from vgw.config.settings import Config
from vgw.contract.enrollment import key_pem, new_key

__all__ = ["IDENTITY_DIR", "Staged", "commit_staged", "device_credentials", "discard_staged", "ensure_key",
           "install_chain", "load_key", "renewed_pair", "settle", "stage", "with_credentials_in_use"]

STAGED_SUFFIX = ".new"
IDENTITY_DIR = "identity"  # in the state directory: the renewed key and certificate


def renewed_pair(state_dir: Path) -> tuple[Path, Path]:
    """(certificate, key) where renewal keeps the renewed pair."""
    home = state_dir / IDENTITY_DIR
    return home / "device.crt", home / "device.key"


def device_credentials(cert_file: Path, key_file: Path, state_dir: Path) -> tuple[Path, Path]:
    """(certificate, key) the device uses: the renewed pair if renewal made one and its certificate is newer
    than the installed one, else the config's. A certificate installed after the renewal (enrolled again,
    `vgw provision --install-cert`) is newer and wins without anyone clearing the renewed pair."""
    cert, key = renewed_pair(state_dir)
    if not (cert.is_file() and key.is_file()):
        return cert_file, key_file
    renewed = _validity(cert)
    installed = _validity(cert_file)
    # Newer = issued later; issued in the same second (X.509 times have no finer grain: a renewal right after
    # provisioning), the one that lasts longer. A tie in both is the same certificate: the installed one.
    if renewed is None or (installed is not None and installed >= renewed):
        return cert_file, key_file
    return cert, key


def _validity(path: Path) -> tuple[float, float] | None:
    """(notBefore, notAfter) of the certificate in ``path``, or None if it cannot be read."""
    try:
        data = read_small_file(path, what="certificate", max_bytes=MAX_KEY_BYTES, error=ConfigError)
        leaf = x509.load_pem_x509_certificates(data)[0]
        return leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    except (ConfigError, OSError, ValueError, IndexError):
        return None


def with_credentials_in_use(cfg: Config) -> Config:
    """``cfg`` with ``[mqtt] cert_file``/``key_file`` replaced by the pair in use (:func:`device_credentials`),
    for the checks that look at the device's identity (`vgw doctor`)."""
    cert, key = device_credentials(cfg.mqtt.cert_file, cfg.mqtt.key_file, cfg.state_dir)
    if (cert, key) == (cfg.mqtt.cert_file, cfg.mqtt.key_file):
        return cfg
    return dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, cert_file=cert, key_file=key))


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The EC P-256 device key at ``path``. Raises ConfigError naming the file (never its content)."""
    try:
        data = read_small_file(path, what="device key", max_bytes=MAX_KEY_BYTES, error=ConfigError)
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a usable unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{path}: the device key must be EC P-256 (receipts are ES256)")
    return key


def ensure_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """(the key at ``path``, made now?): a missing key is made here, 0600 (atomic_write creates it so)."""
    if path.exists():
        return load_key(path), False
    key = new_key()
    atomic_write(path, key_pem(key), mode=0o600)
    return key, True


def chain_pem(chain: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def install_chain(path: Path, chain: tuple[x509.Certificate, ...]) -> None:
    """Write the certificate chain (public: 0644) so a crash leaves the old file or the new one."""
    atomic_write(path, chain_pem(chain), mode=0o644)


@dataclass(frozen=True)
class Staged:
    """The paths of a staged pair beside ``key_file`` and ``cert_file``."""

    key: Path
    cert: Path

    @classmethod
    def beside(cls, key_file: Path, cert_file: Path) -> Staged:
        return cls(key=key_file.with_name(key_file.name + STAGED_SUFFIX),
                   cert=cert_file.with_name(cert_file.name + STAGED_SUFFIX))

    def present(self) -> bool:
        return self.key.exists() and self.cert.exists()


def stage(staged: Staged, key: ec.EllipticCurvePrivateKey, chain: tuple[x509.Certificate, ...]) -> None:
    """Write the new pair beside the old one; the old one stays in use. Raises StorageError."""
    atomic_write(staged.key, key_pem(key), mode=0o600)
    atomic_write(staged.cert, chain_pem(chain), mode=0o644)


def commit_staged(staged: Staged, key_file: Path, cert_file: Path) -> None:
    """Swap the staged pair in: the key first, then the certificate. A crash between the two renames leaves
    the new key beside the new certificate's staged file, which :func:`settle` completes."""
    try:
        os.replace(staged.key, key_file)
        os.replace(staged.cert, cert_file)
        _fsync_dir(key_file.parent)
        if cert_file.parent != key_file.parent:
            _fsync_dir(cert_file.parent)
    except OSError as exc:
        raise StorageError(f"{key_file}: cannot install the renewed key and certificate: {exc.strerror}") from exc


def discard_staged(staged: Staged) -> None:
    for path in (staged.key, staged.cert):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def settle(key_file: Path, cert_file: Path) -> str | None:
    """Finish a swap a crash interrupted; returns what was done (for the audit log), or None.

    - the key was swapped, the certificate was not: the staged certificate matches the key in use -> swap it;
    - anything else staged is an unfinished renewal: it is dropped (the old pair still matches; renewal
      starts over).
    """
    staged = Staged.beside(key_file, cert_file)
    if not staged.key.exists() and staged.cert.exists():
        try:
            key = load_key(key_file)
            leaf = x509.load_pem_x509_certificates(staged.cert.read_bytes())[0]
        except (ConfigError, OSError, ValueError):
            discard_staged(staged)
            return "dropped an unreadable staged certificate"
        if leaf.public_key() == key.public_key():
            try:
                os.replace(staged.cert, cert_file)
            except OSError as exc:
                raise StorageError(f"{cert_file}: cannot finish the interrupted swap: {exc.strerror}") from exc
            return "finished an interrupted certificate swap"
    if staged.key.exists() or staged.cert.exists():
        discard_staged(staged)
        return "dropped an unfinished renewal"
    return None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
