"""`vgw bench`: reporting: the progress bar (:class:`vgw.tools.progress.Progress`), the targets a result meets, and
the human-readable table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vgw.tools.progress import Progress

__all__ = ["Progress", "format_table"]


def _targets(r: dict[str, Any]) -> dict[str, Any]:
    fp, rt, rv = r["full_path"], r["realtime"]["default"], r["revocation"]
    out: dict[str, Any] = {}
    # The full path against the naive agent (LogReader + cantools decode_message of every frame, sending
    # nothing) on the same trace: at least 2x with a typical consent, 1.5x with every signal consented.
    if r["consent"] == "typical":
        out["full_path_ge_2x_naive_agent"] = fp["ratio_vs_naive_agent"] >= 2.0
    else:
        out["full_path_ge_1_5x_naive_agent"] = fp["ratio_vs_naive_agent"] >= 1.5
    p99 = rt["latency"]["p99_ms"]
    out["p99_le_300ms_default"] = p99 is not None and p99 <= 300
    p99_ll = r["realtime"]["low_latency"]["latency"]["p99_ms"]
    out["p99_le_300ms_low_latency"] = p99_ll is not None and p99_ll <= 300
    out["rss_le_60mb"] = fp["peak_rss_mb"] <= 60
    out["cpu_le_10pct_at_4k"] = rt["cpu_pct_one_core"] is not None and rt["cpu_pct_one_core"] <= 10
    out["revocation_le_100ms"] = rv["key_destroyed_ms"] is not None and rv["key_destroyed_ms"] <= 100
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def format_table(r: dict[str, Any]) -> str:
    """The human-readable report."""
    d, fp, rv = r["decode"], r["full_path"], r["revocation"]
    lines = [
        f"vgw bench  dbc={Path(r['dbc']).name}  consent={r['consent']}  frames={r['trace']['frames']}"
        f"  ({r['cpu']}, Python {r['python']})",
        "",
        f"{'decode only (frames in memory)':<44}{'frames/s':>14}",
        f"  {'cantools decode_message, every signal':<42}{d['cantools_decode_fps']:>14,.0f}",
        f"  {'vgw compiled decoders, every signal':<42}{d['vgw_decode_fps']:>14,.0f}   x{d['decode_ratio']:.2f}",
        f"  {'naive agent: LogReader + cantools':<42}{d['naive_agent_fps']:>14,.0f}",
        "",
        "full path: replay -> decode -> policy -> batch -> HPKE -> outbox -> mTLS MQTT -> PUBACK",
        f"  {'frames/s (replay to end of trace)':<42}{fp['fps_ingest']:>14,.0f}"
        f"   x{fp['ratio_vs_cantools_decode']:.2f} cantools decode, x{fp['ratio_vs_naive_agent']:.2f} naive agent",
        f"  {'frames/s (to the last PUBACK)':<42}{fp['fps_to_last_puback']:>14,.0f}",
        f"  {'frames routed / samples / batches':<42}{fp['frames_routed']:>14,} / {fp['samples']:,} / {fp['batches']}",
        f"  {'CPU s (whole agent process) / peak RSS':<42}{fp['cpu_s']:>14} s / {fp['peak_rss_mb']} MB",
        "",
        "realtime: saturated bus (replay_rate 1)",
    ]
    for label, rt in r["realtime"].items():
        lat = rt["latency"]
        lines.append(f"  {label + ' (max_interval_s ' + str(rt['max_interval_s']) + ')':<42}"
                     f"{rt['fps']:>10,.0f} fps  CPU {rt['cpu_pct_one_core']}% of a core  "
                     f"frame->PUBACK p50 {lat['p50_ms']} ms  p99 {lat['p99_ms']} ms  (RSS {rt['peak_rss_mb']} MB)")
    if "rules" in r:
        from vgw.tools.bench.rules import format_rules

        lines += ["", format_rules(r["rules"])]
    lines += [
        "",
        f"revocation with {rv['rows']:,} buffered rows ({rv['row_bytes']} B each): key destroyed after "
        f"{rv['key_destroyed_ms']} ms, all rows erased after {rv['all_erased_ms']} ms (rows left {rv['rows_after']})",
        "",
        "targets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in r["targets"].items()),
    ]
    return "\n".join(lines)
