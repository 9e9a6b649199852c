"""`vgw bench` phase 4: frame-to-arrival latency of the realtime runs, measured at the cloud peer."""

from __future__ import annotations

from typing import Any

from vgw.tools.bench.options import DEVICE


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def _latencies(cloud: Any, replay_start: list[float] | None) -> dict[str, Any]:
    """Frame-to-arrival latency of every sample the peer received (frame time mapped to wall time)."""
    if not replay_start:
        return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    wall0, trace0 = replay_start
    lat = [(s.arrived - (wall0 + (s.t - trace0))) * 1000.0 for s in cloud.samples(DEVICE)]
    return {"samples": len(lat), "p50_ms": round(_percentile(lat, 0.50), 1),
            "p99_ms": round(_percentile(lat, 0.99), 1), "max_ms": round(max(lat), 1) if lat else None}
