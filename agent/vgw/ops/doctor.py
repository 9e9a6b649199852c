"""The device self-check (`vgw doctor`): one PASS/WARN/FAIL line per thing an installer can get wrong.

Checks, in order: config, catalogue (DBC + signal map), CAN interface (present, up, bitrate and bus state
where readable; a serial adapter opens as the agent's user, the state dir's owner, when run as root) or replay
trace, OBD adapter (opens as the agent's user, answers ``ATI``), keys, certificate (matches the key,
names this device, expiry: WARN within 30 days, FAIL expired), broker (TCP, TLS handshake with the device
certificate through :func:`vgw.transport.tlsctx.client_context`, as the uplink, and the broker keeps the
connection), clock (not before the floor in ``clock.json``), state dir permissions, consent in force and its expiry;
then time sync (the consent rules -- not before, expiry, the clock floor -- are only as right as the clock:
systemd-timesyncd's flag file, else the kernel's NTP state via adjtimex(2)) and the CA (a device certificate that
outlives the CA that signed it stops working when the CA expires); and, on a live bus, whether the demo car's DBC is
in use.

The doctor only reads: it creates no file, and it does not touch an adapter the running agent holds. Its
output names files, interfaces and counts, never a signal value, VIN or location.

:func:`run_checks` never raises for a broken device; each failure becomes a FAIL line.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import errno
import json
import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vgw.base.errors import ConfigError, MissingFileError, VgwError
from vgw.base.fsutil import MAX_KEY_BYTES, Account, owner_of, read_small_file
from vgw.config.settings import CanConfig, Config, ObdConfig, load_config
from vgw.sources.serialport import holders
from vgw.state.credentials import with_credentials_in_use
from vgw.transport.tlsctx import client_context

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
CERT_WARN_DAYS = 30
CONSENT_WARN_S = 24 * 3600
CLOCK_MIN = 1735689600  # 2025-01-01T00:00:00Z: a clock before this was never set (no RTC, no NTP yet)
ARPHRD_CAN = 280
CAN_MTU, CANFD_MTU = 16, 72  # linux/can.h: the MTU of a SocketCAN interface tells classic CAN from CAN FD
IFF_UP = 0x1
ELM_BAUDRATES = (38400, 9600, 115200, 230400)

# Reads the kernel's link details for a CAN interface (``ip -details -json link show``), or None.
LinkDetails = Callable[[str], dict[str, Any] | None]


@dataclass(frozen=True)
class Check:
    """One result line: ``check`` names it, ``status`` is PASS/WARN/FAIL, ``detail`` is one line of reason."""

    check: str
    status: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Probes:
    """Where the doctor looks; tests point these at fakes."""

    sys_class_net: Path = Path("/sys/class/net")
    link_details: LinkDetails | None = None
    connect_timeout_s: float = 5.0
    tls_wait_s: float = 0.5  # how long the broker may take to refuse a client certificate after the handshake
    serial_timeout_s: float = 1.0
    # systemd-timesyncd creates this once it has synchronised the clock (systemd-timesyncd.service(8)).
    timesync_flag: Path = Path("/run/systemd/timesync/synchronized")
    # The kernel's NTP state: (adjtimex return value, timex.status), or None where it cannot be read.
    adjtimex: Callable[[], tuple[int, int] | None] | None = None


def run_checks(config_path: str | Path, probes: Probes | None = None) -> list[Check]:
    """Run every check for the config at ``config_path``. Never raises for a broken device."""
    probes = probes or Probes()
    try:
        cfg = load_config(config_path)
    except VgwError as exc:
        hint = ""
        if isinstance(exc, MissingFileError) and exc.path.name == "device.crt":
            hint = " (install the signed certificate: vgw provision --install-cert FILE)"
        return [Check("config", FAIL, f"{exc}{hint}")]
    results = [Check("config", PASS, f"{cfg.path} is valid")]
    cfg = with_credentials_in_use(cfg)  # the renewed key and certificate once the agent renewed (README "Enrollment")
    steps: list[tuple[str, Callable[[], Check | list[Check] | None]]] = [
        ("catalogue", lambda: _catalogue(cfg)),
        ("can", lambda: _can(cfg.can, probes, cfg.state_dir) if cfg.can is not None else None),
        ("obd", lambda: _obd(cfg, probes) if cfg.obd is not None else None),
        ("keys", lambda: _keys(cfg)),
        ("certificate", lambda: _certificate(cfg)),
        ("renewal", lambda: _renewal(cfg)),
        ("broker", lambda: _brokers(cfg, probes)),
        ("clock", lambda: _clock(cfg)),
        ("state-dir", lambda: _state_dir(cfg)),
        ("consent", lambda: _consent(cfg)),
        ("time-sync", lambda: _time_sync(probes)),
        ("ca", lambda: _ca(cfg)),
        ("demo-dbc", lambda: _demo_dbc(cfg)),
    ]
    for name, step in steps:
        try:
            result = step()
        except Exception as exc:  # a check must never take the others down with it
            result = Check(name, FAIL, f"check failed unexpectedly: {type(exc).__name__}: {exc}")
        if isinstance(result, list):
            results.extend(result)
        elif result is not None:
            results.append(result)
    return results


def exit_code(results: list[Check]) -> int:
    """1 if any check failed, else 0."""
    return 1 if any(r.status == FAIL for r in results) else 0


# -- sources --------------------------------------------------------------------------------------------


def _catalogue(cfg: Config) -> Check | None:
    if cfg.can is None:
        return None
    from vgw.pipeline.catalogue import load_catalogue

    try:
        cat = load_catalogue(cfg.can.dbc, cfg.can.signal_map, strict=cfg.can.dbc_strict)
    except VgwError as exc:
        return Check("catalogue", FAIL, str(exc))
    scopes = sorted({s.scope for s in cat.specs})
    return Check("catalogue", PASS, f"{len(cat.specs)} signal(s) mapped from {len(cfg.can.dbc)} vehicle "
                                    f"description(s), {len(scopes)} scope(s)")


def ip_link_details(ifname: str) -> dict[str, Any] | None:
    """``ip -details -json link show dev IF`` as a dict, or None when iproute2 is absent or says nothing."""
    ip = shutil.which("ip") or ("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else None)
    if ip is None:
        return None
    try:
        proc = subprocess.run([ip, "-details", "-json", "link", "show", "dev", ifname], capture_output=True,
                              timeout=3, check=False)
        doc = json.loads(proc.stdout or b"[]")
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return doc[0] if isinstance(doc, list) and doc and isinstance(doc[0], dict) else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def check_can_interface(name: str, ifname: str, want_bitrate: int | None, probes: Probes, *,
                        want_fd: bool = False) -> Check:
    """A SocketCAN interface: present, a CAN device, up, in CAN FD mode when ``want_fd`` (MTU 72, README
    "CAN FD"); bitrate and bus state when the kernel says them."""
    base = probes.sys_class_net / ifname
    if not base.exists():
        return Check(name, FAIL, f"CAN interface {ifname} not found (CAN HAT overlay in config.txt? "
                                 f"`vgw-vcan` for a virtual one?)")
    kind = _read(base / "type")
    if kind is not None and kind != str(ARPHRD_CAN):
        return Check(name, FAIL, f"{ifname} is not a CAN interface (link type {kind})")
    flags = _read(base / "flags")
    if flags is not None and not int(flags, 16) & IFF_UP:
        return Check(name, FAIL, f"{ifname} is down (systemd-networkd brings it up with 80-can0.network; "
                                 f"or: ip link set {ifname} up type can bitrate 500000)")
    fd_check = _fd_mode(ifname, _read(base / "mtu"), want_fd)
    if fd_check is not None and fd_check[0] == FAIL:
        return Check(name, *fd_check)
    details = (probes.link_details or ip_link_details)(ifname)
    info = ((details or {}).get("linkinfo") or {})
    data = info.get("info_data") or {}
    if info.get("info_kind") == "vcan":
        return Check(name, PASS, f"{ifname} is up (virtual CAN{', FD' if want_fd else ''})")
    state = data.get("state")
    bitrate = (data.get("bittiming") or {}).get("bitrate")
    parts = [f"{ifname} is up"]
    if bitrate:
        parts.append(f"{bitrate} bit/s")
    if state:
        parts.append(f"bus {state}")
    detail = ", ".join(parts)
    if state == "BUS-OFF":
        return Check(name, FAIL, f"{detail}: the controller left the bus (wrong bitrate or wiring?)")
    if fd_check is not None:
        return Check(name, *fd_check)  # a WARN (a FAIL returned above)
    if bitrate and want_bitrate and int(bitrate) != want_bitrate:
        return Check(name, WARN, f"{detail}, but the config says {want_bitrate} bit/s")
    if state in ("ERROR-PASSIVE", "ERROR-WARNING"):
        return Check(name, WARN, f"{detail}: bus errors (bitrate, termination or wiring?)")
    if not bitrate:
        detail += " (bitrate not readable)"
    if want_fd:
        detail += ", CAN FD (MTU 72)"
    return Check(name, PASS, detail)


def _fd_mode(ifname: str, mtu: str | None, want_fd: bool) -> tuple[str, str] | None:
    """(status, detail) when the interface's FD mode disagrees with ``[can] fd``, else None."""
    if mtu is None or not mtu.isdigit():
        return None  # not readable: nothing to say
    if want_fd and int(mtu) != CANFD_MTU:
        return FAIL, (f"{ifname} is up in classic CAN mode (MTU {mtu}) but [can] fd = true: no CAN FD frame "
                      f"arrives (ip link set {ifname} down; ip link set {ifname} up type can bitrate 500000 "
                      f"dbitrate 2000000 fd on; a vcan: ip link set {ifname} mtu 72)")
    if not want_fd and int(mtu) == CANFD_MTU:
        return WARN, f"{ifname} is in CAN FD mode (MTU 72) but [can] fd = false: FD frames are not received"
    return None


def agent_account(state_dir: Path | None) -> Account | None:
    """The account the agent runs as, when the doctor runs as root: the owner of the state dir (the service user
    `vgw provision` gave it to). None when the doctor runs as that user itself, or no such owner exists yet."""
    if os.geteuid() != 0 or state_dir is None:
        return None
    return owner_of(state_dir)


def open_as(account: Account | None, path: str) -> OSError | None:
    """Open ``path`` read-write (no controlling tty, non-blocking: nothing is read or written) as ``account``
    (its groups as the passwd/group files give them, else its gid only), in a forked child, so the answer is
    the kernel's own. None if it opens; the OSError otherwise."""
    flags = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    if account is None:
        try:
            os.close(os.open(path, flags))
        except OSError as exc:
            return exc
        return None
    try:
        groups = os.getgrouplist(pwd.getpwuid(account.uid).pw_name, account.gid)
    except KeyError:
        groups = [account.gid]
    pid = os.fork()
    if pid == 0:  # the child only makes system calls, then leaves without running any Python cleanup
        code = 0
        try:
            os.setgroups(groups)
            os.setgid(account.gid)
            os.setuid(account.uid)
            os.close(os.open(path, flags))
        except OSError as exc:
            code = exc.errno or 255
        except BaseException:
            code = 255
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else OSError(code, os.strerror(code) if code != 255 else "failed", path)


def _serial_check(name: str, what: str, path: str, state_dir: Path | None) -> Check:
    """``what`` at ``path`` (which exists) opens for the agent's user; a port another process reads is left
    alone (opening it beside its reader is what the check must never do to the agent)."""
    pids = holders(path)
    if pids:
        return Check(name, PASS, f"{what} {path} present, in use by process {pids[0]} (not opened)")
    account = agent_account(state_dir)
    who = f"the agent's user (uid {account.uid}, owner of {state_dir})" if account else "this user"
    error = open_as(account, path)
    if error is None:
        return Check(name, PASS, f"{what} {path} present, opens as {who}")
    if error.errno == errno.EBUSY:
        return Check(name, PASS, f"{what} {path} present, held exclusively by another process (not opened)")
    hint = (" (udev: 60-vgw-obd.rules gives USB adapters group vgw; a pty belongs to the user who made it)"
            if error.errno in (errno.EACCES, errno.EPERM) else "")
    return Check(name, FAIL, f"{what} {path}: {who} cannot open it: {error.strerror}{hint}")


def _can(can_cfg: CanConfig, probes: Probes, state_dir: Path | None = None) -> Check:
    if can_cfg.replay is not None:
        import can

        try:
            reader = can.LogReader(str(can_cfg.replay))
            try:
                first = next(iter(reader), None)
            finally:
                stop = getattr(reader, "stop", None)
                if callable(stop):
                    stop()
        except Exception as exc:  # python-can readers raise many types on a bad file
            return Check("can", FAIL, f"{can_cfg.replay}: trace not readable: {type(exc).__name__}")
        if first is None:
            return Check("can", WARN, f"{can_cfg.replay}: trace readable but holds no frame")
        return Check("can", PASS, f"{can_cfg.replay}: trace readable")
    if can_cfg.interface == "virtual":
        return Check("can", PASS, "virtual bus (no hardware to check)")
    if can_cfg.interface == "socketcan":
        return check_can_interface("can", can_cfg.channel or "can0", can_cfg.bitrate, probes, want_fd=can_cfg.fd)
    channel = (can_cfg.channel or "").split("@")[0]
    if channel.startswith("/"):  # a serial port, or a link to one (udev's, or a dev stack's run/can0 to a pty)
        if not os.path.exists(channel):
            hint = ("plugged in?" if channel.startswith("/dev/") else
                    "a link to a simulator's pty that is not running? `vgw dev up DIR` or `vgw sim can --link` it")
            return Check("can", FAIL, f"{can_cfg.interface} adapter {channel} not present ({hint})")
        return _serial_check("can", f"{can_cfg.interface} adapter", channel, state_dir)
    return Check("can", WARN, f"interface {can_cfg.interface!r} channel {can_cfg.channel!r}: not checked")


def _agent_running(cfg: Config) -> bool:
    from vgw.state.statedir import AgentLock

    try:
        return AgentLock.held_by_other(cfg.state_dir)
    except OSError:
        return False


def ask_ati(port: str, baudrate: int, timeout_s: float) -> str | None:
    """Open ``port`` (a device path or pyserial URL such as ``socket://host:port``) and send ``ATI``.

    Returns the adapter's identification line, or None if it said nothing. Raises ``serial.SerialException``
    (an ``OSError``) when the port cannot be opened.
    """
    import serial

    with serial.serial_for_url(port, baudrate=baudrate, timeout=0.1, write_timeout=timeout_s) as ser:
        ser.write(b"\r")  # end any half-typed command; the adapter answers with a prompt we discard
        time.sleep(0.05)
        ser.reset_input_buffer()
        ser.write(b"ATI\r")
        buf = b""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and b">" not in buf:
            buf += ser.read(64)
    lines = [ln.strip() for ln in buf.replace(b">", b"").decode("ascii", "replace").replace("\n", "\r").split("\r")]
    answer = [ln for ln in lines if ln and ln.upper() != "ATI"]  # drop the echo
    if not answer:
        return None
    # Only printable ASCII, short: the adapter's name and version, nothing else goes to the output.
    return "".join(ch for ch in answer[0] if 32 <= ord(ch) < 127)[:40]


def _obd(cfg: Config, probes: Probes) -> Check:
    obd: ObdConfig = cfg.obd  # type: ignore[assignment]
    if obd.transport == "isotp":
        return check_can_interface("obd", obd.can_channel or "can0", None, probes)
    if _agent_running(cfg):
        return Check("obd", PASS, f"adapter {obd.port} in use by the running agent (not probed)")
    import serial

    account = agent_account(cfg.state_dir)
    if account is not None and obd.port.startswith("/") and os.path.exists(obd.port):
        # The ATI probe below runs as root; the agent opens the port as its own user.
        error = open_as(account, obd.port)
        if error is not None and error.errno != errno.EBUSY:
            return Check("obd", FAIL, f"adapter {obd.port}: the agent's user (uid {account.uid}, owner of "
                                      f"{cfg.state_dir}) cannot open it: {error.strerror} (udev: 60-vgw-obd.rules "
                                      "gives USB adapters group vgw)")
    bauds = (obd.baudrate,) if obd.baudrate else ELM_BAUDRATES
    for baud in bauds:
        try:
            answer = ask_ati(obd.port, baud, probes.serial_timeout_s)
        except (serial.SerialException, OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:120]
            return Check("obd", FAIL, f"cannot open adapter {obd.port}: {reason}")
        if answer:
            return Check("obd", PASS, f"adapter {obd.port} answers ATI: {answer}"
                         + (f" at {baud} baud" if not obd.port.startswith(("socket:", "rfc2217:")) else ""))
    tried = ", ".join(str(b) for b in bauds)
    return Check("obd", FAIL, f"adapter {obd.port} opened but did not answer ATI (tried {tried} baud)")


# -- identity and link ----------------------------------------------------------------------------------


def _renewal(cfg: Config) -> Check | None:
    """The running agent's certificate renewal (README "Enrollment"), from its status file (read only)."""
    import json

    from vgw.state.statedir import STATUS_FILE, AgentLock

    if not AgentLock.held_by_other(cfg.state_dir):
        return None
    try:
        live = json.loads((cfg.state_dir / STATUS_FILE).read_text(encoding="utf-8"))
        cert = live["certificate"]
        state, attempts, error = str(cert["state"]), int(cert["attempts"]), cert.get("last_error")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if state in ("refused", "failed"):
        return Check("renewal", WARN, f"certificate renewal failing ({attempts} attempt(s)): {str(error)[:200]}; the "
                                      "agent keeps the current certificate and retries with backoff")
    if state == "off":
        return Check("renewal", WARN, "automatic renewal is off ([mqtt] renew_before_days = 0)")
    return Check("renewal", PASS, f"automatic renewal {state}")


def _keys(cfg: Config) -> Check:
    key = cfg.mqtt.key_file
    mode = key.stat().st_mode
    if mode & 0o077:
        return Check("keys", FAIL, f"{key} is mode {stat.S_IMODE(mode):04o}; it must be 0600 (chmod 600)")
    sk = cfg.device.storage_key
    if not sk.exists():
        return Check("keys", WARN, f"storage key {sk} missing: the agent creates one on first run "
                                   "(`vgw provision` makes it ahead)")
    if sk.stat().st_size != 32:
        return Check("keys", FAIL, f"storage key {sk} is {sk.stat().st_size} bytes, expected 32")
    if sk.stat().st_mode & 0o077:
        return Check("keys", FAIL, f"storage key {sk} is mode {stat.S_IMODE(sk.stat().st_mode):04o}; "
                                   "it must be 0600")
    return Check("keys", PASS, "device key and storage key are private (0600)")


def _certificate(cfg: Config) -> Check:
    from vgw.contract.certs import cert_device_id

    path = cfg.mqtt.cert_file
    try:
        cert = x509.load_pem_x509_certificates(read_small_file(path, what="certificate", max_bytes=MAX_KEY_BYTES,
                                                               error=ConfigError))[0]
    except (OSError, ValueError, IndexError, ConfigError):
        return Check("certificate", FAIL, f"{path}: not a PEM certificate")
    try:
        key = serialization.load_pem_private_key(read_small_file(cfg.mqtt.key_file, what="device key",
                                                                 max_bytes=MAX_KEY_BYTES, error=ConfigError),
                                                 password=None)
    except (OSError, ValueError, TypeError, ConfigError):
        return Check("certificate", FAIL, f"{cfg.mqtt.key_file}: not a usable unencrypted PEM private key")
    if cert.public_key() != key.public_key():
        return Check("certificate", FAIL, f"{path} does not match {cfg.mqtt.key_file}")
    named = cert_device_id(cert)
    if named != cfg.device.id:
        return Check("certificate", FAIL, f"{path} names device {named!r}, the config says {cfg.device.id!r}")
    now = time.time()
    end = cert.not_valid_after_utc.timestamp()
    until = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    if now > end:
        return Check("certificate", FAIL, f"{path} expired on {until}: renew it (CSR: vgw provision)")
    if now < cert.not_valid_before_utc.timestamp():
        return Check("certificate", FAIL, f"{path} is not valid yet (from "
                                          f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC): clock wrong?")
    days = int((end - now) // 86400)
    if days < CERT_WARN_DAYS:
        return Check("certificate", WARN, f"{path} expires in {days} day(s) ({until}): renew it soon")
    return Check("certificate", PASS, f"{path} valid until {until} ({days} days)")


def _brokers(cfg: Config, probes: Probes) -> list[Check]:
    """One check per ``[mqtt]`` endpoint (README "Configuration (TOML)"): named ``broker`` for a single host,
    ``broker HOST:PORT``
    for each node of a cluster (the agent fails over between them, so each must work on its own)."""
    endpoints = cfg.mqtt.endpoints
    checks = [_broker(cfg, host, port, probes) for host, port in endpoints]
    if len(endpoints) > 1:
        checks = [Check(f"broker {host}:{port}", c.status, c.detail) for (host, port), c in zip(endpoints, checks,
                                                                                                   strict=True)]
    return checks


def _broker(cfg: Config, host: str, port: int, probes: Probes) -> Check:
    m = cfg.mqtt
    where = f"{host}:{port}"
    try:
        ctx = client_context(m.ca_file, m.cert_file, m.key_file)
    except ConfigError as exc:
        return Check("broker", FAIL, f"cannot load the TLS files: {exc}")
    try:
        raw = socket.create_connection((host, port), timeout=probes.connect_timeout_s)
    except socket.gaierror:
        return Check("broker", FAIL, f"cannot resolve {host} (DNS, network?)")
    except TimeoutError:
        return Check("broker", FAIL, f"{where}: no answer within {probes.connect_timeout_s:g} s (firewall, network?)")
    except OSError as exc:
        return Check("broker", FAIL, f"{where}: cannot connect: {exc.strerror or exc}")
    try:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            version = tls.version()
            # TLS 1.3: the server judges the client certificate after the handshake; give it a moment to
            # say no. Nothing arriving (a timeout) means it kept the connection: it accepted us.
            tls.settimeout(probes.tls_wait_s)
            try:
                data = tls.recv(1)
            except TimeoutError:
                return Check("broker", PASS, f"{where}: {version} handshake OK, device certificate accepted")
            except ssl.SSLError as exc:
                return Check("broker", FAIL, f"{where}: the broker rejected the device certificate "
                                             f"({exc.reason or exc})")
            except OSError as exc:
                return Check("broker", FAIL, f"{where}: connection dropped after the handshake "
                                             f"({exc.strerror or exc})")
            if not data:
                return Check("broker", FAIL, f"{where}: the broker closed the connection after the handshake "
                                             "(device certificate not accepted?)")
            return Check("broker", PASS, f"{where}: {version} handshake OK")
    except ssl.SSLCertVerificationError as exc:
        return Check("broker", FAIL, f"{where}: broker certificate not trusted by {m.ca_file}: "
                                     f"{exc.verify_message}")
    except ssl.SSLError as exc:
        return Check("broker", FAIL, f"{where}: TLS handshake failed: {exc.reason or exc}")
    except (TimeoutError, OSError) as exc:
        return Check("broker", FAIL, f"{where}: TLS handshake failed: {getattr(exc, 'strerror', None) or exc}")
    finally:
        raw.close()


# -- state ----------------------------------------------------------------------------------------------


def _clock(cfg: Config) -> Check:
    from vgw.state.consent.store import ConsentStore

    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    if now < CLOCK_MIN:
        return Check("clock", FAIL, f"system clock says {stamp}: not set (NTP not synchronised yet? no RTC?)")
    floor = ConsentStore(cfg.state_dir).floor if cfg.state_dir.is_dir() else 0.0
    if now + 2 < floor:
        return Check("clock", FAIL, f"system clock {stamp} is {int(floor - now)} s behind the newest time this "
                                    "device has seen (clock.json): fix NTP/RTC")
    return Check("clock", PASS, f"{stamp}, not before anything this device has seen")


TIME_ERROR = 5  # adjtimex(2) return value: the clock is not synchronised
STA_UNSYNC = 0x0040  # timex.status: clock unsynchronised


class _Timex(ctypes.Structure):
    """struct timex of <sys/timex.h> (Linux, 64-bit and 32-bit alike: longs are the C type)."""

    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
                ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("_reserved", ctypes.c_int * 11)]


def kernel_adjtimex() -> tuple[int, int] | None:
    """adjtimex(2) with modes 0 (a read: no privilege needed), or None where libc has no adjtimex."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = _Timex()
        state = int(libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError):
        return None
    return (state, int(tx.status)) if state >= 0 else None


def _demo_dbc(cfg: Config) -> Check | None:
    """WARN when a live bus (not a replay, not python-can's virtual bus) is decoded with the demo car's DBC:
    it names signals of a car that does not exist, so on a real vehicle it decodes nothing meaningful."""
    from vgw.dbc import DBC_NAME, shipped_dir
    from vgw.pipeline.catalogue import MAX_DBC_BYTES

    can_cfg = cfg.can
    if can_cfg is None or can_cfg.replay is not None or can_cfg.interface == "virtual":
        return None
    try:
        demo = (shipped_dir() / DBC_NAME).read_bytes()
        used = [p for p in can_cfg.dbc
                if read_small_file(p, what="DBC file", max_bytes=MAX_DBC_BYTES, error=ConfigError) == demo]
    except (OSError, VgwError):
        return None  # the catalogue check names an unreadable DBC
    if not used:
        return None
    return Check("demo-dbc", WARN, f"{used[0]} is the demo car's DBC: on a real vehicle it decodes nothing "
                                   "meaningful; use your vehicle's DBC and signal map (vgw provision --dbc FILE "
                                   "--signal-map FILE)")


def _time_sync(probes: Probes) -> Check:
    if probes.timesync_flag.exists():
        return Check("time-sync", PASS, "clock synchronised (systemd-timesyncd)")
    read = probes.adjtimex or kernel_adjtimex
    got = read()
    if got is not None and got[0] != TIME_ERROR and not got[1] & STA_UNSYNC:
        return Check("time-sync", PASS, "clock synchronised (kernel NTP state)")
    why = "cannot tell" if got is None else "not synchronised"
    return Check("time-sync", WARN, f"{why}: consent expiry and not-before depend on the clock; enable NTP "
                                    "(sudo timedatectl set-ntp true; timedatectl shows 'synchronized: yes')")


def _ca(cfg: Config) -> Check | None:
    """The device certificate must not outlive the CA that signed it (nor the CA be expired)."""
    try:
        # Read as the agent reads them (a regular file, capped): a FIFO must not hang the doctor.
        ours = x509.load_pem_x509_certificates(read_small_file(cfg.mqtt.cert_file, what="certificate",
                                                               max_bytes=MAX_KEY_BYTES))
        cas = x509.load_pem_x509_certificates(read_small_file(cfg.mqtt.ca_file, what="CA file",
                                                              max_bytes=MAX_KEY_BYTES))
        leaf, chain = ours[0], ours[1:] + cas
    except (OSError, VgwError, ValueError, IndexError):
        return None  # the certificate and broker checks already say what is wrong with the files
    issuer = next((c for c in chain if c.subject == leaf.issuer), None)
    if issuer is None:
        return Check("ca", WARN, f"{cfg.mqtt.ca_file} holds no certificate named {leaf.issuer.rfc4514_string()!r}, "
                                 "the device certificate's issuer")
    ca_end, leaf_end = issuer.not_valid_after_utc, leaf.not_valid_after_utc
    if ca_end.timestamp() < time.time():
        return Check("ca", FAIL, f"the CA that signed {cfg.mqtt.cert_file.name} expired on {ca_end:%Y-%m-%d}")
    if leaf_end > ca_end:
        # Dates alone read "until 2027-12-07 but its CA only until 2027-12-07" when both end the same day.
        shown = "%Y-%m-%d %H:%M:%S UTC" if leaf_end.date() == ca_end.date() else "%Y-%m-%d"
        return Check("ca", WARN, f"{cfg.mqtt.cert_file.name} is valid until {leaf_end.strftime(shown)} but its CA only "
                                 f"until {ca_end.strftime(shown)}: from then on the broker rejects it; renew the CA "
                                 "(or a certificate within its life) before that")
    return Check("ca", PASS, f"the CA is valid until {ca_end:%Y-%m-%d}, after the device certificate")


def _state_dir(cfg: Config) -> Check:
    d = cfg.state_dir
    if not d.exists():
        return Check("state-dir", WARN, f"{d} does not exist yet (the agent creates it 0700)")
    mode = stat.S_IMODE(d.stat().st_mode)
    if not d.is_dir():
        return Check("state-dir", FAIL, f"{d} is not a directory")
    if mode & 0o077:
        return Check("state-dir", FAIL, f"{d} is mode {mode:04o}; it must be 0700 (chmod 700 {d})")
    loose: list[str] = []
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root, name)
            st = p.lstat()
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                loose.append(str(p.relative_to(d)))
    if loose:
        return Check("state-dir", FAIL, f"{len(loose)} item(s) in {d} readable by others, e.g. {loose[0]} "
                                        f"(chmod -R go= {d})")
    return Check("state-dir", PASS, f"{d} is 0700, its files private")


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    if not isinstance(doc, dict):
        raise ValueError("claims")
    return doc


def _consent(cfg: Config) -> Check:
    from vgw.base.errors import ConsentError
    from vgw.contract.consent.model import version_text
    from vgw.contract.consent.verifier import verify_consent
    from vgw.state.consent.manager import load_trust_keys
    from vgw.state.consent.store import ConsentStore

    if not cfg.state_dir.is_dir():
        return Check("consent", WARN, "no consent in force: nothing is collected until the owner consents")
    store = ConsentStore(cfg.state_dir)
    token = store.read_token()
    if token is None:
        return Check("consent", WARN, "no consent in force: nothing is collected until the owner consents")
    try:
        trust = load_trust_keys(cfg.consent.trust_keys)
        iat = _claims(token)["iat"]
        # As the agent does on start: signature, subject and claims; the window is judged against the floor.
        consent = verify_consent(token, trust_keys=trust, device=cfg.device.id, now=float(iat))
    except (ConsentError, ValueError, KeyError, IndexError, TypeError) as exc:
        reason = getattr(exc, "reason", "malformed")
        return Check("consent", FAIL, f"the cached consent no longer verifies ({reason}): nothing is in force")
    now = store.now()
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(consent.exp))
    scopes = sorted({s for g in consent.grants for s in g.scopes})
    what = f"{version_text(consent.ver)}: {len(consent.grants)} grant(s)" + (f" ({', '.join(scopes)})" if scopes
                                                                             else "")
    if now >= consent.exp:
        return Check("consent", WARN, f"{what} expired on {until}: nothing is collected")
    if not consent.grants:
        return Check("consent", WARN, f"{what}: everything revoked, nothing is collected")
    if consent.exp - now < CONSENT_WARN_S:
        return Check("consent", WARN, f"{what}, expires in {int((consent.exp - now) // 3600)} h ({until})")
    return Check("consent", PASS, f"{what}, in force until {until}")


def format_text(results: list[Check]) -> str:
    """The human-readable report: one aligned line per check and a summary line."""
    width = max(len(r.check) for r in results)
    lines = [f"{r.status}  {r.check:<{width}}  {r.detail}" for r in results]
    counts = {s: sum(r.status == s for r in results) for s in (PASS, WARN, FAIL)}
    lines.append(f"{counts[PASS]} passed, {counts[WARN]} warning(s), {counts[FAIL]} failed")
    return "\n".join(lines)
