"""sd_notify(3) without libsystemd: agent/vgw/daemon/sdnotify.py against a real AF_UNIX datagram socket
as NOTIFY_SOCKET, and the real `vgw run` sending READY=1, WATCHDOG=1 (main loop, at WATCHDOG_USEC/2) and STOPPING=1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vgw.daemon.sdnotify import notify, watchdog_interval
from vgw_sim.broker import free_port
from vgw_sim.pki import TestPKI

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket, exported as NOTIFY_SOCKET (short path: sun_path is 108 bytes)."""
    folder = tempfile.mkdtemp(prefix="vgw-sd-", dir="/tmp")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("state", ["READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=consent v3, 2 grants"])
def test_notify_sends_each_state_as_one_datagram(notify_socket: socket.socket, state: str) -> None:
    assert notify(state) is True
    assert notify_socket.recv(4096) == state.encode()


def test_notify_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"vgw-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1")
        assert sock.recv(64) == b"READY=1"


def test_notify_without_systemd_is_a_silent_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify("WATCHDOG=1") is False  # never raises


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0  # ping at half the timeout (sd_watchdog_enabled(3))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None  # meant for another process
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "1000")
    assert watchdog_interval() == 0.1  # floor: never a busy loop


def _agent_config(tmp: Path, pki: TestPKI) -> Path:
    from vgw_sim.cloud import SigningKey

    trust = SigningKey.generate().write_public_pem(tmp / "trust.pem")
    dev = pki.device("dev-0001")
    cfg = tmp / "vgw.toml"
    cfg.write_text(f"""
[device]
id = "dev-0001"
state_dir = "{tmp / 'state'}"
[can]
interface = "virtual"
channel = "sdnotify-test"
dbc = ["{ROOT / 'dbc' / 'vehicle.dbc'}"]
signal_map = "{ROOT / 'dbc' / 'signals.toml'}"
[mqtt]
host = "127.0.0.1"
port = {free_port()}
ca_file = "{pki.ca.cert}"
cert_file = "{dev.cert}"
key_file = "{dev.key}"
backoff_min_s = 0.5
backoff_max_s = 1.0
[consent]
trust_keys = ["{trust}"]
""")
    return cfg


def test_agent_sends_ready_watchdog_stopping(notify_socket: socket.socket, tmp_path: Path, pki: TestPKI) -> None:
    """The real daemon as systemd runs it: READY=1 once up, WATCHDOG=1 repeatedly, STOPPING=1 on SIGTERM."""
    env = dict(os.environ, NOTIFY_SOCKET=os.environ["NOTIFY_SOCKET"], WATCHDOG_USEC="200000")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "vgw", "run", "--config", str(_agent_config(tmp_path, pki))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    got: list[bytes] = []
    try:
        notify_socket.settimeout(15.0)
        deadline = time.monotonic() + 15.0
        while got.count(b"WATCHDOG=1") < 3 and time.monotonic() < deadline:
            got.append(notify_socket.recv(256))
        proc.send_signal(signal.SIGTERM)
        notify_socket.settimeout(10.0)
        while b"STOPPING=1" not in got:
            got.append(notify_socket.recv(256))
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert got[0] == b"READY=1", (got, stderr)
    assert got.count(b"READY=1") == 1
    assert got.count(b"WATCHDOG=1") >= 3
    assert got.index(b"STOPPING=1") > got.index(b"READY=1")
