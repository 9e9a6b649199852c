"""Conformance of vgw's compiled decoders with cantools, shared by the corpus tests (test_decoder.py over
the shared DBCs, test_decoder_corpus.py over public DBCs fetched at test time).

Reference: ``Message.decode(data, decode_choices=False, allow_truncated=True)``, over random payloads of the
message length, shorter and longer, with multiplexer selectors steered to their listed ids most of the time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import cantools
from cantools.database.can.message import Message
from cantools.database.errors import DecodeError
from hypothesis import strategies as st
from vgw.pipeline.decoder import FieldLayout, MessageDecoder

CACHE = Path(os.environ.get("VGW_TEST_CORPUS", Path(tempfile.gettempdir()) / "vgw-test-corpus"))


def fetch_sdist_files(requirement: str, keep: Callable[[str], bool]) -> Path | None:
    """The files of ``requirement``'s source distribution (``name==version``) whose path in the archive
    ``keep`` accepts, downloaded once per machine (``pip download``) into a cache folder outside the repository
    and flattened into one folder; None when the package registry cannot be reached."""
    target = CACHE / requirement.replace("==", "-")
    if (target / "done").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              requirement, "-d", work], capture_output=True, timeout=180)
        sdists = list(Path(work).glob("*.tar.gz"))
        if got.returncode != 0 or not sdists:
            return None
        staged = Path(work) / "files"
        staged.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and keep(member.name):
                    source = tar.extractfile(member)
                    assert source is not None
                    (staged / Path(member.name).name).write_bytes(source.read())
        (staged / "done").write_text("")
        try:
            staged.rename(target)
        except OSError:
            pass  # another worker got there first
    return target if (target / "done").exists() else None


def loadable(paths: list[str]) -> list[str]:
    """The DBC files among ``paths`` that cantools loads leniently with at least one decodable message.

    Parsing every file costs seconds and pytest collects in each xdist worker, so the answer is kept on disk,
    keyed by the files' names, sizes and times and by the cantools version: the first worker parses, the others
    read (tests that use a file still parse it themselves, through :func:`dbc_messages`)."""
    stamp = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    key = hashlib.sha256(json.dumps([cantools.__version__, stamp]).encode()).hexdigest()[:24]
    memo = Path(tempfile.gettempdir()) / f"vgw-test-loadable-{key}.json"
    try:
        return list(json.loads(memo.read_text()))
    except (OSError, ValueError):
        pass
    found = [p for p in paths if dbc_messages(p)]
    staged = memo.with_suffix(f".{os.getpid()}.tmp")
    staged.write_text(json.dumps(found))
    staged.replace(memo)  # atomic: a worker reads the whole list or none
    return found


@cache
def dbc_messages(path: str) -> tuple[Message, ...]:
    """The decodable messages of one DBC file loaded leniently (none if cantools cannot load it)."""
    try:
        db = cantools.database.load_file(path, database_format="dbc", strict=False, encoding="cp1252")
    except Exception:
        return ()
    return decodable_messages(db)


def decodable_messages(db: Any) -> tuple[Message, ...]:
    """The messages of a loaded database that cantools can decode at all (containers and empty ones left out)."""
    out = []
    for m in getattr(db, "messages", ()):
        if m.is_container or not m.signals or m.length <= 0:
            continue
        try:
            m.decode(bytes(m.length), decode_choices=False, allow_truncated=True)
        except DecodeError:
            pass  # a zero payload may select an unknown mux id; that is fine
        except Exception:  # noqa: S112
            continue  # cantools cannot decode this message at all: nothing to compare with
        out.append(m)
    return tuple(out)


def set_field(data: bytearray, layout: FieldLayout, value: int) -> None:
    """Write raw ``value`` into ``layout``'s bits of ``data`` (if it fits)."""
    lsb = layout.lsb(len(data))
    if lsb is None:
        return
    mask = ((1 << layout.length) - 1) << lsb
    value &= (1 << layout.length) - 1
    if layout.little_endian:
        n = int.from_bytes(data, "little")
        data[:] = ((n & ~mask) | (value << lsb)).to_bytes(len(data), "little")
    else:
        n = int.from_bytes(data, "big")
        data[:] = ((n & ~mask) | (value << lsb)).to_bytes(len(data), "big")


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def payload_for(draw: st.DrawFn, message: Message) -> bytes:
    data = bytearray(draw(st.binary(min_size=message.length, max_size=message.length)))
    if draw(st.integers(0, 9)) < 8:
        # Steer every selector (outermost first) to one of its ids, so multiplexed branches are decoded.
        by_name = {s.name: s for s in message.signals}
        for sig in message.signals:
            if sig.is_multiplexer:
                ids = sorted({i for s in message.signals if s.multiplexer_signal == sig.name
                              for i in (s.multiplexer_ids or ())})
                if ids:
                    set_field(data, FieldLayout.of(by_name[sig.name]), draw(st.sampled_from(ids)))
    size = draw(st.sampled_from(["dbc", "dbc", "dbc", "short", "long"]))
    if size == "short":
        return bytes(data[: draw(st.integers(0, max(message.length - 1, 0)))])
    if size == "long":
        return bytes(data) + bytes(draw(st.integers(1, 3)))
    return bytes(data)


def random_payload(rng: random.Random, message: Message) -> bytes:
    """:func:`payload_for` without hypothesis: for whole-corpus runs, where drawing through hypothesis is
    too slow (a corpus has thousands of messages)."""
    data = bytearray(rng.randbytes(message.length))
    if rng.randrange(10) < 8:
        by_name = {s.name: s for s in message.signals}
        for sig in message.signals:
            if sig.is_multiplexer:
                ids = sorted({i for s in message.signals if s.multiplexer_signal == sig.name
                              for i in (s.multiplexer_ids or ())})
                if ids:
                    set_field(data, FieldLayout.of(by_name[sig.name]), rng.choice(ids))
    size = rng.choice(["dbc", "dbc", "dbc", "short", "long"])
    if size == "short":
        return bytes(data[: rng.randrange(max(message.length, 1))])
    if size == "long":
        return bytes(data) + bytes(rng.randrange(1, 4))
    return bytes(data)


def mismatches(message: Message, payload: bytes, wanted: list[str] | None = None) -> list[str]:
    """How vgw's decoder of ``wanted`` signals (all by default) differs from cantools on ``payload``: one line
    per difference, empty when they agree (or cantools refuses the frame: then vgw must just not crash)."""
    names = list(dict.fromkeys(s.name for s in message.signals)) if wanted is None else wanted
    decoder = MessageDecoder(message, [(n, n) for n in names])
    values, short = decoder.decode(payload)
    got = dict(values)  # type: ignore[arg-type]
    g_values, g_short = decoder.decode_generic(payload)
    out = []
    if len(got) != len(values):
        out.append("a signal was reported twice")
    if g_short != short or set(dict(g_values)) != set(got):  # type: ignore[arg-type]
        out.append("the generated and the generic path differ")
    try:
        expected = message.decode(payload, decode_choices=False, allow_truncated=True)
    except DecodeError:
        return out
    want = {n: v for n, v in expected.items() if n in set(names)}
    out += [f"{message.name}.{n}: vgw {got.get(n, '-')!r}, cantools {want.get(n, '-')!r} (payload {payload.hex()})"
            for n in sorted(set(got) | set(want)) if n not in got or n not in want or not same(got[n], want[n])]
    return out


def check_message(message: Message, data: st.DataObject) -> None:
    """One drawn payload and signal subset of ``message``, compared with cantools."""
    payload = data.draw(st.composite(lambda d: payload_for(d, message))(), label=f"payload of {message.name}")
    names = list(dict.fromkeys(s.name for s in message.signals))  # a name may repeat across multiplexer branches
    subset = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)), label="subset")
    try:
        expected = message.decode(payload, decode_choices=False, allow_truncated=True)
    except DecodeError:
        expected = None  # e.g. a selector value the DBC does not list: cantools refuses the frame
    for wanted in (names, subset):
        decoder = MessageDecoder(message, [(n, n) for n in wanted])
        values, short = decoder.decode(payload)
        got = dict(values)  # type: ignore[arg-type]
        assert len(got) == len(values), "a signal was reported twice"
        assert short >= 0
        if expected is None:
            continue  # no reference; decoding it must simply not crash
        want = {n: v for n, v in expected.items() if n in set(wanted)}
        assert set(got) == set(want), f"{message.name}: signals {sorted(set(got) ^ set(want))} differ"
        for n in want:
            assert same(got[n], want[n]), f"{message.name}.{n}: {got[n]!r} != cantools {want[n]!r}"
        # The generated fast path and the generic path agree too.
        g_values, g_short = decoder.decode_generic(payload)
        assert dict(g_values) == got or all(same(dict(g_values)[k], got[k]) for k in got)  # type: ignore[arg-type]
        assert g_short == short


