"""Zero-touch enrollment of a simulated fleet (README "Enrollment"), against the real `vgw cloud enroll serve`.

Every simulated device does what `vgw enroll` does, with the same protocol code (:mod:`vgw.contract.enrollment`):
a key of its own, a CSR for its id, a connection on the batch's claim identity, subscribe to
``vgw/enroll/<id>/response``, then publish ``{"csr", "token"}`` on ``vgw/enroll/<id>/request`` (again every
:data:`RESEND_S` until answered), check the issued chain against its key, its id and the CA, and keep the pair
for the fleet run. ``lanes`` threads each drive up to ``window`` enrollments at once from one
:mod:`selectors` loop (paho's ``loop_read`` / ``loop_write`` / ``loop_misc``), so a thousand devices booting
together are a few threads.

:func:`enroll_fleet` returns an :class:`EnrollReport`: how many were enrolled, refused (with the service's
reasons) or got no answer, the time until all were enrolled and the per-device time (connect -> installed).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from vgw.base.errors import EnrollmentError
from vgw.cloud.mqttclient import make_client
from vgw.contract.backoff import ENROLL_RESEND_S as RESEND_S  # the same rule as `vgw enroll`
from vgw.contract.certs import cert_device_id
from vgw.contract.enrollment import (
    Kind,
    build_csr,
    check_issued,
    decode_response,
    encode_request,
    key_pem,
    new_key,
    request_topic,
    response_topic,
)
from vgw.contract.topics import PREFIX
from vgw.transport.tlsctx import client_context

from vgw_sim.fleet_device import ClientSelector, pump

__all__ = ["RESEND_S", "EnrollReport", "EnrollService", "enroll_fleet"]

log = logging.getLogger("vgw.fleet")


@dataclass
class EnrollReport:
    enrolled: int = 0
    refused: int = 0
    no_answer: int = 0
    time_to_all_s: float | None = None
    latencies: list[float] = field(default_factory=list)  # seconds, connect -> chain checked, per enrolled device
    reasons: dict[str, int] = field(default_factory=dict)  # the service's refusal reasons (first word)
    resent: int = 0
    connect_failures: int = 0


class _Enrollee:
    """One device enrolling; its paho client is driven by the lane that owns it."""

    def __init__(self, device: str, token: str, lane: _Lane) -> None:
        self.id = device
        self.token = token
        self.lane = lane
        self.key: ec.EllipticCurvePrivateKey = new_key()  # made here, never sent: only the CSR goes out
        self.request = encode_request(build_csr(self.key, device), token)
        self.started = 0.0
        self.sent_at: float | None = None
        self.done = False
        self.chain: tuple[x509.Certificate, ...] = ()
        self.refused: str | None = None
        self.retry_at = 0.0
        self.client: mqtt.Client = make_client(f"vgw-enroll-{device}", lane.protocol, lane.ctx, False)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_socket_register_write = lambda c, u, s: lane.want_write(self, True)
        self.client.on_socket_unregister_write = lambda c, u, s: lane.want_write(self, False)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(response_topic(PREFIX, Kind.ENROLL, self.id), qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self.send()  # subscribed first, then the request

    def send(self) -> None:
        self.client.publish(request_topic(PREFIX, Kind.ENROLL, self.id), self.request, qos=1)
        if self.sent_at is not None:
            self.lane.report.resent += 1
        self.sent_at = time.monotonic()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if self.done:
            return
        try:
            answer = decode_response(bytes(msg.payload))
            if answer.refused is not None:
                self.refused = answer.refused
            else:
                check_issued(answer.chain, self.key, self.id, self.lane.anchors, dt.datetime.now(dt.UTC))
                self.chain = answer.chain
        except EnrollmentError as exc:
            self.refused = f"{exc.reason.value}: {exc}"
        self.done = True
        self.lane.finished(self)


class _Lane(ClientSelector):
    """One thread driving up to ``window`` enrollments at a time."""

    def __init__(self, host: str, port: int, protocol: str, ctx: ssl.SSLContext, anchors: list[x509.Certificate],
                 window: int, out: Path, report: EnrollReport, lock: threading.Lock) -> None:
        self.host, self.port, self.protocol, self.ctx, self.anchors = host, port, protocol, ctx, anchors
        self.window = window
        self.out = out
        self.report = report
        self.lock = lock
        self.todo: list[tuple[str, str]] = []
        self.active: list[_Enrollee] = []
        super().__init__()
        self.thread = threading.Thread(target=self._run, name="vgw-fleet-enroll", daemon=True)
        self.deadline = 0.0

    def _connect(self, e: _Enrollee) -> None:
        e.retry_at = time.monotonic() + 2.0
        try:
            e.client.connect(self.host, self.port, keepalive=60)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.report.connect_failures += 1
            log.debug("%s: enrollment connect failed: %s", e.id, exc)
            return
        self.watch(e)

    def _drop(self, e: _Enrollee) -> None:
        sock = e.client.socket()
        if sock is not None:
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            self.masks.pop(sock.fileno(), None)
        try:
            e.client.disconnect()
            e.client.loop_write()  # sends DISCONNECT; paho closes the socket after it
        except Exception:  # best effort: the answer is in
            log.debug("%s: disconnect failed", e.id, exc_info=True)

    def finished(self, e: _Enrollee) -> None:
        took = time.monotonic() - e.started
        with self.lock:
            if e.chain:
                self.report.enrolled += 1
                self.report.latencies.append(took)
            else:
                self.report.refused += 1
                word = (e.refused or "").split(":", 1)[0]
                self.report.reasons[word] = self.report.reasons.get(word, 0) + 1
        if e.chain:
            (self.out / f"{e.id}.crt").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in e.chain))
            fd = os.open(self.out / f"{e.id}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key_pem(e.key))

    def _run(self) -> None:
        last_misc = 0.0
        while (self.todo or self.active) and time.monotonic() < self.deadline:
            while self.todo and len(self.active) < self.window:
                device, token = self.todo.pop()
                e = _Enrollee(device, token, self)
                e.started = time.monotonic()
                self.active.append(e)
                self._connect(e)
            self._poll(0.05)
            for e in [e for e in self.active if e.done]:
                self._drop(e)
                self.active.remove(e)
            now = time.monotonic()
            if now - last_misc >= 0.5:
                last_misc = now
                for e in self.active:
                    if e.client.socket() is None:
                        if now >= e.retry_at:
                            self._connect(e)  # the connection dropped: again, as `vgw enroll` does
                        continue
                    e.client.loop_misc()
                    if e.sent_at is not None and now - e.sent_at >= RESEND_S:
                        e.send()
        with self.lock:
            self.report.no_answer += len(self.active) + len(self.todo)
        for e in self.active:
            self._drop(e)
        self.sel.close()

    def _poll(self, timeout: float) -> None:
        if not self.sel.get_map():
            time.sleep(timeout)
            return
        for key, mask in self.sel.select(timeout):
            e: _Enrollee = key.data
            if not pump(e.client, mask):
                for k in list(self.sel.get_map().values()):
                    if k.data is e:
                        self.sel.unregister(k.fileobj)
                        self.masks.pop(k.fd, None)


def enroll_fleet(tokens: dict[str, str], *, host: str, port: int, protocol: str, ca: Path, claim_cert: Path,
                 claim_key: Path, out: Path, lanes: int = 4, window: int = 64, timeout_s: float = 300.0
                 ) -> EnrollReport:
    """Enroll every device of ``tokens`` (id -> token); each enrolled pair is written to ``out/<id>.crt|key``."""
    ctx = client_context(ca, claim_cert, claim_key)
    anchors = x509.load_pem_x509_certificates(ca.read_bytes())
    out.mkdir(parents=True, exist_ok=True)
    report = EnrollReport()
    lock = threading.Lock()
    n = max(1, min(lanes, len(tokens)))
    ls = [_Lane(host, port, protocol, ctx, anchors, window, out, report, lock) for _ in range(n)]
    for i, item in enumerate(sorted(tokens.items(), reverse=True)):
        ls[i % n].todo.append(item)
    t0 = time.monotonic()
    for lane in ls:
        lane.deadline = t0 + timeout_s
        lane.thread.start()
    for lane in ls:
        lane.thread.join()
    if report.enrolled == len(tokens):
        report.time_to_all_s = time.monotonic() - t0
    for device in tokens:
        path = out / f"{device}.crt"
        if path.exists() and cert_device_id(x509.load_pem_x509_certificates(path.read_bytes())[0]) != device:
            raise RuntimeError(f"{path}: enrolled under another id")  # never: check_issued checked it
    return report


class EnrollService:
    """`vgw cloud enroll serve` as a child process of the simulator (the real service, not a model of it)."""

    def __init__(self, args: list[str], progress: Callable[[str], None]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "vgw", "cloud", "enroll", "serve", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.progress = progress
        self._reader = threading.Thread(target=self._read, name="vgw-fleet-enroll-service", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if "serving" in line:
                self.ready.set()
        self.proc.stderr.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        if not self.ready.wait(timeout):
            self.close()
            raise RuntimeError("vgw cloud enroll serve did not start: " + " | ".join(self.lines[-5:]))

    def close(self) -> dict[str, Any]:
        """Stop it (SIGTERM) and return its summary line."""
        import json

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        for line in reversed(self.lines):
            if line.startswith('{"summary"'):
                summary: dict[str, Any] = json.loads(line)["summary"]
                return summary
        return {}
