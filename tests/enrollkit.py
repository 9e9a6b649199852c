"""Helpers for the enrollment tests: an allow file, the `vgw cloud enroll serve` process, a device config whose
certificate and key do not exist yet, and a client on the claim identity."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vgw_sim.broker import CLAIM_USER, Mosquitto
from vgw_sim.pki import CertPaths, TestPKI

from tests.agentkit import ROOT, stop_process, wait_until, write_config

_CLAIMS: dict[Path, CertPaths] = {}


def claim_identity(pki: TestPKI) -> CertPaths:
    """The batch's claim certificate (CN = the ACL's claim user), issued once per PKI: a running `vgw enroll`
    must never see its files rewritten."""
    if pki.dir not in _CLAIMS:
        _CLAIMS[pki.dir] = pki.client_cert(CLAIM_USER, name="claim")
    return _CLAIMS[pki.dir]


def write_allow(path: Path, tokens: dict[str, str]) -> Path:
    path.write_text("".join(f'[[device]]\nid = "{d}"\ntoken = "{t}"\n\n' for d, t in tokens.items()))
    return path


def device_config(tmp: Path, pki: TestPKI, broker: Mosquitto, trust: Path, device: str, *,
                  mqtt_extra: dict[str, object] | None = None) -> Path:
    """A config for ``device`` whose [mqtt] cert_file and key_file are ``tmp/<device>/device.crt|key`` (absent)."""
    home = tmp / device
    home.mkdir(exist_ok=True)
    cfg = write_config(home, pki, broker.port, trust, device=device, can={"channel": f"enroll-{device}"},
                       mqtt_extra=mqtt_extra)
    lines = []
    for line in cfg.read_text().splitlines():
        if line.startswith("cert_file"):
            line = f'cert_file = "{home / "device.crt"}"'
        elif line.startswith("key_file"):
            line = f'key_file = "{home / "device.key"}"'
        lines.append(line)
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


class Service:
    """`vgw cloud enroll serve` as a child process (stopped with SIGTERM)."""

    def __init__(self, tmp: Path, pki: TestPKI, broker: Mosquitto, allow: Path, *, days: int = 365,
                 signing_ca: TestPKI | None = None) -> None:
        """``signing_ca``: issue with another CA's certificate and key (a misconfigured service)."""
        issuer = signing_ca or pki
        self.ledger = tmp / "ledger.jsonl"
        self.args = [sys.executable, "-m", "vgw", "cloud", "enroll", "serve", "--broker", f"127.0.0.1:{broker.port}",
                     "--ca", str(pki.ca.cert), "--cert", str(pki.cloud.cert), "--tls-key", str(pki.cloud.key),
                     "--ca-cert", str(issuer.ca.cert), "--ca-key", str(issuer.ca.key), "--allow", str(allow),
                     "--ledger", str(self.ledger), "--days", str(days)]
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: list[str] = []

    def start(self) -> Service:
        self.stderr = []
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        assert wait_until(lambda: any("serving" in line for line in self.stderr) or self.proc.poll() is not None,
                          60), "enroll service did not become ready"
        assert self.proc.poll() is None, "".join(self.stderr)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.stderr.append(line)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)
            self.proc = None


@contextmanager
def enroll_service(tmp: Path, pki: TestPKI, broker: Mosquitto, allow: Path, **kwargs: Any) -> Iterator[Service]:
    service = Service(tmp, pki, broker, allow, **kwargs).start()
    try:
        yield service
    finally:
        service.stop()


def enroll_args(cfg: Path, claim: CertPaths, token: str, timeout: float = 60) -> list[str]:
    return ["enroll", "--config", str(cfg), "--claim-cert", str(claim.cert), "--claim-key", str(claim.key),
            "--token", token, "--timeout", str(timeout)]
