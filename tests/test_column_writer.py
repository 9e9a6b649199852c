"""The generated column writers (vgw.pipeline.router ``_column_writer``) against the per-value fast path.

A chunk of frames through :meth:`Pipeline.process_frames` with the column writers must leave exactly what the
same chunk leaves without them (``Pipeline._decode`` for every frame): the same columns in the same order, the
same batch counts and first times, the same counters (NaN/inf dropped and counted, short signals counted),
on the demo vehicle and on DBCs with many signals, multiplexing (cascaded too) and IEEE floats.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vgw.contract.consent.model import KEM_X25519, Grant, Recipient
from vgw.pipeline.catalogue import load_catalogue
from vgw.pipeline.router import Pipeline
from vgw.tools.bench.trace import synthetic_signal_map
from vgw_sim.paths import default_dbc, default_signal_map

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dbc" / "cantools"
DBCS = ["vehicle.dbc", "multiplex_2.dbc", "issue_184_extended_mux_cascaded.dbc", "floating_point.dbc",
        "floating_point_use_float.dbc"]
EXAMPLES = int(os.environ.get("VGW_HYPOTHESIS_EXAMPLES", "25"))


_CATALOGUES: dict[str, Any] = {}


def _shared_catalogue(name: str, tmp_path_factory: Any) -> Any:
    """One catalogue per DBC for every example of the property (loading vehicle.dbc took most of its time)."""
    if name not in _CATALOGUES:
        _CATALOGUES[name] = _catalogue(name, tmp_path_factory.mktemp("map"))
    return _CATALOGUES[name]


def _catalogue(name: str, tmp: Path) -> Any:
    if name == "demo":
        return load_catalogue([default_dbc()], default_signal_map())
    dbc = SHARED / name
    if not dbc.exists():
        pytest.skip(f"{dbc} not present")
    smap = tmp / f"{name}.toml"
    smap.write_text(synthetic_signal_map(cantools.database.load_file(str(dbc), strict=False)))
    return load_catalogue([dbc], smap, strict=False)


def _grants(catalogue: Any, split: int) -> tuple[Grant, ...]:
    scopes = sorted({s.scope for s in catalogue.specs})
    rcpt = Recipient(KEM_X25519, b"\x09" * 32)
    return (Grant("all", "c", "p", tuple(scopes), rcpt),
            Grant("some", "c", "p", tuple(scopes[split % len(scopes)::2]), rcpt))


def _frames(catalogue: Any, rnd: random.Random, n: int) -> list[tuple[float, int, bool, bytes, int]]:
    messages = list(catalogue.messages.values())
    out = []
    t = 1_700_000_000.0 + rnd.random()
    for _ in range(n):
        m = rnd.choice(messages)
        length = m.length if rnd.random() < 0.85 else rnd.randrange(0, 9)
        data = bytes(rnd.getrandbits(8) for _ in range(length))
        if rnd.random() < 0.1 and length >= 8:  # IEEE NaN / inf patterns
            data = rnd.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff"]) * 2 + data[8:]
        t += rnd.random() * 0.01
        out.append((t, m.frame_id, bool(m.is_extended_frame), data, 0))
    return out


def _state(p: Pipeline) -> Any:
    return ({gid: (b.cols, b.count, b.first_t, list(b.cols)) for gid, b in p.batches.items()}, dict(p.counters))


@pytest.mark.parametrize("name", ["demo", *DBCS])
@given(seed=st.integers(0, 2**32), split=st.integers(0, 3))
@settings(max_examples=EXAMPLES, deadline=None)
def test_column_writers_agree_with_the_per_value_path(name: str, seed: int, split: int, tmp_path_factory: Any) -> None:
    catalogue = _shared_catalogue(name, tmp_path_factory)
    grants = _grants(catalogue, split)
    fast, slow = Pipeline(catalogue), Pipeline(catalogue)
    fast.swap(grants)
    slow.swap(grants)
    slow.router.writers.clear()
    frames = _frames(catalogue, random.Random(seed), 400)
    errors: list[Exception] = []
    for i in range(0, len(frames), 64):
        fast.process_frames(frames[i:i + 64], errors.append)
        slow.process_frames(frames[i:i + 64], errors.append)
    assert not errors
    assert _state(fast) == _state(slow)


def test_the_column_writers_are_used(tmp_path: Path) -> None:
    """Every message of vehicle.dbc with every signal consented to grants without limits gets one."""
    catalogue = _catalogue("vehicle.dbc", tmp_path)
    p = Pipeline(catalogue)
    p.swap(_grants(catalogue, 0))
    assert p.router.writers and set(p.router.writers) == set(p.router.decoders)


def test_a_consent_change_compiles_no_column_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A revocation rebuilds the router under the agent lock: writers are generated at a message's first
    frame, not there (a DBC with hundreds of messages would lengthen the revocation)."""
    import vgw.pipeline.router as router

    compiled: list[str] = []
    real = router.compile_sink
    monkeypatch.setattr(router, "compile_sink", lambda dec, *a, **k: compiled.append(dec.name) or real(dec, *a, **k))
    catalogue = _catalogue("vehicle.dbc", tmp_path)
    p = Pipeline(catalogue)
    grants = _grants(catalogue, 0)
    p.swap(grants)
    p.swap(grants[:1])
    assert compiled == []
    frames = _frames(catalogue, random.Random(3), 50)
    p.process_frames(frames, pytest.fail)
    assert compiled and len(compiled) == len(set(compiled))  # once per message that arrived
