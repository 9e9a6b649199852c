"""`vgw doctor`: every check against real parts where they run here (a private mosquitto with mutual TLS,
a TCP "serial" ELM327, a state dir), and a fake /sys/class/net for the CAN interface."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from vgw.cli import main
from vgw.ops.doctor import FAIL, PASS, WARN, Check, Probes, check_can_interface, exit_code, run_checks
from vgw_sim.broker import Mosquitto, free_port
from vgw_sim.cloud import RecipientKey, SigningKey, consent_claims, grant, sign_consent
from vgw_sim.pki import CertPaths, TestPKI

ROOT = Path(__file__).resolve().parents[1]
# timesync_flag: any existing file stands in for systemd-timesyncd's flag (this host's clock may be unsynced).
FAST = Probes(connect_timeout_s=3.0, tls_wait_s=0.5, serial_timeout_s=0.5, timesync_flag=Path(__file__))


@pytest.fixture(scope="module")
def pki() -> Iterator[TestPKI]:
    """This module's PKI: a CA for 400 days, so that the year-long device certificate lies within its life."""
    root = Path(tempfile.mkdtemp(prefix="vgw-pki-doctor-"))
    os.chmod(root, 0o755)  # noqa: S103 - mosquitto, dropped to its own user, reads the server files
    try:
        yield TestPKI(root / "pki", devices=("dev-0001", "dev-0002"), days=400)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Device:
    """A provisioned device folder: config, private key copy (0600), CA, trust key, state dir."""

    def __init__(self, tmp: Path, pki: TestPKI, port: int) -> None:
        self.dir = tmp / "etc"
        self.dir.mkdir()
        self.state = tmp / "state"
        self.state.mkdir(mode=0o700)
        (self.state / "storage.key").write_bytes(os.urandom(32))
        os.chmod(self.state / "storage.key", 0o600)
        self.signer = SigningKey.generate()
        self.signer.write_public_pem(self.dir / "trust.pem")
        self.pki = pki
        self.port = port
        # TestPKI certificates live 30 days, inside the doctor's 30-day warning: issue a year-long one.
        year = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
        self.use_cert(pki.client_cert("dev-0001", name="dev-0001-year", not_after=year))
        self.sections: dict[str, dict[str, Any]] = {
            "can": {"interface": "virtual", "channel": "doctor", "dbc": [str(ROOT / "dbc" / "vehicle.dbc")],
                    "signal_map": str(ROOT / "dbc" / "signals.toml")},
        }
        self.ca = pki.ca.cert
        self.write()

    def use_cert(self, paths: CertPaths) -> None:
        shutil.copy(paths.cert, self.dir / "device.crt")
        shutil.copy(paths.key, self.dir / "device.key")
        os.chmod(self.dir / "device.key", 0o600)  # TestPKI writes keys 0644; a device never would

    def write(self) -> Path:
        lines = ["[device]", 'id = "dev-0001"', f'state_dir = "{self.state}"', "",
                 "[mqtt]", 'host = "localhost"', f"port = {self.port}", f'ca_file = "{self.ca}"',
                 'cert_file = "device.crt"', 'key_file = "device.key"', "",
                 "[consent]", 'trust_keys = ["trust.pem"]']
        for name, table in self.sections.items():
            lines += ["", f"[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
        self.config = self.dir / "vgw.toml"
        self.config.write_text("\n".join(lines) + "\n")
        return self.config

    def apply_consent(self, *, exp_in: int = 7 * 86400) -> None:
        now = int(time.time())
        token = sign_consent(consent_claims("dev-0001", 1, [grant("g-doctor", ["read_speedometer"],
                                                                  RecipientKey.generate())], iat=now,
                                            exp=now + exp_in), self.signer)
        doc = self.dir / "consent.jws"
        doc.write_text(token)
        assert main(["consent", "apply", "--config", str(self.config), str(doc)]) == 0


def by_name(results: list[Check]) -> dict[str, Check]:
    return {r.check: r for r in results}


@pytest.fixture
def device(tmp_path: Path, pki: TestPKI, broker: Mosquitto) -> Device:
    return Device(tmp_path, pki, broker.port)


def test_everything_passes(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    device.apply_consent()
    capsys.readouterr()
    results = run_checks(device.config, FAST)
    assert [r.check for r in results] == ["config", "catalogue", "can", "keys", "certificate", "broker", "clock",
                                          "state-dir", "consent", "time-sync", "ca"]
    assert all(r.status == PASS for r in results), results
    checks = by_name(results)
    assert "device certificate accepted" in checks["broker"].detail
    assert "consent v1: 1 grant(s) (read_speedometer)" in checks["consent"].detail
    assert exit_code(results) == 0

    assert main(["doctor", "--config", str(device.config), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [set(item) for item in printed] == [{"check", "status", "detail"}] * len(results)
    assert main(["doctor", "--config", str(device.config)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("PASS  config")
    assert text.count("PASS  ") + text.count("WARN  time-sync") == 11
    assert "0 failed" in text  # the CLI reads this host's real clock state: time-sync may WARN here
    # No key material, no grant recipient, no consent token in the output.
    assert "PRIVATE" not in text and "g-doctor" not in text and (device.dir / "consent.jws").read_text() not in text


def test_wrong_ca_fails_the_broker_check(device: Device, pki: TestPKI, capsys: pytest.CaptureFixture[str]) -> None:
    device.ca = pki.other_ca("rogue-doctor").ca.cert
    device.write()
    checks = by_name(run_checks(device.config, FAST))
    assert checks["broker"].status == FAIL and "not trusted" in checks["broker"].detail
    assert main(["doctor", "--config", str(device.config)]) == 1
    assert "FAIL  broker" in capsys.readouterr().out


def test_broker_rejecting_the_device_certificate(device: Device, pki: TestPKI) -> None:
    device.use_cert(pki.other_ca("rogue-client", devices=["dev-0001"]).device("dev-0001"))
    checks = by_name(run_checks(device.config, FAST))
    assert checks["broker"].status == FAIL and "dev-0001" not in checks["broker"].detail
    assert checks["certificate"].status != FAIL  # the certificate itself is fine; the broker does not trust it


def test_broker_unreachable(device: Device) -> None:
    device.port = free_port()
    device.write()
    checks = by_name(run_checks(device.config, FAST))
    assert checks["broker"].status == FAIL and "cannot connect" in checks["broker"].detail


def test_certificate_near_expiry_warns(device: Device, pki: TestPKI) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=10)
    device.use_cert(pki.client_cert("dev-0001", name="dev-0001-soon", not_after=soon))
    results = run_checks(device.config, FAST)
    checks = by_name(results)
    assert checks["certificate"].status == WARN and "expires in" in checks["certificate"].detail
    assert checks["broker"].status == PASS
    assert exit_code(results) == 0  # a warning is not a failure


def test_expired_or_mismatched_certificate_fails(device: Device, pki: TestPKI) -> None:
    device.use_cert(pki.expired_client_cert("dev-0001", name="dev-0001-doc-expired"))
    checks = by_name(run_checks(device.config, FAST))
    assert checks["certificate"].status == FAIL and "expired" in checks["certificate"].detail
    shutil.copy(pki.device("dev-0002").key, device.dir / "device.key")  # key of another device
    os.chmod(device.dir / "device.key", 0o600)
    checks = by_name(run_checks(device.config, FAST))
    assert checks["certificate"].status == FAIL and "does not match" in checks["certificate"].detail


def test_bad_state_dir_permissions_fail(device: Device) -> None:
    os.chmod(device.state, 0o755)  # noqa: S103 - the fault under test
    checks = by_name(run_checks(device.config, FAST))
    assert checks["state-dir"].status == FAIL and "0755" in checks["state-dir"].detail
    os.chmod(device.state, 0o700)
    (device.state / "outbox.sqlite").write_bytes(b"")
    os.chmod(device.state / "outbox.sqlite", 0o644)
    checks = by_name(run_checks(device.config, FAST))
    assert checks["state-dir"].status == FAIL and "outbox.sqlite" in checks["state-dir"].detail


def test_readable_device_key_fails(device: Device) -> None:
    os.chmod(device.dir / "device.key", 0o644)
    results = run_checks(device.config, FAST)
    assert by_name(results)["keys"].status == FAIL and exit_code(results) == 1


def test_clock_behind_the_floor_fails(device: Device) -> None:
    (device.state / "clock.json").write_text(json.dumps({"floor": time.time() + 3600}))
    checks = by_name(run_checks(device.config, FAST))
    assert checks["clock"].status == FAIL and "behind" in checks["clock"].detail


def test_consent_missing_or_expiring_warns(device: Device) -> None:
    checks = by_name(run_checks(device.config, FAST))
    assert checks["consent"].status == WARN and "no consent" in checks["consent"].detail
    device.apply_consent(exp_in=3600)
    checks = by_name(run_checks(device.config, FAST))
    assert checks["consent"].status == WARN and "expires in" in checks["consent"].detail


def test_invalid_config_is_one_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "vgw.toml"
    cfg.write_text("[device]\nid = 'x'\nstate_dir = 's'\ntypo = 1\n")
    results = run_checks(cfg)
    assert [(r.check, r.status) for r in results] == [("config", FAIL)]
    assert main(["doctor", "--config", str(cfg), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)[0]["status"] == "FAIL"


# -- sources --------------------------------------------------------------------------------------------


def test_replay_trace(tmp_path: Path, pki: TestPKI) -> None:
    dev = Device(tmp_path, pki, free_port())
    trace = tmp_path / "trace.log"
    trace.write_text("(1700000000.000000) vcan0 0C8#0000000000000000\n")
    dev.sections["can"] = dev.sections["can"] | {"replay": str(trace)}
    dev.write()
    assert by_name(run_checks(dev.config, FAST))["can"].status == PASS
    trace.write_text("")
    assert by_name(run_checks(dev.config, FAST))["can"].status == WARN


def fake_net(root: Path, name: str, *, up: bool = True, kind: int = 280) -> Probes:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "type").write_text(f"{kind}\n")
    (d / "flags").write_text("0x41\n" if up else "0x40\n")
    return Probes(sys_class_net=root)


def can_details(bitrate: int, state: str = "ERROR-ACTIVE") -> dict[str, Any]:
    return {"ifname": "can0", "linkinfo": {"info_kind": "can",
                                           "info_data": {"state": state, "bittiming": {"bitrate": bitrate}}}}


def test_can_interface_states(tmp_path: Path) -> None:
    net = tmp_path / "net"
    probes = fake_net(net, "can0")
    probes.link_details = lambda _ifname: can_details(500000)
    ok = check_can_interface("can", "can0", 500000, probes)
    assert ok.status == PASS and "500000 bit/s" in ok.detail and "ERROR-ACTIVE" in ok.detail

    probes.link_details = lambda _ifname: can_details(250000)
    assert check_can_interface("can", "can0", 500000, probes).status == WARN
    probes.link_details = lambda _ifname: can_details(500000, "BUS-OFF")
    assert check_can_interface("can", "can0", 500000, probes).status == FAIL
    probes.link_details = lambda _ifname: None  # no iproute2: still PASS on sysfs alone
    res = check_can_interface("can", "can0", 500000, probes)
    assert res.status == PASS and "not readable" in res.detail

    assert check_can_interface("can", "can1", None, probes).status == FAIL  # absent
    down = fake_net(net, "can2", up=False)
    down.link_details = lambda _ifname: None
    res = check_can_interface("can", "can2", None, down)
    assert res.status == FAIL and "down" in res.detail
    eth = fake_net(net, "eth0", kind=1)
    assert check_can_interface("can", "eth0", None, eth).status == FAIL


@pytest.fixture
def elm327() -> Iterator[tuple[str, dict[str, bool]]]:
    """A TCP 'serial port' (pyserial socket://) that answers like an ELM327, or stays silent."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    behaviour = {"silent": False}
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.2)
                buf = b""
                while not stop.is_set():
                    try:
                        data = conn.recv(64)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    buf += data
                    while b"\r" in buf:
                        line, buf = buf.split(b"\r", 1)
                        if behaviour["silent"]:
                            continue
                        reply = b"ELM327 v1.5\r\r>" if line.strip().upper() == b"ATI" else b"?\r\r>"
                        conn.sendall(line + b"\r" + reply)  # echo on, as after reset

    thread = threading.Thread(target=serve, name="elm327-fake", daemon=True)
    thread.start()
    try:
        yield f"socket://127.0.0.1:{server.getsockname()[1]}", behaviour
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_obd_adapter_answers_ati(tmp_path: Path, pki: TestPKI, elm327: tuple[str, dict[str, bool]]) -> None:
    url, behaviour = elm327
    dev = Device(tmp_path, pki, free_port())
    dev.sections["obd"] = {"port": url, "baudrate": 38400}
    dev.write()
    res = by_name(run_checks(dev.config, FAST))["obd"]
    assert res.status == PASS and res.detail.endswith("answers ATI: ELM327 v1.5"), res
    behaviour["silent"] = True
    res = by_name(run_checks(dev.config, FAST))["obd"]
    assert res.status == FAIL and "did not answer ATI" in res.detail
    dev.sections["obd"] = {"port": str(tmp_path / "ttyUSB9")}
    dev.write()
    res = by_name(run_checks(dev.config, FAST))["obd"]
    assert res.status == FAIL and "cannot open adapter" in res.detail


def test_time_sync(device: Device, tmp_path: Path) -> None:
    """The consent rules depend on the clock: the doctor says whether NTP has set it."""
    flag = tmp_path / "synchronized"
    flag.touch()
    assert by_name(run_checks(device.config, Probes(timesync_flag=flag)))["time-sync"].status == PASS
    absent = tmp_path / "absent"
    # No timesyncd flag: the kernel's NTP state decides (adjtimex; TIME_ERROR / STA_UNSYNC = not synchronised).
    unsynced = by_name(run_checks(device.config, Probes(timesync_flag=absent, adjtimex=lambda: (5, 0x40))))
    assert unsynced["time-sync"].status == WARN and "timedatectl set-ntp true" in unsynced["time-sync"].detail
    synced = by_name(run_checks(device.config, Probes(timesync_flag=absent, adjtimex=lambda: (0, 0x2001))))
    assert synced["time-sync"].status == PASS
    # The real system call answers (whatever this host's state): a PASS or a WARN, never a failed check.
    real = by_name(run_checks(device.config, Probes(timesync_flag=absent)))["time-sync"]
    assert real.status in (PASS, WARN) and "unexpectedly" not in real.detail


def test_certificate_outliving_its_ca_warns(device: Device, pki: TestPKI) -> None:
    ca_end = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes()).not_valid_after_utc
    device.use_cert(pki.client_cert("dev-0001", name="dev-0001-outlives", not_after=ca_end + dt.timedelta(days=90)))
    check = by_name(run_checks(device.config, FAST))["ca"]
    assert check.status == WARN and f"only until {ca_end:%Y-%m-%d}" in check.detail


def test_demo_dbc_on_a_live_bus_warns(device: Device) -> None:
    """The demo car's DBC on a real bus decodes nothing meaningful: provision warns, and so does the doctor."""
    assert "demo-dbc" not in by_name(run_checks(device.config, FAST))  # python-can's virtual bus: a bench
    device.sections["can"]["interface"] = "socketcan"
    device.sections["can"]["channel"] = "can0"
    device.write()
    check = by_name(run_checks(device.config, FAST))["demo-dbc"]
    assert check.status == WARN and "demo car's DBC" in check.detail and "vehicle.dbc" in check.detail


def test_serial_adapter_behind_a_link_is_checked(tmp_path: Path) -> None:
    """A dev stack's channel is DIR/run/can0, a link to the simulator's pty: doctor said "not checked" (WARN)
    whether the simulator ran or not."""
    import pty as ptymod

    from vgw.config.settings import CanConfig
    from vgw.ops.doctor import _can

    link = tmp_path / "run" / "can0"
    link.parent.mkdir()
    master, slave = ptymod.openpty()
    try:
        link.symlink_to(os.ttyname(slave))
        cfg = CanConfig(interface="slcan", channel=str(link), bitrate=500000, dbc=(), signal_map=tmp_path / "m")
        assert _can(cfg, Probes()).status == PASS
    finally:
        os.close(master)
        os.close(slave)
    link.unlink()
    link.symlink_to(tmp_path / "gone")  # the simulator stopped: its link dangles
    res = _can(cfg, Probes())
    assert res.status == FAIL and "vgw dev up" in res.detail


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
def test_a_ca_file_that_is_not_a_regular_file_is_a_fail_not_a_hang(device: Device, kind: str) -> None:
    """The CA check read ``ca_file`` raw: a FIFO hung `vgw doctor` for ever, /dev/zero read until memory ran out.
    Now every check reads it as the agent does (a regular file, capped): a FAIL naming it, at once."""
    bad = device.dir / "ca.pem"
    if kind == "fifo":
        os.mkfifo(bad)
    else:
        bad.symlink_to("/dev/zero")
    device.ca = bad
    device.write()
    r = subprocess.run([sys.executable, "-m", "vgw", "doctor", "--config", str(device.config)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr[-2000:])
    assert "not a regular file" in r.stdout, r.stdout


def test_a_certificate_ending_the_day_its_ca_ends_shows_the_times(device: Device, pki: TestPKI) -> None:
    """doctor said `valid until 2027-12-07 but its CA only until 2027-12-07`: on the same day the dates are
    equal, so the times show (to the second) and the two ends differ on screen as they do in the files."""
    ca_end = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes()).not_valid_after_utc
    leaf_end = ca_end + dt.timedelta(seconds=1)
    device.use_cert(pki.client_cert("dev-0001", name="dev-0001-same-day", not_after=leaf_end))
    check = by_name(run_checks(device.config, FAST))["ca"]
    assert check.status == WARN
    m = re.search(r"valid until (.+?) but its CA only until (.+?): from then on", check.detail)
    assert m is not None, check.detail
    assert m.group(1) != m.group(2), check.detail
    if leaf_end.date() == ca_end.date():
        assert m.group(1) == f"{leaf_end:%Y-%m-%d %H:%M:%S} UTC" and m.group(2) == f"{ca_end:%Y-%m-%d %H:%M:%S} UTC"
