"""`vgw bench --drive-cycle`: bytes per hour per collection mode against raw streaming, on the demo drive."""

from __future__ import annotations

import json

from vgw.tools.bench.drive import drive_cycle

from tests.agentkit import vgw


def test_on_change_with_sensible_deadbands_sends_at_least_5x_fewer_bytes_than_raw() -> None:
    result = drive_cycle(300)
    g = result["grants"]
    raw = g["g-raw"]
    assert raw["samples"] > 10_000 and raw["bytes"] > 0
    # README "Collection rules": the target for speed, fuel and temperatures.
    assert raw["bytes"] >= 5 * g["g-on-change"]["bytes"]
    for gid in ("g-on-change", "g-periodic", "g-aggregate", "g-trigger"):
        assert 0 < g[gid]["bytes"] < raw["bytes"], gid
    # One summary per minute per path: 5 whole minutes (the drive starts on one) x 4 paths (speed, fuel, two temps).
    assert g["g-aggregate"]["samples"] == 5 * 4


def test_cli_drive_cycle_json() -> None:
    r = vgw("bench", "--drive-cycle", "--drive-seconds", "60", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["grants"]) == {"g-raw", "g-on-change", "g-periodic", "g-aggregate", "g-trigger"}
    bad = vgw("bench", "--drive-cycle", "--drive-seconds", "0")
    assert bad.returncode != 0 and "drive-seconds" in bad.stderr and "Traceback" not in bad.stderr
