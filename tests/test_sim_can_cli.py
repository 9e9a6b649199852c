"""`vgw sim can` in can-utils habits: the default output reaches another process (an SLCAN pty), stderr names
the [can] lines to paste, -i/-c/-b short flags, --link adapters for a second reader, --play like canplayer."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import can
import pytest
from vgw_sim.can_sim import CanSimulator
from vgw_sim.vehicle import VehicleModel

from tests.agentkit import ROOT, stop_process

FRAMES_PER_S = 213  # the demo vehicle's frame rate (dbc/vehicle.dbc cycle times)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        stop_process(p, 5)


def _sim(procs: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "vgw", "sim", "can", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(proc)
    return proc


def _read(path: str, seconds: float, *, first_timeout: float = 5.0) -> list[can.Message]:
    """Frames python-can's own slcan driver reads from ``path`` (what the agent does) for ``seconds``."""
    bus = can.Bus(interface="slcan", channel=path, bitrate=500000)
    try:
        first = bus.recv(timeout=first_timeout)
        assert first is not None, f"no frame from {path}"
        got = [first]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msg = bus.recv(timeout=0.2)
            if msg is not None:
                got.append(msg)
        return got
    finally:
        bus.shutdown()


def test_default_output_reaches_another_process_and_says_how(procs: list[subprocess.Popen[str]]) -> None:
    proc = _sim(procs, "--duration", "20")
    assert proc.stdout is not None and proc.stderr is not None
    path = proc.stdout.readline().strip()
    # README "The contract, in our words": the pty path is the first line of stdout.
    assert path.startswith("/dev/pts/"), path
    frames = _read(path, 1.0)
    assert len(frames) > 100
    proc.terminate()
    assert proc.wait(5) == 0
    err = proc.stderr.read()
    assert 'interface = "slcan"' in err and f'channel = "{path}"' in err and "bitrate = 500000" in err


def test_links_give_each_reader_its_own_adapter(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    agent_link, monitor_link = tmp_path / "can0", tmp_path / "can1"
    proc = _sim(procs, "-i", "slcan", "-b", "250000", "--link", str(agent_link), "--link", str(monitor_link),
                "--duration", "20")
    assert proc.stdout is not None and proc.stderr is not None
    paths = [proc.stdout.readline().strip(), proc.stdout.readline().strip()]
    assert [os.readlink(agent_link), os.readlink(monitor_link)] == paths and paths[0] != paths[1]
    # Two programs at once, each on its own adapter, both see the whole bus.
    a = can.Bus(interface="slcan", channel=str(agent_link), bitrate=500000)
    try:
        b = _read(str(monitor_link), 1.0)
        got_a = [m for _ in range(200) if (m := a.recv(timeout=0.2)) is not None]
    finally:
        a.shutdown()
    assert len(b) > 100 and len(got_a) > 100
    proc.terminate()
    assert proc.wait(5) == 0
    assert not agent_link.exists() and not os.path.lexists(monitor_link)  # links removed on exit
    assert f'channel = "{agent_link}"' in proc.stderr.read()


def _trace(tmp_path: Path, seconds: float) -> tuple[Path, int]:
    trace = tmp_path / "drive.log"
    n = CanSimulator(model=VehicleModel(seed=5)).record(trace, seconds)
    return trace, n


def test_play_keeps_the_trace_timing_like_canplayer(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    trace, n = _trace(tmp_path, 1.5)
    wanted = [(m.arbitration_id, bytes(m.data)) for m in can.LogReader(str(trace))]
    first_ts = [m.timestamp for m in can.LogReader(str(trace))]
    proc = _sim(procs, "--play", str(trace), "-l", "4")  # python-can sleeps 2 s after opening
    assert proc.stdout is not None
    path = proc.stdout.readline().strip()
    assert path.startswith("/dev/pts/")
    bus = can.Bus(interface="slcan", channel=path, bitrate=500000)
    got: list[tuple[float, tuple[int, bytes]]] = []
    try:
        while True:
            try:
                msg = bus.recv(timeout=0.5)
            except can.CanError:
                break  # the player finished and closed its pty
            if msg is not None:
                got.append((time.monotonic(), (msg.arbitration_id, bytes(msg.data))))
            elif proc.poll() is not None:
                break
    finally:
        with contextlib.suppress(can.CanError):
            bus.shutdown()
    assert proc.wait(10) == 0
    frames = [f for _, f in got]
    head = wanted[:10]
    starts = [i for i in range(len(frames) - 10) if frames[i:i + 10] == head]
    assert len(starts) >= 2, (len(frames), n, starts)  # passes 2 and 3 at least
    i, j = starts[-2], starts[-1]
    assert frames[i:j] == wanted  # one pass is the trace, frame for frame
    span, recorded = got[j][0] - got[i][0], first_ts[-1] - first_ts[0]
    assert recorded * 0.9 < span < recorded * 1.3 + 0.3, (span, recorded)  # with its timing


def test_play_waits_for_a_reader_of_the_pty(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    """`vgw sim can --play drive.log` started playing onto its new pty at once: a short trace was over (and
    reported as sent) before anybody could even learn the pty's path, so the agent read nothing of it."""
    trace, n = _trace(tmp_path, 1.0)
    wanted = [(m.arbitration_id, bytes(m.data)) for m in can.LogReader(str(trace))]
    proc = _sim(procs, "--play", str(trace))
    assert proc.stdout is not None and proc.stderr is not None
    path = proc.stdout.readline().strip()
    assert path.startswith("/dev/pts/")
    said = []
    for line in proc.stderr:  # the [can] hint, then the wait (the player is not done: the pipe stays open)
        said.append(line)
        if "--play waits until a reader" in line:
            break
    assert said and "--play waits until a reader" in said[-1], said
    bus = can.Bus(interface="slcan", channel=path, bitrate=500000)
    got: list[tuple[int, bytes]] = []
    try:
        while True:
            try:
                msg = bus.recv(timeout=0.5)
            except can.CanError:
                break  # the player finished and closed its pty
            if msg is not None:
                got.append((msg.arbitration_id, bytes(msg.data)))
            elif proc.poll() is not None:
                break
    finally:
        with contextlib.suppress(can.CanError):
            bus.shutdown()
    assert proc.wait(10) == 0
    assert got == wanted and len(got) == n


@pytest.mark.xdist_group("timing")  # asserts wall-clock bounds: runs alone in its group (README "Layout")
def test_play_fast_ignores_timestamps(tmp_path: Path) -> None:
    trace, n = _trace(tmp_path, 30.0)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vgw", "sim", "can", "-i", "virtual", "--play", str(trace),
                           "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"sent {n} frames" in done.stderr
    assert time.monotonic() - started < 25


def test_play_skips_a_damaged_line_like_canplayer(tmp_path: Path) -> None:
    """A damaged line in a candump trace is skipped and counted, as canplayer and the agent's replay skip it;
    the frames after it are still sent (it used to stop with 'ValueError: not enough values to unpack')."""
    trace, n = _trace(tmp_path, 2.0)
    lines = trace.read_text().splitlines()
    lines[len(lines) // 2: len(lines) // 2] = ["(17x) can0", "garbage line", "(1700000000.1) can0 123#zz"]
    trace.write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "vgw", "sim", "can", "-i", "virtual", "--play", str(trace),
                           "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"sent {n} frames" in done.stderr
    assert "skipped 3 damaged line(s)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (("-i", "socketcan", "-c", "vgwnope0"), "vgwnope0 not found"),
    (("--play", "nope.log"), "nope.log not found"),
    (("--play", "x.log", "-l", "0"), "--loop"),
    (("-i", "virtual", "--link", "x"), "--link"),
])
def test_bad_input_is_one_line(args: tuple[str, ...], needle: str) -> None:
    done = subprocess.run([sys.executable, "-m", "vgw", "sim", "can", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr
