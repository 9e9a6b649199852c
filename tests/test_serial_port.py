"""A serial SLCAN adapter (here: the simulator's real pty) has one reader: a second `vgw run` on the same port
is refused, never opened beside the first (README "Against an SLCAN adapter"); `vgw doctor` opens the port as
the agent's user, not as the root that runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vgw_sim.pki import TestPKI

from tests.agentkit import ROOT, Authority, stop_process, wait_until, write_config


@pytest.fixture
def pty_adapter() -> Iterator[str]:
    """`vgw sim can`: one SLCAN adapter on a pty; yields its path."""
    sim = subprocess.Popen([sys.executable, "-m", "vgw", "sim", "can", "--duration", "120"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert sim.stdout is not None
        yield sim.stdout.readline().strip()
    finally:
        stop_process(sim)


def counters(state: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state / "status.json").read_text())["counters"])
    except (OSError, ValueError, KeyError):
        return {}


def test_a_second_agent_is_refused_the_port_the_first_reads(tmp_path: Path, pki: TestPKI, pty_adapter: str) -> None:
    """The second agent opened the pty too and both got half the bytes: `malformed frame skipped`, then
    `Could not read from serial device` in the first."""
    auth = Authority(tmp_path)
    agents: list[subprocess.Popen[str]] = []
    logs: list[Path] = []
    states: list[Path] = []
    try:
        for name in ("first", "second"):
            folder = tmp_path / name
            folder.mkdir()
            cfg = write_config(folder, pki, 1, auth.trust,
                               can={"interface": "slcan", "channel": pty_adapter, "bitrate": 500000})
            logs.append(folder / "agent.log")
            states.append(folder / "state")
            with logs[-1].open("w") as log:
                agents.append(subprocess.Popen([sys.executable, "-m", "vgw", "run", "--config", str(cfg)],
                                               stdout=log, stderr=log, text=True, cwd=ROOT))
            if name == "first":
                assert wait_until(lambda: counters(states[0]).get("frames", 0) > 50, timeout=30), \
                    logs[0].read_text()
        first, second = logs
        assert wait_until(lambda: "already open" in second.read_text(), timeout=30), second.read_text()
        line = next(x for x in second.read_text().splitlines() if "already open" in x)
        assert pty_adapter in line and str(agents[0].pid) in line, line
        # The first keeps reading, undisturbed; the second reads nothing.
        seen = counters(states[0])["frames"]
        assert wait_until(lambda: counters(states[0]).get("frames", 0) > seen + 200, timeout=30)
        assert wait_until(lambda: second.read_text().count("already open") >= 2, timeout=30)  # it retries
        assert counters(states[0])["source_errors"] == 0 and counters(states[0])["frames_malformed"] == 0
        assert "malformed" not in first.read_text() and "read failed" not in first.read_text()
        assert counters(states[1]).get("frames", 0) == 0
        # Once the first is gone, the second takes the port.
        stop_process(agents[0])
        assert wait_until(lambda: counters(states[1]).get("frames", 0) > 50, timeout=30), second.read_text()
    finally:
        for proc in agents:
            stop_process(proc)


def test_the_lock_is_released_on_close(pty_adapter: str) -> None:
    """The source's claim on the port goes with it: the collector's reopen (and the next agent) gets it."""
    from vgw.sources.canbus import BusSource

    for _ in range(2):
        source = BusSource("slcan", pty_adapter, 500000)
        source.close()
    assert os.path.exists(pty_adapter)


@pytest.mark.skipif(os.geteuid() != 0, reason="opening a port as another user needs root")
def test_doctor_opens_the_port_as_the_agents_user(tmp_path: Path, pki: TestPKI, pty_adapter: str) -> None:
    """`vgw doctor` (as root) said `PASS can slcan adapter /dev/pts/3 present` while the agent, as its own user,
    logged `Permission denied` every 2 s."""
    from tests.test_provision import SERVICE

    auth = Authority(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, SERVICE, SERVICE)  # the agent's user: the state dir's owner
    cfg = write_config(tmp_path, pki, 1, auth.trust, state_dir=state,
                       can={"interface": "slcan", "channel": pty_adapter, "bitrate": 500000})

    def can_line() -> str:
        r = subprocess.run([sys.executable, "-m", "vgw", "doctor", "--config", str(cfg)], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
        lines = [x for x in r.stdout.splitlines() if x.split()[1:2] == ["can"]]
        assert len(lines) == 1, r.stdout + r.stderr
        return lines[0]

    line = can_line()  # the pty is root's, mode 0620: the agent's user cannot open it
    assert line.startswith("FAIL") and pty_adapter in line and f"uid {SERVICE}" in line, line
    assert "Permission denied" in line, line
    os.chown(pty_adapter, SERVICE, -1)
    line = can_line()
    assert line.startswith("PASS") and f"uid {SERVICE}" in line, line
