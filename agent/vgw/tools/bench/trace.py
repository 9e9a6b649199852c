"""`vgw bench` phase 1: the trace (candump ``.log``) from a DBC, and a synthetic signal map for a foreign DBC."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vgw.base.errors import ConfigError
from vgw.tools.bench.options import _PRIVACY_SCOPES
from vgw.tools.bench.report import Progress

# ---------------------------------------------------------------- trace and signal map


def _vss_leaf(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9]", "", name) or "X"
    if not clean[0].isalpha():
        clean = "X" + clean
    return clean[0].upper() + clean[1:]


def synthetic_signal_map(db: Any, pinned: Mapping[tuple[str, str], str] | None = None) -> str:
    """Map every signal of ``db`` to the path ``Vehicle.Bench.<Msg>.<Sig>`` and a scope: the one ``pinned`` gives
    its (message, signal), else the other scopes round robin (the privacy scopes left out)."""
    from vgw.contract.scopes import SCOPES

    pinned = pinned or {}
    scopes = sorted(s for s in SCOPES if s not in _PRIVACY_SCOPES and s not in set(pinned.values()))
    lines = ["# written by `vgw bench`: every signal, synthetic VSS paths"]
    seen_paths: set[str] = set()
    i = 0
    for msg in db.messages:
        for sig in msg.signals:
            path = f"Vehicle.Bench.{_vss_leaf(msg.name)}.{_vss_leaf(sig.name)}"
            n = 2
            while path in seen_paths:
                path = f"Vehicle.Bench.{_vss_leaf(msg.name)}.{_vss_leaf(sig.name)}{n}"
                n += 1
            seen_paths.add(path)
            scope = pinned.get((msg.name, sig.name))
            if scope is None:
                scope = scopes[i % len(scopes)]
                i += 1
            lines += ["[[signal]]", f"message = {json.dumps(msg.name)}", f"signal = {json.dumps(sig.name)}",
                      f'path = "{path}"', f'scope = "{scope}"', ""]
    return "\n".join(lines)


def _random_frames(db: Any, seed: int, start: float) -> Iterator[tuple[float, int, bool, bytes]]:
    """Every message of ``db`` at its cycle time (100 ms if none), random payloads, forever."""
    import heapq

    rng = random.Random(seed)
    msgs = [m for m in db.messages if m.length > 0]
    if not msgs:
        raise ConfigError("DBC has no message with a payload")
    heap = [((i % (m.cycle_time or 100)), i) for i, m in enumerate(msgs)]
    heapq.heapify(heap)
    while True:
        due, i = heapq.heappop(heap)
        m = msgs[i]
        heapq.heappush(heap, (due + (m.cycle_time or 100), i))
        yield start + due / 1000.0, m.frame_id, m.is_extended_frame, rng.randbytes(min(m.length, 64))


def _sim_frames(dbc: Path, seed: int, start: float, all_messages: bool) -> Iterator[tuple[float, int, bool, bytes]]:
    from vgw_sim.can_sim import CanSimulator
    from vgw_sim.vehicle import VehicleModel

    sim = CanSimulator(dbc, VehicleModel(seed=seed), all_messages=all_messages)
    for m in sim.frames(None, start_time=start):
        yield m.timestamp, m.arbitration_id, m.is_extended_id, bytes(m.data)


def frame_source(dbc: Path, *, demo: bool, seed: int, start: float) -> Iterator[tuple[float, int, bool, bytes]]:
    """(t, id, extended, data) in time order, forever: the simulator, or random payloads if it cannot."""
    if demo:
        return _sim_frames(dbc, seed, start, all_messages=False)
    try:
        gen = _sim_frames(dbc, seed, start, all_messages=True)
        first = next(gen)
    except Exception:  # the simulator is strict (nested mux, odd DBCs): random payloads instead
        from vgw.pipeline.catalogue import load_dbc

        return _random_frames(load_dbc([dbc], strict=False), seed, start)

    def chain() -> Iterator[tuple[float, int, bool, bytes]]:
        yield first
        t = first[0]
        try:
            for frame in gen:
                t = frame[0]
                yield frame
        except Exception:  # a value the DBC cannot encode, met later in the drive: random payloads from here
            from vgw.pipeline.catalogue import load_dbc

            yield from _random_frames(load_dbc([dbc], strict=False), seed, t)

    return chain()


def write_trace(path: Path, frames: Iterator[tuple[float, int, bool, bytes]], count: int, *,
                time_scale: float = 1.0, progress: Progress | None = None) -> tuple[int, float]:
    """Write ``count`` frames as candump ``-L`` lines, time compressed by ``time_scale``.

    Returns (frames written, trace duration in seconds).
    """
    t0: float | None = None
    t_last = 0.0
    lines: list[str] = []
    n = 0
    with path.open("w", encoding="ascii", newline="\n") as fh:
        for t, ident, ext, data in frames:
            if n >= count:
                break
            if t0 is None:
                t0 = t
            t_last = t0 + (t - t0) / time_scale
            sep = "##1" if len(data) > 8 else "#"  # candump -L writes a CAN FD frame as ID##<flags><data>
            lines.append(f"({t_last:.6f}) can0 {ident:08X}{sep}{data.hex().upper()}\n" if ext
                         else f"({t_last:.6f}) can0 {ident:03X}{sep}{data.hex().upper()}\n")
            n += 1
            if len(lines) >= 8192:
                fh.writelines(lines)
                lines.clear()
                if progress is not None:
                    progress.update(n / count, f"{n} frames")
        fh.writelines(lines)
    return n, (t_last - t0) if t0 is not None else 0.0
