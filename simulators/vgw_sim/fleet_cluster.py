"""The fleet simulator's cloud side on a NATS cluster: ``vgw cloud relay`` processes that store what devices
publish in the telemetry stream (each on another node), ``vgw cloud listen --nats`` worker processes sharing
the durable consumer, and a reader that turns their JSON lines into the simulator's measurements.

Each worker is the real CLI in its own process (so opening envelopes is not limited by the simulator's GIL);
:class:`ConsumerGroup` starts them, tails their output files and feeds every event into the same counters the
MQTT consumer of :mod:`vgw_sim.fleet` fills (``seen`` by (device, grant), duplicates, latencies, receipts).
A batch that two workers handled (a redelivery after a worker or a node failed) counts once and as a
duplicate: that is the receivers' de-duplication on (device, grant, epoch, seq).

Owned by the simulator's main thread; one reader thread writes the counters under the counters' lock.

Errors: :class:`~vgw.base.errors.UplinkError` if a relay or a worker does not start.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from vgw.base.errors import UplinkError

__all__ = ["ConsumerGroup"]

_READY = "pulling (NATS JetStream)"
_RELAY_READY = "vgw cloud relay: relaying"
_ROOT = Path(__file__).resolve().parents[2]


class ConsumerGroup:
    """``n`` worker processes of one durable consumer; ``sink`` is the fleet's counters object (``lock``,
    ``seen``, ``duplicates``, ``delivered``, ``delivered_bytes``, ``latencies``, ``receipts``,
    ``bad_receipts``, ``undecryptable``, ``measuring``)."""

    def __init__(self, n: int, workdir: Path, *, nats_urls: list[str], ca: Path, cert: Path, key: Path,
                 recipient: Any, device_cert_dir: Path, sink: Any, ack_wait_s: float = 30.0,
                 relays: int = 2) -> None:
        self.n = n
        self.n_relays = relays
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sink = sink
        key_path = self.dir / "fleet.key"
        key_path.write_bytes(recipient.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        key_path.chmod(0o600)
        cluster = ["--nats", ",".join(u.removeprefix("tls://") for u in nats_urls),
                   "--ca", str(ca), "--cert", str(cert), "--tls-key", str(key)]
        self._argv = [sys.executable, "-m", "vgw", "cloud", "listen", *cluster, "--recipient", str(key_path),
                      "--device-cert", str(device_cert_dir), "--ack-wait", str(ack_wait_s), "--no-status"]
        self._relay_argv = [sys.executable, "-m", "vgw", "cloud", "relay", *cluster, "--drain", "60"]
        self.relay_procs: list[subprocess.Popen[bytes]] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._offsets: dict[int, int] = {}
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="vgw-fleet-consumers", daemon=True)

    def start(self, timeout: float = 60.0) -> None:
        """Start the relays (relay i on node i first; the first creates the stream), the workers (the first
        creates the consumer) and the reader. Raises UplinkError."""
        for i in range(self.n_relays):
            self.relay_procs.append(self._launch([*self._relay_argv, "--prefer", str(i)], f"r{i}.err",
                                                 _RELAY_READY, f"relay {i}", timeout))
        for i in range(self.n):
            self.procs.append(self._launch([*self._argv, "--out", str(self.dir / f"w{i}.jsonl")], f"w{i}.err",
                                           _READY, f"consumer worker {i}", timeout))
        self._reader.start()

    def _launch(self, argv: list[str], err_name: str, ready: str, what: str, timeout: float
                ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stderr to ``err_name`` and wait until that shows ``ready``. Raises UplinkError."""
        with open(self.dir / err_name, "ab") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=_ROOT)
        deadline = time.monotonic() + timeout
        while ready not in self._text(err_name):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise UplinkError(f"{what} did not start: {self._text(err_name).strip()[-500:]}")
            time.sleep(0.05)
        return proc

    def _text(self, name: str) -> str:
        path = self.dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def _summary(self, name: str) -> dict[str, Any] | None:
        for line in reversed(self._text(name).splitlines()):
            if line.startswith('{"summary"'):
                return dict(json.loads(line)["summary"])
        return None

    def summaries(self) -> list[dict[str, Any]]:
        """Each stopped worker's exit summary (handled, redelivered)."""
        out = []
        for i in range(len(self.procs)):
            s = self._summary(f"w{i}.err")
            if s is not None:
                out.append({"handled": s.get("handled"), "redelivered": s.get("redelivered")})
        return out

    def stop_relays(self, timeout: float = 90.0) -> list[dict[str, Any]]:
        """SIGTERM the relays: they stop taking messages, store what they hold, and exit. Returns each one's
        summary (received, stored, duplicates, retries, dropped, unstored_at_exit). Idempotent."""
        for p in self.relay_procs:
            if p.poll() is None:
                p.terminate()
        for p in self.relay_procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return [s for i in range(len(self.relay_procs)) if (s := self._summary(f"r{i}.err")) is not None]

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            self.read_once()
            self._stop.wait(0.1)
        self.read_once()

    def read_once(self) -> None:
        for i in range(len(self.procs)):
            path = self.dir / f"w{i}.jsonl"
            try:
                with open(path, "rb") as fh:
                    fh.seek(self._offsets.get(i, 0))
                    data = fh.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # a line being written stays for the next round
            self._offsets[i] = self._offsets.get(i, 0) + end
            for line in data[:end].splitlines():
                try:
                    self._event(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue

    def _event(self, e: dict[str, Any]) -> None:
        s = self.sink
        typ = e.get("type")
        with s.lock:
            if typ == "batch":
                seen = s.seen.setdefault((e["device"], e["grant"]), set())
                key = (str(e.get("epoch", "")), e["seq"])  # receivers de-duplicate on (epoch, seq)
                if key in seen:
                    s.duplicates += 1
                    return
                seen.add(key)
                if s.measuring:
                    s.delivered += 1
                    s.delivered_bytes += int(e.get("bytes", 0))
                    samples = e.get("samples") or []
                    s.latencies.append(e["arrived"] - samples[0]["t"] if samples else 0.0)
            elif typ == "duplicate":  # a batch; a repeated receipt ("duplicate-receipt") is not counted here
                s.duplicates += 1
            elif typ == "receipt":
                s.receipts.append((e["device"], e["claims"], e["arrived"]))
            elif typ == "bad-receipt":
                s.bad_receipts += 1
            elif typ == "rejected":
                s.undecryptable += 1

    def close(self) -> None:
        """Stop the relays, the workers (SIGTERM: they acknowledge what they handled and exit) and the reader."""
        self.stop_relays()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self._stop.set()
        if self._reader.is_alive():
            self._reader.join(10)
