"""The world one explorer worker runs its schedules in (tests/explore.py): real parts, reused across schedules.

- two mosquitto brokers over mutual TLS with persistence (retained consent survives a restart), the two
  endpoints of the agent's ``[mqtt] hosts``, so a broker stopped is a failover;
- on each broker an :class:`Observer`, the cloud's MQTT client: it publishes the consent documents and keeps
  every message the broker forwards under ``vgw/`` (consent, data, receipts, status) in the broker's order,
  which is what the invariants are judged on (tests/explore_oracle.py);
- a small tmpfs (as root, where mount works) that holds the state directories, so "disk full" is a real full
  file system; without it the disk steps are skipped and say so;
- :class:`AgentProc`, the real `vgw run` child process of one schedule.

Each schedule uses a device id of its own (a certificate made on demand), so retained messages and sessions of
earlier schedules never reach it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgw_sim.broker import Mosquitto
from vgw_sim.cloud import CloudPeer, SigningKey
from vgw_sim.pki import TestPKI

from tests.agentkit import ROOT
from tests.faultkit import record_trace

TMPFS_BYTES = 24 * 1024 * 1024


@dataclass(frozen=True)
class Message:
    """One message a broker forwarded to the cloud, in the broker's order (``n`` rises per observer)."""

    n: int
    topic: str
    payload: bytes
    arrived: float  # time.monotonic() when the observer's network thread got it


class Observer(CloudPeer):
    """The cloud on one broker: publishes consent, and records everything under ``<prefix>/`` in order.

    Besides the data, receipt and status topics of :class:`CloudPeer` it subscribes the devices' consent
    topics, so the documents the cloud published appear in the same ordered stream as the devices' messages
    (mosquitto forwards the messages of all publishers to one subscriber in the order it processed them).
    Retained copies sent because of a (re)subscription are not events and are left out. Owned by the worker;
    the stream is guarded by the peer's lock (paho's thread appends, the worker reads copies).
    """

    def __init__(self, name: str, broker: Mosquitto, pki: TestPKI) -> None:
        super().__init__(broker.host, broker.port, ca_file=pki.ca.cert, cert_file=pki.cloud.cert,
                         key_file=pki.cloud.key, persistent=True, client_id=f"explorer-{name}-{os.getpid()}")
        self.name = name
        self._client.reconnect_delay_set(0.2, 1)  # back soon after a broker restart: schedules wait for it
        self.stream: list[Message] = []
        self._n = 0

    def _subscriptions(self) -> list[str]:
        # The consent topics too: the oracle judges each batch against the consent the broker held then.
        return [*super()._subscriptions(), f"{self.prefix}/+/consent"]

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if message.retain:  # a copy for a new subscription, not something that happened now
            return
        with self._lock:
            self._n += 1
            self.stream.append(Message(self._n, message.topic, bytes(message.payload), time.monotonic()))

    def mark(self, label: str) -> None:
        """Put an explorer event (agent killed, broker stopped ...) into the stream where it happened."""
        with self._lock:
            self._n += 1
            self.stream.append(Message(self._n, f"marker/{label}", b"", time.monotonic()))

    def of_device(self, device: str) -> list[Message]:
        head = f"{self.prefix}/{device}/"
        with self._lock:
            return [m for m in self.stream if m.topic.startswith((head, "marker/"))]

    def forget(self, device: str) -> None:
        head = f"{self.prefix}/{device}/"
        with self._lock:
            self.stream = [m for m in self.stream if not m.topic.startswith((head, "marker/"))]

    def barrier(self, timeout: float = 10.0) -> bool:
        """Publish a marker and wait for it: everything the broker processed before it is in the stream."""
        marker = f"barrier-{time.monotonic_ns()}".encode()
        topic = f"{self.prefix}/explorer-barrier/status"
        try:
            self._client.publish(topic, marker, qos=1)
        except Exception:  # a broker going down: no barrier, the caller goes on
            return False
        ok = self.wait_for(lambda: any(m.payload == marker for m in self.stream[-50:]), timeout)
        with self._lock:
            self.stream = [m for m in self.stream if m.topic != topic]
        return ok


class Broker:
    """One of the two endpoints: a persistent mosquitto and the observer on it. Owned by the worker."""

    def __init__(self, name: str, pki: TestPKI) -> None:
        self.name = name
        self.mosq = Mosquitto.from_pki(pki, persistence=True).start()
        self.observer = Observer(name, self.mosq, pki)
        self.observer.connect(20)

    @property
    def up(self) -> bool:
        return self.mosq.running

    def stop(self) -> None:
        self.mosq.stop()

    def start(self) -> None:
        if not self.mosq.running:
            self.mosq.start()
        self.observer.wait_connected(20)

    def close(self) -> None:
        self.observer.close()
        self.mosq.close()


class World:
    """Everything one worker reuses across schedules: PKI, trust key, trace, two brokers, the tmpfs."""

    def __init__(self, name: str = "w0") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"vgw-explore-{name}-"))
        os.chmod(self.root, 0o755)  # noqa: S103 - mosquitto (its own user) reads the PKI below it
        self.pki = TestPKI(self.root / "pki")
        self.signer = SigningKey.generate()
        self.trust = self.signer.write_public_pem(self.root / "trust.pem")
        self.forger = SigningKey.generate()  # a key the agent does not trust
        self.trace = record_trace(self.root, 10.0)
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.disk = self.root / "disk"
        self.disk.mkdir()
        self.tmpfs = _mount_tmpfs(self.disk)
        self.brokers = {"A": Broker("A", self.pki), "B": Broker("B", self.pki)}

    def close(self) -> None:
        for b in self.brokers.values():
            b.close()
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.disk)], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- disk ------------------------------------------------------------------------------------------

    def fill_disk(self) -> None:
        """Fill the tmpfs to the last byte (a filler file; what the agent then writes fails with ENOSPC)."""
        if not self.tmpfs:
            return
        fd = os.open(self.disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 20, 1 << 12, 1 << 8, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)

    def free_disk(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.disk / "filler").unlink()


def _mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    return r.returncode == 0


class AgentProc:
    """The `vgw run` child process of one schedule; the explorer is its supervisor (restarts it after a kill)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.unexpected_exit: int | None = None  # the return code of an exit nobody asked for

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.check_alive()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "vgw", "run", "--config", str(self.config),
                                          "--log-level", "info"], stdout=out, stderr=out, env=env, cwd=ROOT)
        self.starts += 1

    def check_alive(self) -> None:
        """Note an exit the explorer did not cause (invariant d); the process is then restarted by start()."""
        if self.proc is not None and self.proc.poll() is not None and self.unexpected_exit is None:
            self.unexpected_exit = self.proc.returncode
        if self.proc is not None and self.proc.poll() is not None:
            self.proc = None

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM; the return code, or None if it did not exit within ``timeout`` (then it is killed)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is not None:
            rc = self.proc.returncode
            self.proc = None
            return rc
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            rc = None
        self.proc = None
        return rc

