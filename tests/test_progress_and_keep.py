"""Progress on long work shows on a terminal and stays out of a pipe (`vgw bench`, the demo's set-up), and
`vgw demo --keep DIR` keeps a demo that still works afterwards plus a dev stack (README "Your own dev stack")."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

from vgw.config.settings import load_config

from tests.agentkit import ROOT, vgw

# the stages only (their progress phases); the headline's whole-process runs are tests/test_bench_headline.py's
BENCH = ["bench", "--stages", "--frames", "2000", "--rt-seconds", "0.3", "--revoke-rows", "100", "--rules-seconds",
         "0.5", "--json"]


def _in_pty(args: list[str], timeout: float = 120.0) -> tuple[int, str, str]:
    """Run `vgw ARGS` with stderr on a real pseudo-terminal and stdout on a pipe; returns (code, stdout, tty)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vgw", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL, text=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                chunk = b""
            if not chunk and proc.poll() is not None:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out, seen.decode(errors="replace")


def test_bench_progress_on_a_terminal_only() -> None:
    code, out, tty = _in_pty(BENCH)
    assert code == 0, tty[-2000:]
    assert "\r\x1b[2K" in tty and "[####" in tty  # a bar redrawn in place
    assert "decode (baseline)" in tty and "revocation" in tty
    json.loads(out)  # stdout stays the result alone

    piped = subprocess.run([sys.executable, "-m", "vgw", *BENCH], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""  # quiet when piped
    json.loads(piped.stdout)


def test_demo_set_up_progress_on_a_terminal_only() -> None:
    """On a terminal; that a pipe gets none is checked on test_demo's piped run (a demo takes 10 s)."""
    code, out, tty = _in_pty(["demo", "--duration", "8", "--json"])
    assert code == 0, tty[-2000:]
    assert "setting up: private mosquitto" in tty and "setting up: agent" in tty
    assert json.loads(out)["ok"] is True


def test_demo_keep_keeps_a_working_demo_and_a_dev_stack(tmp_path: Path) -> None:
    keep = tmp_path / "kept"
    r = vgw("demo", "--duration", "8", "--json", "--keep", str(keep), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["ok"] is True
    demo = keep / "demo"
    cfg = load_config(demo / "vgw.toml")  # still valid: nothing points into a deleted temp folder
    for p in (cfg.state_dir, cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file, *cfg.consent.trust_keys):
        assert p.exists() and p.is_relative_to(demo.resolve()), p
    # the owner's consent service signed the car's documents (Unix-ms versions); the fleet app's grant remains
    summary = json.loads(r.stdout)
    fleet = next(gid for gid, g in summary["grants"].items() if g["app"] == "fleet")
    st = json.loads(vgw("status", "--config", str(demo / "vgw.toml"), "--json").stdout)
    assert st["consent_version"] > 2 and [g["id"] for g in st["grants"]] == [fleet]
    log = (demo / "demo.log").read_text()
    assert len(re.findall(r"consent v\d+ .*applied", log)) >= 2, log  # the agent's log is kept
    # the service's config too, pointing into the kept folder only
    from vgw.cloud.service.config import load_service_config

    svc = load_service_config(demo / "service" / "service.toml")
    for p in (svc.signing_key, svc.device_certs, svc.broker.ca_file, svc.broker.cert_file, svc.broker.key_file):
        assert p.exists() and p.resolve().is_relative_to(demo.resolve()), p
    assert (demo / "broker" / "mosquitto.log").stat().st_size > 0
    assert json.loads((demo / "summary.json").read_text())["ok"] is True
    keys = list(keep.rglob("*.key"))
    assert keys and all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    # ... and DIR is a dev stack ready for `vgw dev up`.
    assert (keep / "stack.json").exists() and load_config(keep / "vgw.toml").device.id == "dev-car-01"
    assert "vgw dev up" in r.stderr

    again = vgw("demo", "--duration", "8", "--keep", str(keep))
    assert again.returncode == 1 and "already holds" in again.stderr
