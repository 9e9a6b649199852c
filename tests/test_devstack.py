"""`vgw dev init|up|status|down`: a complete, kept, runnable dev stack in one directory (README "Your own dev
stack"), with real mosquitto, the SLCAN pty simulator, the cloud listener and the agent as background
processes; private keys 0600 (also from `vgw sim fleet --make-pki`)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from vgw.cloud.cloudkit import load_grants
from vgw.config.settings import load_config

from tests.agentkit import ROOT, vgw, wait_until


def _private_keys(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.key"))


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def stack_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "devstack"
    yield d
    if (d / "stack.json").exists():
        vgw("dev", "down", str(d), timeout=60)  # never leave a stack running after a failed test


def _batches(d: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        lines = (d / "cloud" / "received.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        event = json.loads(line)
        if event.get("type") == "batch":
            out[event["grant"]] = out.get(event["grant"], 0) + 1
    return out


def test_init_up_down_a_kept_stack(stack_dir: Path) -> None:
    r = vgw("dev", "init", str(stack_dir), timeout=60)
    assert r.returncode == 0, r.stderr
    keys = _private_keys(stack_dir)
    names = {p.name for p in keys}
    assert {"ca.key", "server.key", "cloud.key", "dev-car-01.key", "consent-signer.key", "g-fleet.key",
            "g-insurer.key"} <= names
    assert all(_mode(p) == 0o600 for p in keys), {str(p): oct(_mode(p)) for p in keys}
    assert _mode(stack_dir) == 0o700
    cfg = load_config(stack_dir / "vgw.toml")  # a valid agent config, paths relative to it
    assert cfg.state_dir == (stack_dir / "state").resolve() and cfg.can is not None
    assert cfg.can.interface == "slcan" and cfg.can.channel == str(stack_dir.absolute() / "run" / "can0")
    assert {g["id"] for g in load_grants(stack_dir / "grants.toml")["grants"]} == {"g-fleet", "g-insurer"}

    again = vgw("dev", "init", str(stack_dir), timeout=60)
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1
    assert "already holds a dev stack" in again.stderr

    r = vgw("dev", "up", str(stack_dir), timeout=90)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "vgw monitor --config" in r.stdout
    assert "signed and pushed" not in r.stdout  # signed by `init`, not now: it only says what it did
    pids = {line.split()[0]: int(line.split("pid ")[1].rstrip(")")) for line in
            vgw("dev", "status", str(stack_dir)).stdout.splitlines()}
    assert set(pids) == {"broker", "sim", "cloud", "agent"}
    # Data flows end to end: the cloud listener decrypts batches of both grants.
    assert wait_until(lambda: sorted(_batches(stack_dir)) == ["g-fleet", "g-insurer"]
               and min(_batches(stack_dir).values()) >= 2)
    st = json.loads(vgw("status", "--config", str(stack_dir / "vgw.toml"), "--json").stdout)
    assert st["link"] == "connected" and {g["id"] for g in st["grants"]} == {"g-fleet", "g-insurer"}

    # The monitor reads the second adapter while the agent reads the first; the agent's own one is refused.
    cfg_path = str(stack_dir / "vgw.toml")
    mon = vgw("monitor", "--config", cfg_path, "-c", str(stack_dir / "run" / "can1"), "--duration", "3",
              "--interval", "2.5")
    assert mon.returncode == 0, mon.stderr
    assert re.search(r"^Vehicle\.Speed\s+read_speedometer\s+\S+ km/h\s+[1-9][0-9.]*/s\s+sent: g-insurer$",
                     mon.stdout.split("--- ")[-1], re.MULTILINE), mon.stdout
    refused = vgw("monitor", "--config", cfg_path, "--duration", "1")
    assert refused.returncode == 1 and "already open in process" in refused.stderr

    # up again: nothing is started twice, and nothing signed (grants.toml did not change).
    r = vgw("dev", "up", str(stack_dir), timeout=90)
    assert r.returncode == 0, r.stderr
    assert "grants.toml unchanged" in r.stdout and "signed and pushed" not in r.stdout, r.stdout
    status = vgw("dev", "status", str(stack_dir))
    assert status.returncode == 0
    assert {line.split()[0]: int(line.split("pid ")[1].rstrip(")")) for line in status.stdout.splitlines()} == pids

    r = vgw("dev", "down", str(stack_dir), timeout=60)
    assert r.returncode == 0, r.stderr
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert vgw("dev", "status", str(stack_dir)).returncode == 3
    # Everything is kept: logs of every part, the agent's state, what the cloud received.
    for part in ("broker", "sim", "cloud", "agent"):
        assert (stack_dir / "logs" / f"{part}.log").stat().st_size > 0
    assert "consent v" in (stack_dir / "logs" / "agent.log").read_text()
    assert (stack_dir / "state" / "outbox.sqlite").exists()
    assert not list((stack_dir / "run").glob("*.pid"))


def test_trace_stack_replays_without_a_simulator(stack_dir: Path, tmp_path: Path) -> None:
    from vgw_sim.can_sim import CanSimulator

    trace = tmp_path / "drive.log"
    CanSimulator().record(trace, 5.0)
    assert vgw("dev", "init", str(stack_dir), "--trace", str(trace), "--device", "bench-car").returncode == 0
    cfg = load_config(stack_dir / "vgw.toml")
    assert cfg.can is not None and cfg.can.replay == (stack_dir / "trace.log").resolve() and cfg.can.replay_loop
    r = vgw("dev", "up", str(stack_dir), timeout=90)
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: len(_batches(stack_dir)) == 2)
    st = vgw("dev", "status", str(stack_dir))
    assert st.returncode == 0 and "sim" not in st.stdout  # no simulator in a trace stack, and all is running
    assert f"vgw monitor --config {stack_dir}/vgw.toml " in r.stdout and "run/can1" not in r.stdout


def test_not_a_stack_is_one_line(tmp_path: Path) -> None:
    for action in ("up", "down", "status"):
        r = vgw("dev", action, str(tmp_path / "nothing"))
        assert r.returncode == 1 and "not a vgw dev stack" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    bad_init = ((("/proc/vgw-nope",), "cannot lay out"), ((str(tmp_path / "d"), "--device", "a/b"), "--device"),
                ((str(tmp_path / "e"), "--trace", str(tmp_path / "none.log")), "none.log not found"))
    for args, needle in bad_init:
        r = vgw("dev", "init", *args)
        assert r.returncode == 1 and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_fleet_make_pki_writes_private_keys_0600(tmp_path: Path) -> None:
    out = tmp_path / "fleet-pki"
    r = subprocess.run([sys.executable, "-m", "vgw", "sim", "fleet", "--make-pki", str(out), "--devices", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    keys = _private_keys(out)
    assert len(keys) == 5  # CA, server, cloud, two devices
    assert all(_mode(p) == 0o600 for p in keys), {p.name: oct(_mode(p)) for p in keys}
    assert all(_mode(p) == 0o644 for p in out.glob("*.crt"))
    assert not any(os.access(p, os.R_OK) and p.stat().st_mode & 0o044 for p in keys)


def test_readme_first_screen_is_the_three_commands_tested_here() -> None:
    """README's first screen takes a developer from a clone to a running agent with their own broker in three
    commands: `make demo`, then `vgw dev init DIR` and `vgw dev up DIR` (test_init_up_down_a_kept_stack runs
    the last two; `make demo` is the Makefile target .ci/run and test_demo exercise)."""
    first_screen = (ROOT / "README.md").read_text().splitlines()[:24]
    start = first_screen.index("```sh")
    block = first_screen[start + 1:first_screen.index("```", start + 1)]
    commands = [line.split("#")[0].split() for line in block if line.strip()]
    assert len(commands) == 3, block
    assert commands[0] == ["make", "demo"]
    assert re.search(r"^demo:", (ROOT / "Makefile").read_text(), re.MULTILINE)
    init, up = commands[1], commands[2]
    assert init[0] == up[0] == ".venv/bin/vgw"  # what `make demo` installs
    assert init[1:3] == ["dev", "init"] and up[1:3] == ["dev", "up"] and init[3] == up[3]


def test_up_again_keeps_a_consent_pushed_by_hand(stack_dir: Path, tmp_path: Path) -> None:
    """README's recipe revokes a grant by hand (`vgw cloud revoke ... --current current.jws`); a later `vgw dev
    up` (to restart a stopped simulator, say) re-published the older current.jws as the broker's retained
    consent: the running agent refused it, but a device starting afresh would take it, the revoked grant back."""
    from vgw.cloud.cloudlink import BrokerOptions, CloudLink

    assert vgw("dev", "init", str(stack_dir), timeout=60).returncode == 0
    r = vgw("dev", "up", str(stack_dir), timeout=90)
    assert r.returncode == 0, r.stderr + r.stdout
    port = json.loads((stack_dir / "stack.json").read_text())["port"]
    pki, consent = stack_dir / "pki", stack_dir / "consent"
    broker = ["--broker", f"127.0.0.1:{port}", "--ca", str(pki / "ca.crt"), "--cert", str(pki / "cloud.crt"),
              "--tls-key", str(pki / "cloud.key")]
    by_hand = tmp_path / "v2.jws"
    r = vgw("cloud", "revoke", "--key", str(consent / "consent-signer.key"), "--current",
            str(consent / "current.jws"), "--grant", "g-insurer", *broker, "-o", str(by_hand))
    assert r.returncode == 0, r.stderr
    v2 = int(re.search(r"consent v(\d+)", r.stdout).group(1))  # type: ignore[union-attr]

    def in_force() -> int | None:
        st = vgw("status", "--config", str(stack_dir / "vgw.toml"), "--json")
        return json.loads(st.stdout)["consent_version"] if st.returncode == 0 else None

    wait_until(lambda: in_force() == v2)
    r = vgw("dev", "up", str(stack_dir), timeout=90)
    assert r.returncode == 0, r.stderr

    retained: list[bytes] = []
    link = CloudLink(BrokerOptions(host="127.0.0.1", port=port, ca_file=pki / "ca.crt", cert_file=pki / "cloud.crt",
                                   key_file=pki / "cloud.key", client_id="test-retained"),
                     on_message=lambda _t, payload: retained.append(payload)).connect()
    try:
        link.subscribe([("vgw/dev-car-01/consent", 1)])
        wait_until(lambda: retained)
    finally:
        link.close()
    assert retained[0].decode().strip() == by_hand.read_text().strip()
    assert f"not pushed: the device holds v{v2}" in r.stdout


# -- root on a stack folder owned by another user ---------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting on another user's folder needs root")


@needs_root
@pytest.mark.parametrize("planted", ["run/broker.pid", "logs/broker.log"])
def test_up_as_root_never_follows_a_link_planted_in_the_stack(foreign_stack: Path, tmp_path: Path,
                                                               planted: str) -> None:
    """`vgw dev up` as root followed links the folder's owner planted: run/broker.pid -> a root-owned file got a
    PID, logs/broker.log -> another got the broker's log; the agent refused the folder only after the rest ran."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's own file\n")
    (foreign_stack / planted).symlink_to(victim)
    r = vgw("dev", "up", str(foreign_stack), timeout=90)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "symbolic link" in lines[0] and planted in lines[0], r.stderr
    assert victim.read_bytes() == b"root's own file\n"
    assert not (foreign_stack / "broker/mosquitto.conf").exists()  # nothing was started or written
    assert not [p for p in (foreign_stack / "run").iterdir() if p.name.endswith(".pid") and not p.is_symlink()]


@needs_root
def test_up_as_root_runs_every_part_as_the_folders_owner(foreign_stack: Path) -> None:
    """mosquitto.conf said `user root` (the code used geteuid()), though the README says mosquitto runs as the
    folder's owner; the agent then refused the foreign state dir."""
    from tests.test_provision import SERVICE

    r = vgw("dev", "up", str(foreign_stack), timeout=120)
    if r.returncode == 1 and "cannot be run by the stack's owner" in r.stderr:
        # This host's interpreter lives where the owner may not go (a pyenv under /root): refused before
        # anything started, with one line saying so.
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (foreign_stack / "broker/mosquitto.conf").exists()
        assert not list((foreign_stack / "run").glob("*.pid"))
        return
    assert r.returncode == 0, r.stdout + r.stderr
    assert "user root" not in (foreign_stack / "broker/mosquitto.conf").read_text()
    for part, pid in ((line.split()[0], int(line.split("pid ")[1].rstrip(")")))
                      for line in vgw("dev", "status", str(foreign_stack)).stdout.splitlines()):
        assert psutil.Process(pid).uids().effective == SERVICE, part
    assert all(os.lstat(p).st_uid == SERVICE for p in [foreign_stack, *foreign_stack.rglob("*")])


def test_the_broker_runs_as_the_folders_owner(tmp_path: Path) -> None:
    from vgw.base.fsutil import Account
    from vgw.tools.devstack import Stack, _broker_config

    stack = Stack(tmp_path)
    (tmp_path / "broker").mkdir()
    assert "\nuser nobody\n" in _broker_config(stack, 1883, Account(65534, 65534))
    assert "\nuser root\n" in _broker_config(stack, 1883, Account(0, 0))
    assert "\nuser " not in _broker_config(stack, 1883, Account(4242424, 4242424))  # no name: started as it


def test_status_json_is_one_object_and_init_takes_device_id(stack_dir: Path) -> None:
    """`vgw dev status --json` was refused (every other status command has it), and `dev init` took only
    `--device` where `vgw provision` takes `--device-id`: both spellings work everywhere a device id is taken."""
    r = vgw("dev", "init", str(stack_dir), "--device-id", "car-7", timeout=60)
    assert r.returncode == 0, r.stderr
    assert load_config(stack_dir / "vgw.toml").device.id == "car-7"
    st = vgw("dev", "status", str(stack_dir), "--json")
    assert st.returncode == 3, st.stderr  # nothing runs yet: the same exit code as the text form
    doc = json.loads(st.stdout)  # one JSON object and nothing else on stdout
    assert doc == {"dir": str(stack_dir.absolute()), "running": False,
                   "parts": {p: {"running": False, "pid": None} for p in ("broker", "sim", "cloud", "agent")}}
