"""Device provisioning (`vgw provision`): identity key, CSR, storage key, state dir and a complete config.

Two steps, because the cloud CA signs in between:

1. :func:`provision` generates the device's EC P-256 key *on the device* (0600; it never leaves it), writes a
   CSR whose CN and SAN (DNS name and URI ``vgw:device:<id>``) carry the device id, creates the storage key
   (32 random bytes, 0600) and the state dir (0700), copies the broker CA, the consent trust key and, for a
   CAN source, the installer's DBC and signal map next to the config, and writes ``vgw.toml`` with the
   sources chosen (:class:`Sources`: CAN, OBD-II or both). The demo car's DBC is used only when asked for
   (``--demo-dbc``), and then with a loud warning: it decodes nothing meaningful on a real vehicle.
2. :func:`install_cert` checks that the signed certificate holds the device key's public half, names this
   device and chains to the CA, then writes ``device.crt``.

Re-running is safe: existing keys are never replaced without ``force`` (a new device key would orphan the
signed certificate; a new storage key would make the encrypted outbox unreadable), a changed config is
written with the previous one kept as ``vgw.toml.bak``, and the demo DBC never replaces a DBC already there.
Private key material is never printed or logged.

Raises :class:`~vgw.base.errors.ConfigError` for bad input (names the file or option) and
:class:`~vgw.base.errors.StorageError` when a file cannot be written.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import re
import shutil
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vgw.base.errors import ConfigError, StorageError
from vgw.base.fsutil import (
    MAX_CONFIG_BYTES,
    MAX_KEY_BYTES,
    Account,
    acting_for,
    atomic_write,
    ensure_private_dir,
    owner_of,
    read_small_file,
)
from vgw.config.settings import DEVICE_ID_PATTERN, load_config
from vgw.contract.certs import DEVICE_URI_PREFIX, cert_device_id
from vgw.contract.enrollment import chains_to
from vgw.dbc import shipped_dir
from vgw.pipeline.catalogue import load_catalogue
from vgw.state.consent.manager import load_trust_keys
from vgw.state.keys import KEY_BYTES

DEFAULT_OUT = Path("/etc/vgw")
DEFAULT_STATE_DIR = Path("/var/lib/vgw")
SERVICE_USER = "vgw"

CONFIG_NAME = "vgw.toml"
KEY_NAME = "device.key"
CSR_NAME = "device.csr"
CERT_NAME = "device.crt"
CLAIM_DIR = "claim"  # the zero-touch claim (claim.crt, claim.key, token) until enrolled; systemd/vgw-enroll.service
CA_NAME = "ca.pem"
TRUST_KEY_NAME = "consent-signer.pub.pem"
DBC_NAME = "vehicle.dbc"
SIGNAL_MAP_NAME = "signals.toml"
STORAGE_KEY_NAME = "storage.key"
DEFAULT_CAN_CHANNEL = "can0"
DEFAULT_OBD_PORT = "/dev/vgw-obd"  # the udev symlink of 60-vgw-obd.rules (docs/obd.md)
DEMO_WARNING = ("the demo car's DBC and signal map are in use: they decode nothing meaningful on a real "
                "vehicle; pass your vehicle's --dbc FILE and --signal-map FILE")

_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


@dataclass
class Report:
    """What a provisioning step did, one line per file, for the summary the CLI prints."""

    lines: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, what: str, path: Path, note: str) -> None:
        self.lines.append(f"{what:<12} {path} ({note})")


# -- inputs ---------------------------------------------------------------------------------------------


def parse_broker(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``HOST`` (port 8883) -> (host, port). Raises ConfigError."""
    text = value.strip()
    host, port_text = text, "8883"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"--broker {value!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"--broker {value!r}: expected [ADDRESS]:PORT")
            port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"--broker {value!r}: {host!r} is not an IPv6 address") from None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ConfigError(f"--broker {value!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not host or (not text.startswith("[") and not _HOST.match(host)):
        raise ConfigError(f"--broker {value!r}: invalid host name {host!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"--broker {value!r}: port must be a number 1-65535")
    return host, int(port_text)


def check_device_id(device_id: str) -> str:
    """The same rule as ``[device] id`` in the config. Raises ConfigError."""
    if not DEVICE_ID_PATTERN.match(device_id):
        raise ConfigError(
            f"--device-id {device_id!r}: use 1-64 letters, digits, '.', '_' or '-' (it is an MQTT client id and "
            "topic segment)"
        )
    return device_id


def load_ca_bundle(path: Path, what: str = "--ca") -> list[x509.Certificate]:
    """Read one or more PEM certificates. Raises ConfigError naming the file."""
    try:
        data = read_small_file(path, what=f"{what} certificate bundle", max_bytes=MAX_KEY_BYTES, error=ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{what} {path}: not a PEM certificate ({exc})") from exc
    if not certs:
        raise ConfigError(f"{what} {path}: holds no certificate")
    return certs


def find_shipped_dbc(extra: Iterable[Path] = ()) -> Path:
    """The folder holding the shipped ``vehicle.dbc`` and ``signals.toml``. Raises ConfigError.

    Looked for in ``extra``, ``$VGW_DATA_DIR``, the package data installed with vgw (``vgw.dbc``), and next
    to the venv the way `vgw install` lays it out (``/opt/vgw/share/dbc``).
    """
    candidates = list(extra)
    if os.environ.get("VGW_DATA_DIR"):
        candidates.append(Path(os.environ["VGW_DATA_DIR"]))
    candidates.append(shipped_dir())
    candidates.append(Path(sys.prefix).parent / "share" / "dbc")
    candidates.append(Path("/opt/vgw/share/dbc"))
    for folder in candidates:
        if (folder / DBC_NAME).is_file() and (folder / SIGNAL_MAP_NAME).is_file():
            return folder
    raise ConfigError(f"cannot find the shipped {DBC_NAME} and {SIGNAL_MAP_NAME} (looked in "
                      f"{', '.join(str(c) for c in candidates)}); pass --dbc-dir")


@dataclass(frozen=True)
class Sources:
    """Where the device reads the vehicle (README "Configuration (TOML)": ``[can]``, ``[obd]`` or both).

    ``dbc``/``signal_map`` are the installer's files for a CAN source; ``demo`` means the shipped demo car's
    (found by :func:`find_shipped_dbc`; only on explicit request).
    """

    can: bool
    obd: bool
    dbc: tuple[Path, ...] = ()
    signal_map: Path | None = None
    demo: bool = False
    can_channel: str = DEFAULT_CAN_CHANNEL
    obd_port: str = DEFAULT_OBD_PORT

    def __post_init__(self) -> None:
        if not (self.can or self.obd):
            raise ValueError("Sources: choose CAN, OBD-II or both")
        if self.can and not self.demo and (not self.dbc or self.signal_map is None):
            raise ValueError("Sources: a CAN source needs a DBC and a signal map, or demo=True")

    @property
    def kind(self) -> str:
        return "both" if self.can and self.obd else "can" if self.can else "obd"


def resolve_catalogue(sources: Sources, dbc_dir: Path | None = None) -> tuple[list[Path], Path | None]:
    """The DBC files and signal map to copy, checked to load together. Raises ConfigError naming the file."""
    if not sources.can:
        return [], None
    if sources.demo:
        folder = find_shipped_dbc([dbc_dir] if dbc_dir else [])
        dbcs, smap = [folder / DBC_NAME], folder / SIGNAL_MAP_NAME
    else:
        assert sources.signal_map is not None
        dbcs, smap = list(sources.dbc), sources.signal_map
        for path, flag in [*((d, "--dbc") for d in dbcs), (smap, "--signal-map")]:
            if not path.is_file():
                raise ConfigError(f"{flag} {path}: file not found")
        names = [d.name for d in dbcs]
        if len(set(names)) != len(names) or smap.name in names:
            raise ConfigError(f"--dbc {', '.join(names)}: the files are copied next to the config, so their "
                              "names (and the signal map's) must differ")
    load_catalogue(dbcs, smap)  # every mapped signal exists in the DBC, every scope is known
    return dbcs, smap


# -- files ----------------------------------------------------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_device_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the device's P-256 key. Raises ConfigError naming the file (never its content)."""
    try:
        data = read_small_file(path, what="device key", max_bytes=MAX_KEY_BYTES, error=ConfigError)
        key = serialization.load_pem_private_key(data, password=None)
    except FileNotFoundError:
        raise ConfigError(f"{path}: device key not found (run `vgw provision` first)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a usable unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{path}: the device key must be EC P-256 (receipts are ES256)")
    return key


def build_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> x509.CertificateSigningRequest:
    """A CSR for a TLS client certificate: CN, DNS SAN and URI SAN ``vgw:device:<id>`` carry the id."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(device_id),
                                                    x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write_public(path: Path, data: bytes) -> str:
    """Write a public file (0644) unless it already holds ``data``. Returns "new", "updated" or "unchanged"."""
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = None
    except OSError as exc:
        raise StorageError(f"{path}: cannot read: {exc.strerror}") from exc
    if old == data:
        return "unchanged"
    atomic_write(path, data, mode=0o644)
    return "new" if old is None else "updated"


def _toml_str(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def render_config(device_id: str, state_dir: Path, host: str, port: int, sources: Sources | None = None,
                  dbc_names: list[str] | None = None, signal_map_name: str = SIGNAL_MAP_NAME) -> str:
    """A complete config (README "Configuration (TOML)") whose relative paths point at the files next to it.

    Only the sources chosen get a section; the other is left as a comment to fill in later.
    """
    sources = sources or Sources(can=True, obd=False, demo=True)
    dbc_list = ", ".join(_toml_str(n) for n in (dbc_names or [DBC_NAME]))
    demo_note = "# DEMO DBC: " + DEMO_WARNING + "\n" if sources.demo else ""
    can = f"""\
[can]
interface = "socketcan"           # brought up by systemd-networkd (/etc/systemd/network/80-can0.network)
channel = {_toml_str(sources.can_channel)}
bitrate = 500000                  # informational here: the bitrate is set in 80-can0.network
{demo_note}dbc = [{dbc_list}]
signal_map = {_toml_str(signal_map_name)}
"""
    obd = f"""\
[obd]
port = {_toml_str(sources.obd_port)}          # udev symlink from 60-vgw-obd.rules (docs/obd.md)
baudrate = "auto"
"""
    if not sources.can:
        can = "# A CAN bus as well (a CAN HAT on can0, your vehicle's DBC and signal map):\n" + "".join(
            "# " + line + "\n" for line in can.replace(demo_note, "").splitlines())
    if not sources.obd:
        obd = "# A USB ELM327/OBDLink adapter instead of (or as well as) the CAN bus:\n" + "".join(
            "# " + line + "\n" for line in obd.splitlines())
    return f"""\
# vgw agent configuration, written by `vgw provision` (source: {sources.kind}). Relative paths are relative to
# this file's folder. Unknown keys are an error. Reference: README "Configuration (TOML)".

[device]
id = {_toml_str(device_id)}
state_dir = {_toml_str(str(state_dir))}     # consent cache, storage key, outbox, audit log (0700)

{can}
{obd}
[mqtt]
host = {_toml_str(host)}
port = {port}
ca_file = "{CA_NAME}"
cert_file = "{CERT_NAME}"         # installed by `vgw provision --install-cert`
key_file = "{KEY_NAME}"

[consent]
trust_keys = ["{TRUST_KEY_NAME}"]
"""


def _existing_device_id(config: Path) -> str | None:
    """The device id of an existing config, read leniently (it may predate the current schema). Read the bounded
    way every config is read: a FIFO or a link to ``/dev/zero`` there raises ConfigError, never hangs."""
    try:
        raw = read_small_file(config, what="config file", max_bytes=MAX_CONFIG_BYTES, error=ConfigError)
    except FileNotFoundError:
        return None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    dev = doc.get("device")
    value = dev.get("id") if isinstance(dev, dict) else None
    return value if isinstance(value, str) else None


def resolve_account(spec: str | None, getpwnam: Callable[[str], pwd.struct_passwd] = pwd.getpwnam
                    ) -> Account | None:
    """The service user from ``--service-user``: ``NAME`` (looked up with ``getpwnam``; None if it does not
    exist yet: `vgw install` creates it), or ``UID[:GID]`` (used as given, with or without a passwd entry).
    Raises ConfigError for a malformed value."""
    if spec is None or spec == "":
        return None
    uid_text, _, gid_text = spec.partition(":")
    if uid_text.isdigit() and (gid_text == "" or gid_text.isdigit()):
        return Account(int(uid_text), int(gid_text or uid_text))
    if gid_text or not _USER.match(spec):
        raise ConfigError(f"--service-user {spec!r}: give a user name or UID[:GID]")
    try:
        pw = getpwnam(spec)
    except KeyError:
        return None
    return Account(pw.pw_uid, pw.pw_gid, spec)


def _give(path: Path, account: Account | None) -> None:
    """Hand a secret outside the state dir (the device key) to the service user when running as root."""
    if account is None or os.geteuid() != 0:
        return
    try:
        os.chown(path, account.uid, account.gid, follow_symlinks=False)
    except OSError as exc:
        raise StorageError(f"{path}: cannot give it to {account}: {exc.strerror}") from exc


def default_state_dir(out: Path) -> Path:
    """``/var/lib/vgw`` for the default ``/etc/vgw``; ``<out>/state`` for any other folder."""
    return DEFAULT_STATE_DIR if out.resolve() == DEFAULT_OUT else out / "state"


# -- step 1: provision ----------------------------------------------------------------------------------


def provision(
    *,
    device_id: str,
    broker: str,
    ca: Path,
    consent_key: Path,
    sources: Sources,
    out: Path = DEFAULT_OUT,
    state_dir: Path | None = None,
    dbc_dir: Path | None = None,
    force: bool = False,
    service_user: Account | None = None,
) -> Report:
    """Create the device identity, keys, state dir and config in ``out``. Raises ConfigError/StorageError.

    Every input is checked before anything is written, so a rejected input leaves ``out`` as it was.
    ``dbc_dir`` is where to look for the demo DBC (``sources.demo``).

    Run as root, the state dir, the files in it and the device key go to the account the agent runs as: the
    owner of an existing state dir (a re-run leaves ownership as it was), else ``service_user``
    (:func:`resolve_account`); as anyone else they stay the running user's.
    """
    check_device_id(device_id)
    host, port = parse_broker(broker)
    ca_certs = load_ca_bundle(ca)
    load_trust_keys([consent_key])  # Ed25519 PEM or a ConfigError naming the file
    dbc_files, signal_map = resolve_catalogue(sources, dbc_dir)
    out = out.expanduser().absolute()
    state_dir = (state_dir or default_state_dir(out)).expanduser().absolute()

    config_path = out / CONFIG_NAME
    key_path = out / KEY_NAME
    storage_key_path = state_dir / STORAGE_KEY_NAME
    # Another identity already lives here: refuse, or the signed certificate and the key would disagree.
    previous = _existing_device_id(config_path)
    if previous is not None and previous != device_id and not force:
        raise ConfigError(f"{config_path}: already provisioned as device {previous!r}; use --force to "
                          f"re-provision as {device_id!r} (a new key and certificate)")
    if key_path.exists() and not force:
        load_device_key(key_path)  # a corrupt key must not be silently kept
    if storage_key_path.exists() and not force:
        size = storage_key_path.stat().st_size
        if size != KEY_BYTES:
            raise ConfigError(f"{storage_key_path}: storage key is {size} bytes, expected {KEY_BYTES}; "
                              "use --force to replace it")

    account = owner_of(state_dir) or service_user
    with acting_for(account, state_dir):
        return _provision(device_id=device_id, host=host, port=port, ca_certs=ca_certs, consent_key=consent_key,
                          sources=sources, dbc_files=dbc_files, signal_map=signal_map, out=out,
                          state_dir=state_dir, force=force, account=account)


def _provision(*, device_id: str, host: str, port: int, ca_certs: list[x509.Certificate], consent_key: Path,
               sources: Sources, dbc_files: list[Path], signal_map: Path | None, out: Path, state_dir: Path,
               force: bool, account: Account | None) -> Report:
    """:func:`provision` once every input is checked (as the state dir's owner, see :func:`acting_for`)."""
    config_path = out / CONFIG_NAME
    key_path = out / KEY_NAME
    cert_path = out / CERT_NAME
    storage_key_path = state_dir / STORAGE_KEY_NAME
    report = Report()
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise StorageError(f"{out}: cannot create config folder: {exc.strerror}") from exc

    # The device key: generated here, written 0600 from the first byte (mkstemp), never printed.
    if key_path.exists() and not force:
        key = load_device_key(key_path)
        report.add("device key", key_path, "kept; --force replaces it")
    else:
        replaced = key_path.exists()
        key = ec.generate_private_key(ec.SECP256R1())
        atomic_write(key_path, _key_pem(key), mode=0o600)
        report.add("device key", key_path, "replaced, 0600" if replaced else "new, 0600, never leaves this device")
        if cert_path.exists():
            # The old certificate carries the old public key: keep it aside, out of the agent's way.
            os.replace(cert_path, cert_path.with_name(CERT_NAME + ".old"))
            report.add("certificate", cert_path.with_name(CERT_NAME + ".old"), "no longer matches the key")
    if key_path.stat().st_mode & 0o077:
        os.chmod(key_path, 0o600)
    _give(key_path, account)

    csr_path = out / CSR_NAME
    csr = build_csr(key, device_id).public_bytes(serialization.Encoding.PEM)
    # ECDSA signatures are randomised: rewrite the CSR only when the key or the id changed.
    try:
        old_csr = x509.load_pem_x509_csr(csr_path.read_bytes())
        same = (old_csr.public_key() == key.public_key()
                and old_csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id)
    except (OSError, ValueError, IndexError):
        same = False
    if not same:
        atomic_write(csr_path, csr, mode=0o644)
    report.add("CSR", csr_path, "unchanged" if same else "new; send it to the cloud CA")

    ca_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ca_certs)
    report.add("broker CA", out / CA_NAME, _write_public(out / CA_NAME, ca_pem))
    report.add("consent key", out / TRUST_KEY_NAME, _write_public(out / TRUST_KEY_NAME, consent_key.read_bytes()))
    for src in [*dbc_files, *([signal_map] if signal_map else [])]:
        dest = out / src.name
        if sources.demo and dest.exists():
            report.add(src.name, dest, "kept: already there (the demo file never replaces one)")
        elif dest.exists() and dest.resolve() == src.resolve():
            report.add(src.name, dest, "in place")
        else:
            report.add(src.name, dest, f"{_write_public(dest, src.read_bytes())}, from {src}")
    if sources.demo:
        report.warnings.append(DEMO_WARNING)

    # The state dir and the storage key (wraps the outbox's per-grant data keys).
    ensure_private_dir(state_dir)
    if storage_key_path.exists() and not force:
        report.add("storage key", storage_key_path, "kept")
    else:
        atomic_write(storage_key_path, os.urandom(KEY_BYTES), mode=0o600)
        report.add("storage key", storage_key_path, "new, 0600")
    for path in (state_dir, storage_key_path):  # made by root before the service user existed
        if path.stat().st_uid == 0:
            _give(path, account)

    text = render_config(device_id, state_dir, host, port, sources, [d.name for d in dbc_files],
                         signal_map.name if signal_map else SIGNAL_MAP_NAME).encode()
    old_text = config_path.read_bytes() if config_path.exists() else None
    if old_text is None:
        atomic_write(config_path, text, mode=0o644)
        report.add("config", config_path, "new")
    elif old_text != text:
        shutil.copy2(config_path, config_path.with_name(CONFIG_NAME + ".bak"))
        atomic_write(config_path, text, mode=0o644)
        report.add("config", config_path, f"updated; previous kept as {CONFIG_NAME}.bak")
    else:
        report.add("config", config_path, "unchanged")

    out_arg = "" if out == DEFAULT_OUT else f" --out {out}"
    if cert_path.exists():
        report.next_steps.append(f"Check the device: vgw doctor --config {config_path}")
    else:
        report.next_steps += [
            f"Send {csr_path} to your cloud CA to sign (it holds no secret; the key stays on this device).",
            f"Install the signed certificate: vgw provision --install-cert device.crt{out_arg}",
            f"Check the device: vgw doctor --config {config_path}",
        ]
    report.next_steps.append("Start the agent: sudo systemctl start vgw-agent; follow it: journalctl -u vgw-agent -f")
    return report


# -- step 2: install the signed certificate --------------------------------------------------------------


def install_cert(cert_file: Path, *, out: Path = DEFAULT_OUT, ca: Path | None = None) -> Report:
    """Check the signed certificate against the device key, the device id and the CA; write ``device.crt``.

    ``cert_file`` may hold the leaf followed by intermediates. ``ca`` defaults to ``<out>/ca.pem``.
    Raises ConfigError naming the file and the failed check; nothing is written then.
    """
    out = out.expanduser().absolute()
    config_path = out / CONFIG_NAME
    certs = load_ca_bundle(cert_file, "--install-cert")
    leaf, intermediates = certs[0], certs[1:]
    key = load_device_key(out / KEY_NAME)
    if leaf.public_key() != key.public_key():
        raise ConfigError(f"{cert_file}: the certificate does not match the device key {out / KEY_NAME} "
                          "(was it issued for this device's CSR?)")
    device_id = _existing_device_id(config_path)
    cert_id = cert_device_id(leaf)
    if device_id is not None and cert_id != device_id:
        raise ConfigError(f"{cert_file}: the certificate names device {cert_id!r}, this device is {device_id!r}")
    anchors = load_ca_bundle(ca or out / CA_NAME, "--ca")
    now = dt.datetime.now(dt.UTC)
    if now > leaf.not_valid_after_utc:
        raise ConfigError(f"{cert_file}: the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if now < leaf.not_valid_before_utc:
        start = f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M}"
        raise ConfigError(f"{cert_file}: the certificate is valid only from {start} UTC (is this device's "
                          "clock right?)")
    if not chains_to(leaf, intermediates, anchors, now):
        raise ConfigError(f"{cert_file}: the certificate does not chain to the CA in {ca or out / CA_NAME}")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise ConfigError(f"{cert_file}: the certificate is not for TLS client authentication (EKU)")
    except x509.ExtensionNotFound:
        pass

    dest = out / CERT_NAME
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    report = Report()
    report.add("certificate", dest, f"{_write_public(dest, chain)}; device {cert_id}, valid until "
                                    f"{leaf.not_valid_after_utc:%Y-%m-%d}")
    if config_path.exists():
        try:
            load_config(config_path)
        except ConfigError as exc:
            report.next_steps.append(f"Fix the config: {exc}")
    report.next_steps += [
        f"Check the device: vgw doctor --config {config_path}",
        "Start the agent: sudo systemctl start vgw-agent; follow it: journalctl -u vgw-agent -f",
    ]
    return report


# -- the zero-touch path: enroll right after step 1 (README "Enrollment") ------------------------------------


def enroll_provisioned(claim_cert: Path, claim_key: Path, token: str, *, out: Path = DEFAULT_OUT,
                       timeout: float = 60.0) -> Report:
    """Enroll the device just provisioned in ``out`` with the batch's claim identity and its one-time token:
    the CSR goes to `vgw cloud enroll serve` instead of a person, and the issued certificate is installed.

    Raises :class:`~vgw.base.errors.EnrollmentRefused` / :class:`~vgw.base.errors.EnrollmentTimeout`
    (vgw.ops.enroll); the key, config and state dir written by step 1 stay (a later `vgw enroll` finishes the job).
    """
    from vgw.base.errors import EnrollmentTimeout
    from vgw.ops.enroll import enroll

    out = out.expanduser().absolute()
    config_path = out / CONFIG_NAME
    claim_dir = out / CLAIM_DIR
    # Kept for vgw-enroll.service until enrolled (the bench may have no route to the broker): root only.
    try:
        ensure_private_dir(claim_dir)
        atomic_write(claim_dir / "claim.crt", read_small_file(claim_cert, what="claim certificate",
                                                             max_bytes=MAX_KEY_BYTES, error=ConfigError), mode=0o600)
        atomic_write(claim_dir / "claim.key", read_small_file(claim_key, what="claim key", max_bytes=MAX_KEY_BYTES,
                                                             error=ConfigError), mode=0o600)
        atomic_write(claim_dir / "token", token.encode() + b"\n", mode=0o600)
    except OSError as exc:
        raise StorageError(f"{claim_dir}: cannot keep the claim for enrollment at boot: {exc}") from exc
    try:
        done = enroll(config_path, claim_cert, claim_key, token, timeout)
    except EnrollmentTimeout as exc:
        raise EnrollmentTimeout(f"{exc}; {claim_dir} is kept: vgw-enroll.service enrolls at the next boot with a "
                                "route to the broker", exc.reason) from exc
    shutil.rmtree(claim_dir, ignore_errors=True)  # enrolled: the token is spent, the claim has no use here
    report = Report()
    note = "already enrolled, unchanged" if done.already else "issued by the enrollment service"
    report.add("certificate", out / CERT_NAME,
               f"{note}; device {done.device}, valid until {done.not_after:%Y-%m-%d}")
    report.next_steps += [
        f"Check the device: vgw doctor --config {config_path}",
        "Start the agent: sudo systemctl start vgw-agent; follow it: journalctl -u vgw-agent -f",
    ]
    return report
