"""Fuzzing the file readers (docs/guarantees.md, "Damaged files"): the candump trace reader and the config
loader get random, truncated and garbled input; nothing but the documented outcome escapes (a frame or a
damaged-line report; a ConfigError), and memory stays bounded however long a line or a file is.

Bounded for CI (hypothesis ``max_examples`` small); the ``slow`` variants run many more with ``--runslow``.
"""

from __future__ import annotations

import io
import math
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import can
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vgw.base.errors import ConfigError
from vgw.base.fsutil import MAX_CONFIG_BYTES
from vgw.base.timefmt import LATEST_TIME
from vgw.config.settings import load_config
from vgw.sources.candump import MAX_LINE_BYTES, DamagedLine, LineError, parse_line, read_frames
from vgw.sources.replay import ReplaySource
from vgw_sim.paths import default_dbc, default_signal_map

from tests.agentkit import vgw

# Bounded for CI; raise it for a long run: VGW_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_files.py
FAST = settings(max_examples=int(os.environ.get("VGW_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))

GOOD_LINES = [
    "(1790000000.000000) can0 0C8#1122334455667788 R",
    "(1790000000.020000) can0 18FF0120#00112233",
    "(1790000000.040000) vcan1 123#R",
    "(1790000000.060000) can0 123#R4 T",
    "(1790000000.080000) can0 20000080#",
    "(1790000000.100000) can0 0C8##3" + "00" * 12,
    "(1790000000.120000) 2 7FF#",
    "(1790000000.140000) can0 0C8#1122334455667788_A",
]


def _check_frame(msg: can.Message | None) -> None:
    """What a frame the reader lets through may hold: nothing that could upset decode, policy or JSON."""
    if msg is None:
        return
    assert math.isfinite(msg.timestamp) and 0 <= msg.timestamp <= LATEST_TIME
    if msg.is_error_frame:
        return
    assert 0 <= msg.arbitration_id <= (0x1FFFFFFF if msg.is_extended_id else 0x7FF)
    assert len(msg.data) <= (64 if msg.is_fd else 8)


def _mutate(text: str, data: st.DataObject) -> str:
    """Truncate, delete, insert or replace at random points (a few times)."""
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["truncate", "delete", "insert", "replace"]))
        piece = data.draw(st.text(max_size=6))
        if op == "truncate":
            text = text[:i]
        elif op == "delete":
            text = text[:i] + text[i + 1:]
        elif op == "insert":
            text = text[:i] + piece + text[i:]
        else:
            text = text[:i] + piece + text[i + len(piece):]
    return text


# ---------------------------------------------------------------- the trace reader


def _parse_any(text: str) -> None:
    try:
        _check_frame(parse_line(text))
    except LineError:
        pass


@FAST
@given(st.text(max_size=200))
def test_parse_line_random_text(text: str) -> None:
    _parse_any(text)


@FAST
@given(st.data())
def test_parse_line_garbled_good_lines(data: st.DataObject) -> None:
    _parse_any(_mutate(data.draw(st.sampled_from(GOOD_LINES)), data))


def _read_all(blob: bytes) -> tuple[int, int]:
    frames = damaged = 0
    for item in read_frames(io.BytesIO(blob)):
        if isinstance(item, DamagedLine):
            damaged += 1
            assert item.number >= 1
        else:
            _check_frame(item)
            frames += 1
    return frames, damaged


@FAST
@given(st.binary(max_size=2000))
def test_read_frames_random_bytes(blob: bytes) -> None:
    frames, damaged = _read_all(blob)
    assert frames + damaged <= blob.count(b"\n") + 1


@FAST
@given(st.data())
def test_read_frames_truncated_and_garbled_traces(data: st.DataObject) -> None:
    lines = data.draw(st.lists(st.sampled_from(GOOD_LINES), min_size=1, max_size=20))
    text = _mutate("\n".join(lines) + "\n", data)
    _read_all(text.encode("utf-8", "surrogatepass"))


_messages = st.builds(
    lambda ext, ident, data, t, fd: can.Message(
        timestamp=t, arbitration_id=ident & (0x1FFFFFFF if ext else 0x7FF), is_extended_id=ext,
        data=data if not fd else data + bytes(12 - len(data)) if len(data) > 8 else data, is_fd=fd, channel="can0"),
    st.booleans(), st.integers(0, 0x1FFFFFFF), st.binary(max_size=8), st.floats(0, 4e9), st.booleans())


@FAST
@given(st.lists(_messages, min_size=1, max_size=20))
def test_reader_agrees_with_python_can_on_valid_traces(msgs: list[can.Message]) -> None:
    buf = io.StringIO()
    writer = can.CanutilsLogWriter(buf)
    for m in msgs:
        writer.on_message_received(m)
    text = buf.getvalue()
    theirs = list(can.CanutilsLogReader(io.StringIO(text)))
    ours = [m for m in read_frames(io.BytesIO(text.encode())) if not isinstance(m, DamagedLine)]
    assert len(ours) == len(theirs) == len(msgs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.equals(b, timestamp_delta=1e-6), (a, b)


def _peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_endless_line_costs_bounded_memory(tmp_path: Path) -> None:
    trace = tmp_path / "huge.log"
    with trace.open("wb") as fh:
        fh.write(GOOD_LINES[0].encode() + b"\n")
        chunk = b"A" * (1024 * 1024)
        for _ in range(32):  # one 32 MiB line
            fh.write(chunk)
        fh.write(b"\n" + GOOD_LINES[1].encode() + b"\n")

    def replay() -> None:
        src = ReplaySource(trace, rate=0)
        got = []
        while not src.finished:
            m = src.recv(0.01)
            if m is not None:
                got.append(m)
        src.close()
        assert len(got) == 2 and src.lines_skipped == 1

    assert _peak_bytes(replay) < 2 * 1024 * 1024 + 64 * MAX_LINE_BYTES


@FAST
@given(st.binary(max_size=3000))
def test_replay_source_on_random_files_ends_cleanly(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    for suffix in (".log", ".asc", ".blf", ".trc", ".csv"):
        trace = tmp_path_factory.mktemp("fz") / f"t{suffix}"
        trace.write_bytes(blob)
        try:
            src = ReplaySource(trace, rate=0, loop=True)
        except Exception as exc:  # only the documented open error may escape
            from vgw.base.errors import SourceOpenError

            assert isinstance(exc, SourceOpenError), repr(exc)
            continue
        n = 0
        while not src.finished and n < 500:
            m = src.recv(0.01)
            if m is not None:
                n += 1
        src.close()


# ---------------------------------------------------------------- the config loader


@pytest.fixture(scope="module")
def base_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("cfg")
    pem = folder / "x.pem"
    pem.write_text("not used\n")
    text = f"""[device]
id = "dev-0001"
state_dir = "state"

[can]
interface = "virtual"
channel = "vcan-fuzz"
dbc = ["{default_dbc()}"]
signal_map = "{default_signal_map()}"
replay_rate = 1.0
reopen_s = 2.0

[mqtt]
host = "localhost"
port = 8883
ca_file = "x.pem"
cert_file = "x.pem"
key_file = "x.pem"
backoff_min_s = 0.2

[consent]
trust_keys = ["x.pem"]

[batch]
max_samples = 100
max_interval_s = 0.2

[outbox]
quota_bytes = 100000
"""
    load_config(_write(folder, text))  # the base is valid
    return folder, text


def _write(folder: Path, text: str | bytes) -> Path:
    p = folder / "vgw.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return p


def _load_any(folder: Path, text: str | bytes) -> None:
    try:
        load_config(_write(folder, text))
    except ConfigError as exc:
        assert "\n" not in str(exc).strip() and len(str(exc)) < 600, str(exc)


NASTY_VALUES = ["nan", "inf", "-inf", "1e400", "-0.0", "99999999999999999999999", "-1", "0", "true", '""',
                '"\\u0000"', '"~nosuchuser-vgw/x"', '"' + "a" * 5000 + '"', "[" * 300 + "]" * 300, "[]", "{}",
                '"/dev/zero"', '"."', "{ a = 1 }", '[1, "a"]', "1979-05-27T07:32:00Z", '"auto"']


@FAST
@given(st.data())
def test_config_with_a_nasty_value_in_any_key(base_config: tuple[Path, str], data: st.DataObject) -> None:
    folder, text = base_config
    lines = text.splitlines()
    keyed = [i for i, line in enumerate(lines) if " = " in line]
    i = data.draw(st.sampled_from(keyed))
    value = data.draw(st.sampled_from(NASTY_VALUES) | st.text(max_size=20).map(lambda t: '"' + t.replace(
        "\\", "\\\\").replace('"', '\\"') + '"'))
    lines[i] = lines[i].split(" = ")[0] + " = " + value
    _load_any(folder, "\n".join(lines) + "\n")


@FAST
@given(st.data())
def test_config_truncated_and_garbled(base_config: tuple[Path, str], data: st.DataObject) -> None:
    folder, text = base_config
    _load_any(folder, _mutate(text, data))


@FAST
@given(st.binary(max_size=500) | st.text(max_size=300))
def test_config_random_input(tmp_path_factory: pytest.TempPathFactory, blob: bytes | str) -> None:
    _load_any(tmp_path_factory.mktemp("cfg"), blob)


def test_config_of_unbounded_size_or_kind_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    with big.open("wb") as fh:
        fh.write(b"# " + b"x" * (64 * 1024 * 1024) + b"\n")
    for target, why in ((big, "more than the"), (Path("/dev/zero"), "not a regular file"), (tmp_path, "regular")):
        def load(target: Path = target, why: str = why) -> None:
            with pytest.raises(ConfigError, match=why):
                load_config(target)
        assert _peak_bytes(load) < MAX_CONFIG_BYTES * 3
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)  # refused at once: a FIFO with no writer must not hang the agent


@pytest.mark.parametrize("edit", [("replay_rate = 1.0", "replay_rate = nan"), ("reopen_s = 2.0", "reopen_s = inf"),
                                  ('state_dir = "state"', 'state_dir = "a\\u0000b"'),
                                  ("[batch]", "[batch]\nx = " + "[" * 2000 + "]" * 2000),
                                  ('state_dir = "state"', 'state_dir = "~nosuchuser-vgw/s"')])
def test_vgw_run_with_a_bad_config_prints_one_line(base_config: tuple[Path, str], tmp_path: Path,
                                                   edit: tuple[str, str]) -> None:
    folder, text = base_config
    bad = folder / "bad.toml"
    bad.write_text(text.replace(*edit))
    r = vgw("run", "--config", str(bad), timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and str(bad) in r.stderr, r.stderr


# ---------------------------------------------------------------- long runs


@pytest.mark.slow
@LONG
@given(st.data())
def test_slow_trace_lines(data: st.DataObject) -> None:
    _parse_any(_mutate(data.draw(st.sampled_from(GOOD_LINES)), data))
    _read_all(data.draw(st.binary(max_size=5000)))


@pytest.mark.slow
@LONG
@given(st.data())
def test_slow_config(base_config: tuple[Path, str], data: st.DataObject) -> None:
    folder, text = base_config
    _load_any(folder, _mutate(text, data))


# ---------------------------------------------------------------- the privacy report over a damaged audit log


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
_EVENTS = ["consent-applied", "consent-rejected", "consent-expired", "grant-stopped", "erasure-done",
           "retention-delete", "unreadable"]
_entry = st.fixed_dictionaries(
    {"event": st.sampled_from(_EVENTS)},
    optional={k: _json for k in ("t", "ver", "grant", "grants", "reason", "exp", "batches_deleted", "source")}
    | {"grants": _json | st.lists(st.fixed_dictionaries({}, optional={"id": _json | st.just("g"), "scopes": _json,
                                                                       "controller": _json, "purpose": _json}),
                                  max_size=3)})


@FAST
@given(st.lists(_entry, max_size=12), st.dictionaries(st.sampled_from(["sent_batches:g", "sent_samples:g",
                                                                        "first_sent:g", "last_sent:g",
                                                                        "retention_deleted:g"]), st.integers()))
def test_report_builds_and_renders_from_any_audit_entries(entries: list[dict[str, object]],
                                                          counters: dict[str, int]) -> None:
    import json

    from vgw.ops.report import build_report, render_html, render_text

    report = build_report(device="dev-0001", entries=entries, counters=counters, outbox={}, consent=None,
                          audit_ok=False, audit_problem="line 1: not JSON", generated=1_790_000_000.0)
    render_text(report)
    render_html(report)
    json.dumps(report)
