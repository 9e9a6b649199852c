"""`vgw bench`: what a run is given: :class:`BenchOptions`, the bench device and the grants' scopes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEVICE = "bench-car-01"
TYPICAL_SCOPES = {
    # The demo's two apps: a fleet manager and an insurer (a few scopes each).
    "g-fleet": ["read_odometer", "read_fuel", "read_tires", "read_location"],
    "g-insurer": ["read_speedometer", "read_odometer", "read_battery"],
}
_PRIVACY_SCOPES = ("read_location", "read_compass")  # rate-limited by default: kept off synthetic maps


@dataclass(frozen=True)
class BenchOptions:
    frames: int = 300_000
    dbc: Path | None = None
    consent: str = "typical"  # or "all"
    rt_fps: float = 4000.0
    rt_seconds: float = 5.0
    revoke_rows: int = 100_000
    low_latency_interval_s: float = 0.05
    seed: int = 7
    rounds: int = 3  # the headline's alternating rounds
    rules_seconds: float = 75.0  # phase 6, demo vehicle only (0: skip): a 60 s history fills, then 15 s more
