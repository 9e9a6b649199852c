"""A throwaway PKI for tests, the demo and the fleet simulator.

Everything here is for a private loopback broker: one self-signed CA (EC P-256), a server certificate for
``localhost`` / ``127.0.0.1``, one client certificate per device (CN, DNS SAN and URI SAN ``vgw:device:<id>``
carry the device id; the device signs receipts ES256 with this key, README "Receipts") and one for the cloud peer
(CN ``cloud``). Fault variants for the TLS fault tests are one call each: a certificate from another
CA (:meth:`TestPKI.other_ca`), an expired server certificate, a server certificate for the wrong host name.

Every file is PEM. By default certificates and keys are mode 0644 and the directory 0755: a test mosquitto
started as root drops to the ``mosquitto`` user and must still read them, so those private keys are
world-readable and for throwaway use only. ``key_mode=0o600`` writes private keys readable by their owner
only (what ``vgw sim fleet --make-pki`` and the dev stack use; their broker runs as that owner).

Raises: ``ValueError`` for a bad name or validity window; ``OSError`` when the directory cannot be written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from vgw.contract.certs import (
    DEVICE_URI_PREFIX,
    device_id_from_cert,
    device_public_key_from_cert,
    load_private_key,
)

__all__ = [
    "DEVICE_URI_PREFIX",
    "CertPaths",
    "PKIPaths",
    "TestPKI",
    "device_id_from_cert",
    "device_public_key_from_cert",
    "load_private_key",
]

_FILE_MODE = 0o644
_DIR_MODE = 0o755
# A year, as a deployment's certificates: well outside the agent's renewal window ([mqtt] renew_before_days, 30 by
# default), so an agent on a test PKI renews only when a test makes a certificate near its end on purpose.
_DEFAULT_DAYS = 365
# Backdate notBefore a little so a freshly made certificate is valid even with a second of clock skew.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertPaths:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PKIPaths:
    """The files of one :class:`TestPKI`: trust anchor, server, cloud peer and devices by id."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server: CertPaths
    cloud: CertPaths
    devices: dict[str, CertPaths] = field(default_factory=dict)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int = _FILE_MODE) -> Path:
    """Write ``data`` to ``path`` (atomic replace) with ``mode`` (set before any byte is written)."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _check_name(name: str) -> None:
    # Names become file names; refuse anything that could escape the directory.
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        raise ValueError(f"invalid certificate name {name!r}: must be a plain file-name stem")


class TestPKI:
    """A CA in a directory that issues server and client certificates on demand.

    ``TestPKI(dirpath)`` creates the directory (0755), a CA, a server certificate (``localhost`` and
    ``127.0.0.1``), a cloud client certificate (CN ``cloud``) and one client certificate per id in
    ``devices``; private keys get ``key_mode``. With the default 0644, every parent of ``dirpath`` must be
    traversable by others (``tempfile.mkdtemp`` and pytest's ``tmp_path`` are 0700: chmod them 0755) or a
    root-started mosquitto cannot read.
    Attributes ``ca``, ``server``, ``cloud`` and ``devices`` hold :class:`CertPaths`; :attr:`paths`
    returns them as one :class:`PKIPaths`.

    Raises ``ValueError`` for an invalid device id, ``OSError`` if the directory cannot be written.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        *,
        devices: Iterable[str] = (),
        ca_name: str = "vgw test CA",
        cloud_name: str = "cloud",
        days: int = _DEFAULT_DAYS,
        key_mode: int = _FILE_MODE,
    ) -> None:
        self.dir = Path(dirpath)
        self.key_mode = key_mode
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, _DIR_MODE)
        self.days = days
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key())
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = CertPaths(
            cert=_write(self.dir / "ca.crt", self._ca_cert.public_bytes(serialization.Encoding.PEM)),
            key=_write(self.dir / "ca.key", _key_pem(self._ca_key), key_mode),
        )
        self.server = self.server_cert()
        self.cloud = self.client_cert(cloud_name)
        self.devices: dict[str, CertPaths] = {}
        for device_id in devices:
            self.device(device_id)

    # ------------------------------------------------------------------ views

    @property
    def paths(self) -> PKIPaths:
        """All files issued so far (a snapshot; devices added later are not in it)."""
        return PKIPaths(
            dir=self.dir,
            ca_cert=self.ca.cert,
            ca_key=self.ca.key,
            server=self.server,
            cloud=self.cloud,
            devices=dict(self.devices),
        )

    # ---------------------------------------------------------------- issuing

    def _issue(
        self,
        name: str,
        common_name: str,
        *,
        dns: Iterable[str] = (),
        ips: Iterable[str] = (),
        uris: Iterable[str] = (),
        usage: x509.ObjectIdentifier,
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
    ) -> CertPaths:
        _check_name(name)
        now = _now()
        nb = not_before if not_before is not None else now - _BACKDATE
        na = not_after if not_after is not None else now + dt.timedelta(days=self.days)
        if na <= nb:
            raise ValueError(f"certificate {name!r}: not_after {na} must be after not_before {nb}")
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        return CertPaths(
            cert=_write(self.dir / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            key=_write(self.dir / f"{name}.key", _key_pem(key), self.key_mode),
        )

    def server_cert(
        self,
        name: str = "server",
        *,
        hostnames: Iterable[str] = ("localhost",),
        ips: Iterable[str] = ("127.0.0.1",),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> CertPaths:
        """Issue a TLS server certificate (EKU serverAuth) with the given DNS and IP SANs.

        Raises ``ValueError`` for an invalid name, IP address or validity window.
        """
        hostnames = list(hostnames)
        return self._issue(
            name,
            hostnames[0] if hostnames else name,
            dns=hostnames,
            ips=ips,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            not_before=not_before,
            not_after=not_after,
        )

    def client_cert(
        self,
        identity: str,
        *,
        name: str | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> CertPaths:
        """Issue a TLS client certificate (EKU clientAuth) whose CN and DNS SAN are ``identity``.

        mosquitto's ``use_identity_as_username`` takes the CN, so ``identity`` is the MQTT user name.
        Raises ``ValueError`` for an invalid name or validity window.
        """
        return self._issue(
            name or identity,
            identity,
            dns=[identity],
            uris=[DEVICE_URI_PREFIX + identity],
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            not_before=not_before,
            not_after=not_after,
        )

    def device(self, device_id: str) -> CertPaths:
        """The client certificate of ``device_id``, issued on first use (file stem = device id).

        Raises ``ValueError`` if the id cannot be a file name.
        """
        if device_id not in self.devices:
            self.devices[device_id] = self.client_cert(device_id)
        return self.devices[device_id]

    # ---------------------------------------------------------- fault variants

    def other_ca(self, name: str = "rogue", *, devices: Iterable[str] = ()) -> TestPKI:
        """A second, unrelated CA in the sub-directory ``name`` (same layout; its certs are not trusted here).

        Use it for "client cert from another CA" and "server cert signed by the wrong CA" faults.
        """
        _check_name(name)
        return TestPKI(self.dir / name, devices=devices, ca_name=f"vgw {name} CA", days=self.days,
                       key_mode=self.key_mode)

    def expired_server_cert(self, name: str = "server-expired") -> CertPaths:
        """A server certificate for localhost/127.0.0.1 that expired a day ago."""
        now = _now()
        return self.server_cert(
            name, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        )

    def wrong_host_server_cert(
        self, name: str = "server-wronghost", hostname: str = "not-this-host.invalid"
    ) -> CertPaths:
        """A valid server certificate for ``hostname`` only: neither ``localhost`` nor ``127.0.0.1`` match."""
        return self.server_cert(name, hostnames=[hostname], ips=())

    def expired_client_cert(self, identity: str, name: str | None = None) -> CertPaths:
        """A client certificate for ``identity`` that expired a day ago."""
        now = _now()
        return self.client_cert(
            identity,
            name=name or f"{identity}-expired",
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        )
