"""`vgw demo --json`: the whole system on one machine, checked, not just printed: with the owner's consent
service (its extra installed, as `make test` does) and without it (its Flask shadowed by a module that is not
there, as after a plain `pip install .`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.agentkit import ROOT


def _demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vgw", "demo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=env)


def _check_guarantees(summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The guarantees both kinds of demo hold; returns (the fleet app's grant, the insurer's, withdrawn)."""
    assert summary["ok"] is True
    assert summary["undecryptable"] == 0 and summary["bad_receipts"] == 0
    grants = summary["grants"]
    by_app = {g["app"]: g for g in grants.values()}
    assert set(by_app) == {"fleet", "insurer"}
    assert {by_app["fleet"]["controller"], by_app["insurer"]["controller"]} == {"com.example.fleet",
                                                                              "com.example.insurer"}
    for g in grants.values():
        assert g["samples_outside_consent"] == 0
        assert g["samples_after_revocation"] == 0
        assert g["seq_gaps"] == []
        assert sum(g["samples_by_path"].values()) > 0
    revoked = by_app["insurer"]
    assert grants[summary["revoked_grant"]] is revoked
    assert revoked["revoked"] is True
    assert revoked["erasure_receipt_verified"] is True
    assert revoked["erasure_receipt"]["key_destroyed"] is True
    assert revoked["erasure_receipt"]["grant"] == summary["revoked_grant"]
    assert revoked["outbox_rows_after_revocation"] == 0 and revoked["key_destroyed"] is True
    assert "Vehicle.Speed" in revoked["samples_by_path"]
    assert "Vehicle.Speed" not in by_app["fleet"]["samples_by_path"]  # not in the fleet app's scopes
    assert by_app["fleet"]["samples_after_other_revocation"] > 0  # the other grant kept flowing
    return by_app["fleet"], revoked


def test_demo_json_through_the_consent_service_holds_every_guarantee() -> None:
    """Both apps ask through OAuth 2.0, the owner allows and withdraws over the service's HTTP forms; the
    service signs every document the car holds, and its owner's page shows the car's erasure receipt."""
    r = _demo("--duration", "10", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # stdout is the JSON alone; the live view went to stderr
    fleet, _revoked = _check_guarantees(summary)
    service = summary["consent_service"]
    assert service["shown"] is True and service["url"].startswith("http://127.0.0.1:")
    assert service["owner_page_shows_erasure_receipt"] is True
    assert service["withdrawn_app_token_refused"] is True and service["other_app_token_valid"] is True
    # grant ids are the service's own, not the cloud peer's fixed ones
    assert set(summary["grants"]) & {"g-fleet", "g-insurer"} == set()
    # the service sets no limits of its own: the car's privacy defaults hold for the location
    assert fleet["limits"]["read_location"] == {"max_hz": 0.2, "precision_m": 100.0}
    # the URLs to open in a browser meanwhile, and the story told through the service
    assert f"the owner's page: {service['url']}" in r.stderr
    assert f"{service['url']}authorize?response_type=code&client_id=com.example.fleet" in r.stderr
    assert "code_challenge_method=S256" in r.stderr
    assert "owner presses Withdraw for com.example.insurer" in r.stderr
    assert "not shown" not in r.stderr
    # the set-up's progress shows on a terminal only (tests/test_progress_and_keep.py), never in a pipe
    assert "setting up" not in r.stderr and "\x1b" not in r.stderr


def test_demo_without_the_service_extra_says_so_in_one_line(tmp_path: Path) -> None:
    """After a plain `pip install .` Flask is missing: the demo runs as before (the cloud peer signs), one line
    says the service is not shown and why, and every guarantee still holds."""
    shadow = tmp_path / "no-flask"
    shadow.mkdir()
    (shadow / "flask.py").write_text("raise ModuleNotFoundError(\"No module named 'flask'\", name='flask')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]))
    r = _demo("--duration", "8", "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    _check_guarantees(summary)
    assert set(summary["grants"]) == {"g-fleet", "g-insurer"}
    assert summary["consent_service"] == {"shown": False, "reason": "flask missing: pip install 'vgw[service]'"}
    said = [line for line in r.stderr.splitlines() if "consent service" in line]
    assert len(said) == 1 and "not shown" in said[0] and "pip install 'vgw[service]'" in said[0], said
    assert "Traceback" not in r.stderr


def test_demo_rejects_a_too_short_duration() -> None:
    r = _demo("--duration", "2")
    assert r.returncode == 1
    assert "too short" in r.stderr and "Traceback" not in r.stderr
