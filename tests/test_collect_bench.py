"""`vgw bench --drive-cycle`: bytes per hour per collection mode against raw streaming, on the demo drive; and
`vgw bench --rules`: the costliest rule document the agent accepts against none (no timing asserted: machines
vary; README "Performance" has the numbers)."""

from __future__ import annotations

import json

import pytest
from vgw.contract.rules import limits
from vgw.contract.rules.budget import document_usage
from vgw.contract.rules.rules import parse_rules
from vgw.tools.bench.drive import drive_cycle
from vgw.tools.bench.rules import SCOPES, worst_case_collect

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


@pytest.mark.parametrize("kind", ["work", "memory"])
def test_the_worst_case_documents_fill_their_budgets_and_fit_a_document(kind: str) -> None:
    collect = worst_case_collect(kind)
    use = document_usage([parse_rules(c, SCOPES) for c in collect])
    # Within both budgets, and so close to the one they fill that no further rule would fit.
    assert limits.MAX_WORK * 0.98 <= use.work <= limits.MAX_WORK
    assert use.held <= limits.MAX_HELD_SAMPLES
    if kind == "memory":
        assert use.held >= limits.MAX_HELD_SAMPLES * 0.9
    assert all(len(c) <= limits.MAX_RULES for c in collect)


def test_cli_rules_short_form() -> None:
    r = vgw("bench", "--rules", "--rules-seconds", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["rules"]
    assert {out[run]["exit_code"] for run in ("worst_work", "worst_memory", "no_rules")} == {0}
    for doc in out["documents"].values():
        assert doc["bytes"] <= 65_536 and doc["rules"] > 20
    # The work document holds nothing back: the agent sends what it sends without rules; the memory one holds
    # back both 100 Hz signals of every grant.
    assert out["worst_work"]["samples_sent"] == out["no_rules"]["samples_sent"] > out["worst_memory"]["samples_sent"]
    for run in ("worst_work", "worst_memory", "no_rules"):
        assert out[run]["cpu_us_per_sample"] > 0 and out[run]["peak_rss_mb"] > 0
    table = vgw("bench", "--rules", "--rules-seconds", "1")
    assert table.returncode == 0, table.stderr
    for text in ("work budget full", "memory budget full", "per decoded sample", "peak RSS", "targets:"):
        assert text in table.stdout
