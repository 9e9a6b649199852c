"""`vgw bench` phase 2: cantools decoding next to vgw's compiled decoders, and the naive agent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vgw.tools.bench.report import Progress

_CHUNK = 20_000


# ---------------------------------------------------------------- phase 2: decoding


def _read_chunks(trace: Path) -> Iterator[list[tuple[int, bool, bytes]]]:
    import can

    chunk: list[tuple[int, bool, bytes]] = []
    for msg in can.LogReader(str(trace)):
        chunk.append((msg.arbitration_id, msg.is_extended_id, bytes(msg.data)))
        if len(chunk) >= _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def bench_decode(db: Any, trace: Path, frames: int, progress: Progress) -> dict[str, Any]:
    """cantools vs compiled decoders (every signal) on in-memory frames, and the naive agent end to end."""
    import can

    from vgw.pipeline.decoder import MessageDecoder

    # cantools keys an extended id that fits in 11 bits apart from the standard one (force_extended_id).
    by_id = {(m.frame_id, m.is_extended_frame): m for m in db.messages}
    compiled = {key: MessageDecoder(m, [(s.name, s.name) for s in m.signals]) for key, m in by_id.items()}
    decode = db.decode_message
    t_cantools = t_vgw = 0.0
    signals_cantools = signals_vgw = errors = done = 0
    for chunk in _read_chunks(trace):
        t = time.perf_counter()
        for fid, ext, data in chunk:
            try:
                signals_cantools += len(decode(fid, data, decode_choices=False, allow_truncated=True,
                                               force_extended_id=ext))
            except Exception:
                errors += 1
        t_cantools += time.perf_counter() - t
        t = time.perf_counter()
        for fid, ext, data in chunk:
            dec = compiled.get((fid, ext))
            if dec is not None:
                signals_vgw += len(dec.decode(data)[0])
        t_vgw += time.perf_counter() - t
        done += len(chunk)
        progress.update(done / max(frames, 1) / 2, "decode only")
    # The naive agent: read the same trace with python-can and decode every frame with cantools.
    t = time.perf_counter()
    n = 0
    for msg in can.LogReader(str(trace)):
        try:
            decode(msg.arbitration_id, msg.data, decode_choices=False, allow_truncated=True,
                   force_extended_id=msg.is_extended_id)
        except Exception:  # noqa: S110 - counted in the decode-only pass above
            pass
        n += 1
        if n % _CHUNK == 0:
            progress.update(0.5 + n / max(frames, 1) / 2, "naive agent")
    t_naive = time.perf_counter() - t
    return {
        "frames": done,
        "cantools_decode_fps": done / t_cantools if t_cantools else 0.0,
        "vgw_decode_fps": done / t_vgw if t_vgw else 0.0,
        "decode_ratio": t_cantools / t_vgw if t_vgw else 0.0,
        "signals_cantools": signals_cantools,
        "signals_vgw": signals_vgw,
        "cantools_errors": errors,
        "naive_agent_fps": n / t_naive if t_naive else 0.0,
    }
