"""`vgw monitor`: the live view, driven in a real pseudo-terminal (README "Watching the signals"). It reads the
source and the consent in force itself, read-only; it follows a revocation; piped it prints plain periodic
tables; a serial adapter another process reads is refused; it never runs where stdout is the journal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import can
import pytest
from vgw_sim.broker import free_port
from vgw_sim.can_sim import CanSimulator
from vgw_sim.pki import TestPKI
from vgw_sim.vehicle import VehicleModel

from tests.agentkit import ROOT, Authority, stop_process, vgw, write_config

DEV = "dev-0001"
CLEAR = "\x1b[H\x1b[2J"


@pytest.fixture
def setup(tmp_path: Path, pki: TestPKI) -> tuple[Path, Authority]:
    trace = tmp_path / "drive.log"
    model = VehicleModel(seed=4)
    model.step(15.0)  # moving
    CanSimulator(model=model).record(trace, 20.0)
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"replay": str(trace), "replay_loop": True})
    return cfg, auth


def _apply(cfg: Path, auth: Authority, tmp_path: Path, grants: dict[str, list[str]]) -> None:
    doc = tmp_path / f"consent-{auth.ver + 1}.jws"
    doc.write_text(auth.doc(DEV, grants))
    r = vgw("consent", "apply", "--config", str(cfg), str(doc))
    assert r.returncode == 0, r.stderr


class Terminal:
    """A child process on a real pseudo-terminal (200 x 60 characters unless told); the screen is what it last
    drew."""

    def __init__(self, argv: list[str], columns: int = 200, lines: int = 60) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the monitor, with the pty as its terminal
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
            os.chdir(ROOT)
            env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
            os.execve(sys.executable, [sys.executable, *argv], env)  # noqa: S606 - a test child
        self.pid, self.fd = pid, fd
        self.output = ""

    def read(self, timeout: float = 0.2) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                self.output += os.read(self.fd, 65536).decode(errors="replace")
            except OSError:
                pass

    def screen(self) -> str:
        """The last complete screen (between two clears)."""
        frames = self.output.replace("\r\n", "\n").split(CLEAR)
        return frames[-2] if len(frames) >= 3 else ""

    def wait_screen(self, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read()
            if re.search(pattern, self.screen(), re.MULTILINE):
                return self.screen()
        raise AssertionError(f"screen never matched {pattern!r}; last screen:\n{self.screen()}")

    def exit_code(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError("monitor did not exit")

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture
def terminal() -> Iterator[list[Terminal]]:
    terms: list[Terminal] = []
    yield terms
    for t in terms:
        t.close()


def _row(path: str) -> str:
    return r"^" + re.escape(path) + r"\s+"


def test_live_view_in_a_pty_follows_the_consent(setup: tuple[Path, Authority], tmp_path: Path,
                                                terminal: list[Terminal]) -> None:
    cfg, auth = setup
    _apply(cfg, auth, tmp_path, {"g-speed": ["read_speedometer"]})
    term = Terminal(["-m", "vgw", "monitor", "--config", str(cfg), "--interval", "0.3"])
    terminal.append(term)
    screen = term.wait_screen(_row("Vehicle.Speed")
                              + r"read_speedometer\s+[0-9.]+ km/h\s+[1-9][0-9.]*/s\s+sent: g-speed$")
    assert re.search(r"consent v1, 1 grant\(s\)", screen)
    assert re.search(_row("Vehicle.TraveledDistance") + r"read_odometer\s+[0-9.]+ km\s+[0-9.]+/s\s+"
                     r"held: no grant holds read_odometer$", screen, re.MULTILINE), screen
    assert "Vehicle.CurrentLocation.Latitude" in screen  # every mapped signal has its row
    assert "VIN_MuxSelector" not in screen  # an unmapped signal is never decoded

    # The owner withdraws consent: the view follows the state directory while it runs.
    _apply(cfg, auth, tmp_path, {})
    screen = term.wait_screen(_row("Vehicle.Speed") + r".*held: no grant holds read_speedometer$")
    assert "consent v2, 0 grant(s)" in screen

    os.write(term.fd, b"q")
    assert term.exit_code() == 0


def test_location_limits_are_shown(setup: tuple[Path, Authority], tmp_path: Path, terminal: list[Terminal]) -> None:
    cfg, auth = setup
    doc = tmp_path / "loc.jws"
    doc.write_text(auth.doc(DEV, {"g-loc": ["read_location"]},
                            limits={"g-loc": {"read_location": {"max_hz": 0.2, "precision_m": 1000}}}))
    assert vgw("consent", "apply", "--config", str(cfg), str(doc)).returncode == 0
    term = Terminal(["-m", "vgw", "monitor", "--config", str(cfg), "--interval", "0.3"])
    terminal.append(term)
    term.wait_screen(_row("Vehicle.CurrentLocation.Latitude") + r".*sent: g-loc \(<= 0.2 Hz, 1000 m grid\)$")


def test_an_80_column_terminal_keeps_the_consent_column(setup: tuple[Path, Authority], tmp_path: Path,
                                                        terminal: list[Terminal]) -> None:
    """On an 80 x 24 SSH terminal the table was cut after the 64-character path column, so what consent does
    with a signal, the point of the view, was off screen, and rows beyond the 22nd vanished without a word."""
    cfg, auth = setup
    _apply(cfg, auth, tmp_path, {"g-speed": ["read_speedometer"]})
    term = Terminal(["-m", "vgw", "monitor", "--config", str(cfg), "--interval", "0.3"], columns=80, lines=24)
    terminal.append(term)
    screen = term.wait_screen(r"^\S*Row1\.Wheel\.Left\.Tire\.Pressure\s+[-0-9.]+(?: \S+)?\s+[0-9.]+/s\s+"
                              r"held: read_tires$")
    assert all(len(line) <= 80 for line in screen.splitlines()), screen
    assert len(screen.splitlines()) <= 24
    # The rows that do not fit are counted, not dropped silently.
    assert re.search(r"^\(\d+ more signal\(s\) below", screen, re.MULTILINE), screen


def test_piped_output_is_plain_periodic_tables(setup: tuple[Path, Authority], tmp_path: Path) -> None:
    cfg, auth = setup
    _apply(cfg, auth, tmp_path, {"g-speed": ["read_speedometer"]})
    r = subprocess.run([sys.executable, "-m", "vgw", "monitor", "--config", str(cfg), "--interval", "0.5",
                        "--duration", "2"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout
    assert r.stdout.count("--- ") >= 3
    assert re.search(_row("Vehicle.Speed") + r".*sent: g-speed$", r.stdout, re.MULTILINE)
    assert r.stderr == ""  # nothing logged, values least of all


def test_a_serial_adapter_read_by_another_process_is_refused(tmp_path: Path, pki: TestPKI) -> None:
    sim = subprocess.Popen([sys.executable, "-m", "vgw", "sim", "can", "--duration", "30"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert sim.stdout is not None
        path = sim.stdout.readline().strip()
        auth = Authority(tmp_path)
        cfg = write_config(tmp_path, pki, free_port(), auth.trust,
                           can={"interface": "slcan", "channel": path, "bitrate": 500000})
        reader = can.Bus(interface="slcan", channel=path, bitrate=500000)  # the agent, say
        try:
            r = vgw("monitor", "--config", str(cfg), "--duration", "1")
        finally:
            reader.shutdown()
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "already open in process" in lines[0] and "one reader" in lines[0]
        # Its own adapter (here: the same one, now free) works.
        r = vgw("monitor", "--config", str(cfg), "--duration", "3", "--interval", "2.5")
        assert r.returncode == 0, r.stderr
        assert re.search(_row("Vehicle.Speed") + r".*[1-9][0-9.]*/s", r.stdout, re.MULTILINE), r.stdout
    finally:
        stop_process(sim)


def test_refuses_to_print_values_into_the_journal(setup: tuple[Path, Authority]) -> None:
    cfg, _ = setup
    r = subprocess.run([sys.executable, "-m", "vgw", "monitor", "--config", str(cfg), "--duration", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30, env=dict(os.environ, INVOCATION_ID="x"))
    assert r.returncode == 1 and "journal" in r.stderr and r.stdout == ""


def test_j1939_frames_are_matched_by_pgn(tmp_path: Path, pki: TestPKI) -> None:
    dbc, signals = ROOT / "dbc" / "truck_j1939.dbc", ROOT / "dbc" / "truck_j1939_signals.toml"
    trace = tmp_path / "truck.log"
    r = vgw("sim", "can", "--dbc", str(dbc), "--record", str(trace), "--duration", "10")
    assert r.returncode == 0, r.stderr
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={
        "replay": str(trace), "replay_loop": True, "dbc": [str(dbc)], "signal_map": str(signals)})
    r = vgw("monitor", "--config", str(cfg), "--duration", "2.5", "--interval", "2.2")
    assert r.returncode == 0, r.stderr
    last = r.stdout.split("--- ")[-1]
    assert re.search(_row("Vehicle.Powertrain.CombustionEngine.Speed") + r"read_diagnostics\s+[0-9.]+ rpm\s+[1-9]",
                     last, re.MULTILINE), last
    assert re.search(_row("Vehicle.Speed") + r".*held: no consent in force$", last, re.MULTILINE), last


def test_j1939_transport_messages_are_reassembled() -> None:
    """A mapped J1939 message longer than 8 bytes travels by TP.BAM: the monitor showed nothing for it."""
    from vgw.ops.monitor import MonitorModel
    from vgw.pipeline.catalogue import catalogue_from_map, load_dbc
    from vgw.pipeline.j1939.ids import PGN_TP_CM, PGN_TP_DT, make_id, parse
    from vgw.pipeline.j1939.transport import CM_BAM

    dbc = ROOT.parent / "shared" / "data" / "dbc" / "cantools" / "variable_dlc.dbc"
    if not dbc.exists():
        pytest.skip(f"shared test DBCs not found: {dbc}")
    db = load_dbc([dbc], strict=False)
    msg = db.get_message_by_name("TestMessage2")
    cat = catalogue_from_map(db, {"signal": [{"message": "TestMessage2", "signal": s.name,
                                              "path": f"Vehicle.Bench.{s.name}", "scope": "read_diagnostics"}
                                             for s in msg.signals]}, Path("m.toml"))
    model = MonitorModel(cat)
    payload = bytes(range(1, 11))
    pgn = parse(msg.frame_id).pgn
    model.feed(make_id(PGN_TP_CM, 0x21, priority=7), bytes([CM_BAM, 10, 0, 2, 0xFF]) + pgn.to_bytes(3, "little"),
               True)
    model.feed(make_id(PGN_TP_DT, 0x21, priority=7), bytes([1]) + payload[:7], True)
    model.feed(make_id(PGN_TP_DT, 0x21, priority=7), bytes([2]) + payload[7:].ljust(7, b"\xff"), True)
    want = msg.decode(payload, decode_choices=False)
    assert {p.rsplit(".", 1)[1]: r.value for p, r in model.rows.items()} == want


def test_values_carry_their_dbc_units(setup: tuple[Path, Authority], tmp_path: Path) -> None:
    """`cantools monitor` shows each value with its unit from the DBC; vgw monitor showed bare numbers."""
    cfg, auth = setup
    _apply(cfg, auth, tmp_path, {"g-speed": ["read_speedometer"]})
    r = vgw("monitor", "--config", str(cfg), "--duration", "2.5", "--interval", "2.2")
    assert r.returncode == 0, r.stderr
    last = r.stdout.split("--- ")[-1]
    assert re.search(_row("Vehicle.Speed") + r"read_speedometer\s+[0-9.]+ km/h\s+[1-9][0-9.]*/s\s+sent: g-speed$",
                     last, re.MULTILINE), last
    assert re.search(_row("Vehicle.TraveledDistance") + r"read_odometer\s+[0-9.]+ km\s", last, re.MULTILINE), last


def test_bitrate_and_fd_options_open_the_bus_as_told(tmp_path: Path, pki: TestPKI) -> None:
    """Beside `-i/-c`, python-can's and candump's habits `-b/--bitrate` and `--fd`: the monitor opens the bus
    with them (the header says how it opened it); without them it keeps the config's."""
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": "mon-fd"})
    r = vgw("monitor", "--config", str(cfg), "-i", "virtual", "-c", "mon-fd-2", "-b", "250000", "--fd",
            "--duration", "1", "--interval", "0.5")
    assert r.returncode == 0, r.stderr
    assert "source virtual:mon-fd-2 250000 bit/s CAN FD" in r.stdout, r.stdout
    r = vgw("monitor", "--config", str(cfg), "--bitrate", "125000", "--duration", "1", "--interval", "0.5")
    assert r.returncode == 0, r.stderr
    assert "source virtual:mon-fd 125000 bit/s\n" in r.stdout or "source virtual:mon-fd 125000 bit/s " in r.stdout
    assert "CAN FD" not in r.stdout
    helped = vgw("monitor", "--help").stdout
    assert "-b BITRATE, --bitrate BITRATE" in helped and "--fd" in helped
