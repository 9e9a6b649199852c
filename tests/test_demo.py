"""`vgw demo --json`: the whole system on one machine, checked, not just printed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.agentkit import ROOT


def test_demo_json_summary_holds_every_guarantee() -> None:
    r = subprocess.run([sys.executable, "-m", "vgw", "demo", "--duration", "10", "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["ok"] is True
    assert summary["undecryptable"] == 0 and summary["bad_receipts"] == 0
    grants = summary["grants"]
    assert set(grants) == {"g-fleet", "g-insurer"}
    for g in grants.values():
        assert g["samples_outside_consent"] == 0
        assert g["samples_after_revocation"] == 0
        assert g["seq_gaps"] == []
        assert sum(g["samples_by_path"].values()) > 0
    revoked = grants["g-insurer"]
    assert revoked["revoked"] is True
    assert revoked["erasure_receipt_verified"] is True
    assert revoked["erasure_receipt"]["key_destroyed"] is True
    assert revoked["outbox_rows_after_revocation"] == 0 and revoked["key_destroyed"] is True
    assert "Vehicle.Speed" in revoked["samples_by_path"]
    assert "Vehicle.Speed" not in grants["g-fleet"]["samples_by_path"]  # not in the fleet app's scopes
    assert grants["g-fleet"]["samples_after_other_revocation"] > 0  # the other grant kept flowing
    # The live view went to stderr; stdout is the JSON alone.
    assert "owner withdraws consent" in r.stderr


def test_demo_rejects_a_too_short_duration() -> None:
    r = subprocess.run([sys.executable, "-m", "vgw", "demo", "--duration", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "too short" in r.stderr and "Traceback" not in r.stderr
