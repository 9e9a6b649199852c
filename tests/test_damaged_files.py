"""Damaged files give a clear answer, never a loop or a traceback (docs/guarantees.md, "Damaged files"):
a trace with damaged lines is replayed once, each frame time sent once, and `replay_exit` ends the process; a
looped replay never repeats a frame time; a consent document with an impossible `iat`/`exp` is rejected and
the commands that print times survive any cached value."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import can
import pytest
from vgw.sources.canmsg import frame_of
from vgw.sources.replay import ReplaySource
from vgw_sim.can_sim import CanSimulator
from vgw_sim.paths import default_dbc
from vgw_sim.vehicle import VehicleModel

from tests.agentkit import Authority, agent_process, vgw, write_config

DEV = "dev-0002"
START = 1_790_000_000.0
SPEED_ID = 0xC8  # VehicleDynamics in dbc/vehicle.dbc


def record(path: Path, seconds: float) -> list[str]:
    CanSimulator(default_dbc(), VehicleModel(seed=3, start_time=START)).record(path, seconds, start_time=START)
    return path.read_text().splitlines(keepends=True)


def damage(path: Path, lines: list[str], bad: dict[int, str]) -> None:
    """Replace the (0-based) lines in ``bad`` and write the trace back."""
    out = list(lines)
    for i, text in bad.items():
        out[i] = text
    path.write_text("".join(out))


def drain(src: ReplaySource, limit: int = 1_000_000) -> list[can.Message]:
    frames = []
    while not src.finished and len(frames) < limit:
        msg = src.recv(0.05)
        if msg is not None:
            frames.append(msg)
    return frames


# ---------------------------------------------------------------- the trace reader


GARBLED = ["(1790000001.5 can0 0C8#00\n", "\x00\xff\xfe garbage\n", "(1790000001.500000) can0 0C8#0\n",
           "(nan) can0 0C8#0011\n", "(1790000001.500000) can0 ZZZ#00\n", "(1790000001.500000) can0\n",
           "(1790000001.500000) can0 0C8#" + "00" * 9 + "\n", "x" * 100_000 + "\n"]


@pytest.mark.parametrize("bad", GARBLED, ids=range(len(GARBLED)))
def test_a_damaged_line_is_skipped_and_named_once(tmp_path: Path, bad: str, caplog: pytest.LogCaptureFixture) -> None:
    trace = tmp_path / "drive.log"
    lines = record(trace, 1.0)
    middle = len(lines) // 2
    damage(trace, lines, {middle: bad, middle + 10: bad})
    caplog.set_level(logging.INFO, logger="vgw.sources.replay")
    src = ReplaySource(trace, rate=0)
    frames = drain(src)
    src.close()
    assert len(frames) == len(lines) - 2
    times = [(m.arbitration_id, m.timestamp) for m in frames]
    assert len(set(times)) == len(times), "a frame was delivered twice"
    assert src.lines_skipped == 2
    named = [r.getMessage() for r in caplog.records if f"drive.log:{middle + 1}:" in r.getMessage()]
    assert len(named) == 1, caplog.text
    assert f"drive.log:{middle + 11}" not in caplog.text  # the next damaged line is counted, not logged
    assert "2 damaged line(s) skipped" in caplog.text


def test_reader_gives_python_can_frames_for_a_good_trace(tmp_path: Path) -> None:
    trace = tmp_path / "drive.log"
    record(trace, 1.0)
    src = ReplaySource(trace, rate=0)
    ours = drain(src)
    src.close()
    theirs = list(can.LogReader(str(trace)))
    assert len(ours) == len(theirs) > 100
    for a, b in zip(ours, theirs, strict=True):  # what the collector reads of a frame (the channel: nothing)
        assert frame_of(a) == frame_of(b), (a, b)


def test_a_truncated_binary_trace_ends_without_restarting(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    trace = tmp_path / "drive.blf"
    CanSimulator(default_dbc(), VehicleModel(seed=3, start_time=START)).record(trace, 2.0, start_time=START)
    total = len(list(can.LogReader(str(trace))))
    data = bytearray(trace.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xA5  # garble one stretch in the middle of the compressed objects
    trace.write_bytes(bytes(data))
    src = ReplaySource(trace, rate=0)
    frames = drain(src)
    src.close()
    assert src.finished and len(frames) < total
    stamps = [m.timestamp for m in frames]
    assert len(set(stamps)) == len(stamps) or len(frames) == 0
    assert caplog.text.count("trace unreadable") <= 1


def test_a_looped_replay_never_repeats_a_frame_time(tmp_path: Path) -> None:
    trace = tmp_path / "drive.log"
    lines = record(trace, 0.5)
    damage(trace, lines, {5: "garbage\n"})
    n = len(lines) - 1
    src = ReplaySource(trace, rate=0, loop=True)
    frames = drain(src, limit=3 * n + 5)
    src.close()
    assert len(frames) == 3 * n + 5
    per_id: dict[int, list[float]] = {}
    for m in frames:
        per_id.setdefault(m.arbitration_id, []).append(m.timestamp)
    for ident, stamps in per_id.items():
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), hex(ident)
    # Every pass is the trace again, shifted: the first frame of pass 2 follows the last of pass 1.
    assert frames[n].timestamp > frames[n - 1].timestamp
    assert frames[n].data == frames[0].data and frames[n].arbitration_id == frames[0].arbitration_id
    assert src.lines_skipped == 1  # counted once, not once per pass


def test_an_empty_or_all_garbage_trace_ends_even_when_looping(tmp_path: Path) -> None:
    trace = tmp_path / "junk.log"
    trace.write_bytes(b"not a trace\n\xff\xfe\n" * 50)
    src = ReplaySource(trace, rate=0, loop=True)
    assert drain(src) == [] and src.finished
    assert src.lines_skipped == 100


# ---------------------------------------------------------------- end to end


def test_replay_exit_with_a_garbled_line_sends_each_frame_time_once_and_exits(tmp_path, pki, broker, cloud) -> None:
    trace = tmp_path / "drive.log"
    lines = record(trace, 3.0)
    middle = len(lines) // 2
    damage(trace, lines, {middle: "(1790000001.5 can0 0C8#garbled\n"})
    good_speed_times = sorted(float(line.split(")")[0][1:]) for i, line in enumerate(lines)
                              if i != middle and line.split()[2].startswith(f"{SPEED_ID:03X}#"))
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, device=DEV,
                       can={"replay": str(trace), "replay_rate": 0, "replay_exit": True, "reopen_s": 0.1})
    doc = tmp_path / "consent.jws"
    doc.write_text(auth.doc(DEV, {"g-r": ["read_speedometer"]}, ver=1))
    assert vgw("consent", "apply", "--config", str(cfg), str(doc)).returncode == 0
    cloud.add_recipient("g-r", auth.recipient("g-r"))
    with agent_process(cfg) as proc:
        try:
            rc: int | None = proc.wait(45)
        except subprocess.TimeoutExpired:  # the seen defect: the trace replayed again and again
            rc = None
        assert rc == 0, "vgw run with replay_exit did not end"
        stderr = proc.stderr.read() if proc.stderr else ""
    assert stderr.count(f"drive.log:{middle + 1}:") == 1, stderr
    assert "Traceback" not in stderr
    sent = [s.t for s in cloud.samples(DEV, "g-r") if s.path == "Vehicle.Speed"]
    assert len(sent) == len(set(sent)), "a frame time was sent more than once"
    assert sorted(sent) == pytest.approx(good_speed_times)


def test_replay_exit_with_a_trace_that_cannot_be_opened_ends_non_zero_naming_it(tmp_path, pki, broker) -> None:
    """A trace that cannot be opened at all (here a folder: OSError even as root) was retried every reopen_s
    forever, even with replay_exit: the run never ended."""
    trace = tmp_path / "drive.log"
    trace.mkdir()
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, device=DEV,
                       can={"replay": str(trace), "replay_rate": 0, "replay_exit": True, "reopen_s": 0.1})
    with agent_process(cfg) as proc:
        try:
            rc: int | None = proc.wait(30)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc is not None, "vgw run with replay_exit never ended on a trace it cannot open"
        stderr = proc.stderr.read() if proc.stderr else ""
    assert rc != 0 and "Traceback" not in stderr
    assert stderr.count(f"{trace}: cannot read trace") == 1, stderr


@pytest.mark.parametrize(("name", "kind"), [("drive.log", "fifo"), ("drive.log", "link-to-dev-zero"),
                                           ("drive.asc", "fifo"), ("drive.asc", "link-to-dev-zero")])
def test_replay_exit_with_a_trace_that_is_not_a_regular_file_ends_non_zero_at_once(tmp_path, pki, broker, name: str,
                                                                                     kind: str) -> None:
    """Before: a FIFO as the trace exited 0 (nothing replayed, as if the drive were empty) or blocked in open,
    and a link to /dev/zero was read for ever. A trace must be a regular file: exit 1 with one line, at once."""
    trace = tmp_path / name
    if kind == "fifo":
        os.mkfifo(trace)
    else:
        trace.symlink_to("/dev/zero")
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, device=DEV,
                       can={"replay": str(trace), "replay_rate": 0, "replay_exit": True, "reopen_s": 0.1})
    with agent_process(cfg) as proc:
        try:
            rc: int | None = proc.wait(30)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc is not None, "vgw run with replay_exit never ended on a trace that is not a regular file"
        stderr = proc.stderr.read() if proc.stderr else ""
    assert rc != 0 and "Traceback" not in stderr, stderr
    assert stderr.count(f"{trace}: cannot read trace: not a regular file") == 1, stderr


def test_a_trace_that_cannot_be_opened_is_retried_without_replay_exit(tmp_path: Path) -> None:
    """Without replay_exit the file may still appear (a mount, a copy in progress): the collector retries."""
    from vgw.base.errors import SourceEndedError, SourceOpenError

    folder = tmp_path / "drive.log"
    folder.mkdir()
    with pytest.raises(SourceOpenError) as exc:
        ReplaySource(folder, rate=0)
    assert not isinstance(exc.value, SourceEndedError)
    with pytest.raises(SourceEndedError, match=r"drive\.log: cannot read trace"):
        ReplaySource(folder, rate=0, exit_on_error=True)


# ---------------------------------------------------------------- consent times


@pytest.mark.parametrize("claim", [{"exp": 10**12}, {"exp": 2**63}, {"exp": 2**64}, {"exp": 10**30},
                                   {"iat": 0, "exp": 2**62}])
def test_a_consent_with_an_impossible_time_is_rejected(tmp_path: Path, pki, claim: dict[str, int]) -> None:
    import time

    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, 1, auth.trust, device=DEV, can={"channel": "unused"})
    claims = {"iat": int(time.time()) - 60, **claim}
    doc = tmp_path / "consent.jws"
    doc.write_text(auth.doc(DEV, {"g": ["read_speedometer"]}, ver=1, **claims))
    r = vgw("consent", "apply", "--config", str(cfg), str(doc))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "years 2000..9999" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0


def _status_file(cfg: Path) -> Path:
    from vgw.config.settings import load_config
    from vgw.daemon.agent import STATUS_FILE

    state_dir = load_config(cfg).state_dir
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return state_dir / STATUS_FILE


@pytest.mark.parametrize("live", ['{"last_publish": 1e300, "counters": {"x": 1}}', '{"last_publish": "soon"}',
                                  "[1, 2]", '{"counters": 5, "last_publish": -1e20}', "{not json"])
def test_status_survives_a_damaged_status_file(tmp_path: Path, pki, live: str) -> None:
    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, 1, auth.trust, device=DEV, can={"channel": "unused"})
    _status_file(cfg).write_text(live)
    r = vgw("status", "--config", str(cfg))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(vgw("status", "--json", "--config", str(cfg)).stdout)["device"] == DEV


@pytest.mark.parametrize("t", [2**63, 10**30, 1e300, float("nan"), float("inf"), -5.0, "x", None])
def test_report_formats_any_time(t: object) -> None:
    from vgw.ops.report import ConsentView, build_report, render_html, render_text

    entries = [{"event": "consent-applied", "t": t, "ver": 1, "grants": [{"id": "g", "scopes": ["read_fuel"]}]},
               {"event": "consent-rejected", "t": t, "ver": 2, "reason": "validity"},
               {"event": "erasure-done", "t": t, "grant": "g", "batches_deleted": 1}]
    view = ConsentView(ver=1, exp=t, expired=False, grants=({"id": "g", "scopes": ["read_fuel"]},))  # type: ignore[arg-type]
    report = build_report(device=DEV, entries=entries, counters={"first_sent:g": 2**70, "last_sent:g": 2**63},
                          outbox={}, consent=view, generated=1_790_000_000.0)
    assert "invalid time" in render_text(report) or t is None or isinstance(t, str)
    render_html(report)


@pytest.mark.parametrize("exp", [2**62, 2**64])
def test_show_status_report_survive_a_cached_document_with_an_impossible_expiry(tmp_path: Path, pki, exp: int) -> None:
    """A cache written before the date check (or by hand) must not crash the commands that print it."""
    import time

    from vgw.config.settings import load_config
    from vgw.state.consent.store import ConsentStore

    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, 1, auth.trust, device=DEV, can={"channel": "unused"})
    state_dir = load_config(cfg).state_dir
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ConsentStore(state_dir).write_token(auth.doc(DEV, {"g": ["read_speedometer"]}, ver=1,
                                                 iat=int(time.time()) - 60, exp=exp))
    for args in (["consent", "show"], ["status"], ["report"]):
        r = vgw(*args, "--config", str(cfg))
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
    shown = json.loads(vgw("consent", "show", "--json", "--config", str(cfg)).stdout)
    assert shown["version"] is None  # the cache no longer verifies: nothing is in force


@pytest.mark.parametrize("damage_bytes", [b"\xff\xfe\x00 not text\n", b"[1, 2]\n",
                                          b'{"n": 99, "t": 1e999, "event": "x"}\n',
                                          b'{"event": "consent-applied", "grants": 5}\n'])
def test_report_and_audit_survive_a_damaged_audit_log(tmp_path: Path, pki, damage_bytes: bytes) -> None:
    import time

    from vgw.config.settings import load_config

    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, 1, auth.trust, device=DEV, can={"channel": "unused"})
    doc = tmp_path / "consent.jws"
    doc.write_text(auth.doc(DEV, {"g": ["read_speedometer"]}, ver=1, iat=int(time.time()) - 60))
    assert vgw("consent", "apply", "--config", str(cfg), str(doc)).returncode == 0
    log = load_config(cfg).state_dir / "audit.log"
    with log.open("ab") as fh:
        fh.write(damage_bytes)
    r = vgw("report", "--json", "--config", str(cfg))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["audit"]["intact"] is False
    for args in (["report"], ["audit", "show"]):
        r = vgw(*args, "--config", str(cfg))
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
    r = vgw("audit", "verify", "--config", str(cfg))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "line 2" in r.stderr, r.stderr


@pytest.mark.parametrize("clock", ['{"floor": NaN, "max_ver": 0}', '{"floor": Infinity}', '{"floor": 1e300}',
                                   '{"floor": 1, "max_ver": 1e400}'])
def test_a_damaged_clock_file_falls_back_to_wall_time(tmp_path: Path, clock: str) -> None:
    """A corrupt clock.json only loses rollback protection (consent/store.py): never a NaN now, never a crash."""
    import math
    import time

    from vgw.state.consent.store import ConsentStore

    (tmp_path / "clock.json").write_text(clock)
    store = ConsentStore(tmp_path)
    now = store.now()
    assert math.isfinite(now) and abs(now - time.time()) < 60


@pytest.mark.parametrize("name", ["drive.blf", "drive.asc", "drive.trc", "drive.xyz"])
def test_a_trace_no_reader_can_start_on_ends_at_once(tmp_path: Path, name: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    trace = tmp_path / name
    trace.write_bytes(b"\x00\xffLOGG garbage header\xfe" * 8)
    src = ReplaySource(trace, rate=0, loop=True)
    assert drain(src) == [] and src.finished
    assert caplog.text.count(name) == 1, caplog.text


def test_a_frame_with_an_impossible_time_from_another_format_is_skipped(tmp_path: Path) -> None:
    trace = tmp_path / "drive.csv"
    with can.Logger(str(trace)) as out:
        for t in (START, float("nan"), 1e300, START + 1):
            out.on_message_received(can.Message(timestamp=t, arbitration_id=SPEED_ID, data=b"\x01\x02"))
    src = ReplaySource(trace, rate=0)
    frames = drain(src)
    src.close()
    assert [m.timestamp for m in frames] == [START, START + 1]
    assert src.lines_skipped == 2
