"""The privacy report (`vgw report`): what left the car per grant and scope, what was deleted and why, from the
audit log and the outbox counters only; never a signal value. The HTML page parses, is self-contained and has
no script; a headless Chromium screenshot runs when a browser is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import pytest
from vgw.cli import main
from vgw.contract.envelope import batch_plaintext, load_recipient_key, seal
from vgw.ops.report import ConsentView, build_report, collect, render_html, render_text
from vgw_sim.vehicle import DEFAULT_VIN

from tests.consentkit import Authority, State

DEVICE = "dev-0001"
SECRET_VALUES = (DEFAULT_VIN, "52.5081", "13.3777")  # values that exist in the stored batches


@pytest.fixture
def world(tmp_path: Path, pki: Any) -> Iterator[dict[str, Any]]:
    from tests.agentkit import write_config

    auth = Authority(tmp_path)
    cfg = write_config(tmp_path, pki, 1, auth.trust[0], can={"channel": "unused"})
    s = State(tmp_path, pki, auth)
    now = int(time.time())
    fleet = auth.grant("g-fleet", ["read_odometer", "read_location"], controller="com.example.fleet",
                       purpose="fleet-maintenance", limits={"read_location": {"precision_m": 500}}, retention_s=3600)
    ins = auth.grant("g-ins", ["read_speedometer", "read_vin"], controller="com.example.insurer",
                     purpose="usage-based-insurance")
    assert s.manager.apply(auth.doc(DEVICE, 1, [fleet, ins], iat=now - 100), source="mqtt").status == "applied"
    consent = s.manager.in_force
    assert consent is not None
    # Real batches holding a VIN and a position, so the report provably does not read them.
    for g in consent.grants:
        samples = [{"t": now, "path": "Vehicle.VehicleIdentification.VIN", "value": DEFAULT_VIN},
                   {"t": now, "path": "Vehicle.CurrentLocation.Latitude", "value": 52.5081}]
        rk = load_recipient_key(g.recipient.kem, g.recipient.pk)
        for _ in range(3):
            s.outbox.commit_batch(g.id, lambda seq, _g=g, _rk=rk, _s=samples: seal(
                _g.recipient.kem, _rk, DEVICE, _g.id,
                batch_plaintext(DEVICE, _g.id, seq, _s, epoch=s.outbox.epoch)), float(now), 2)
    # What the uplink hook would have counted on PUBACK.
    for name, value in {"sent_batches:g-fleet": 4, "sent_samples:g-fleet": 40, "sent_samples:g-fleet:read_odometer": 30,
                        "sent_samples:g-fleet:read_location": 10, "first_sent:g-fleet": now - 90,
                        "last_sent:g-fleet": now - 5, "sent_batches:g-ins": 2, "sent_samples:g-ins": 7,
                        "retention_deleted:g-fleet": 2}.items():
        s.outbox.count(name, value)
    s.audit.append("retention-delete", grant="g-fleet", batches_deleted=2, retention_s=3600)
    s.outbox.delete_older_than("g-fleet", time.time() + 1)  # those rows went
    s.outbox.commit_batch("g-fleet", lambda seq: b"\x01sealed", float(now), 1)
    # The owner withdraws g-ins; a forged document is refused.
    assert s.manager.apply(auth.doc(DEVICE, 2, [fleet], iat=now - 50), source="mqtt").status == "applied"
    assert s.manager.apply(b"not a jws", source="mqtt").status == "rejected"
    s.close()
    yield {"cfg": cfg, "state": s, "now": now}


def _grant(report: dict[str, Any], gid: str) -> dict[str, Any]:
    [g] = [g for g in report["grants"] if g["id"] == gid]
    return g


def test_report_per_grant_and_scope(world: dict[str, Any]) -> None:
    r = collect(world["cfg"])
    assert r["device"] == DEVICE and r["audit"]["intact"] and r["consent"]["version"] == 2
    fleet = _grant(r, "g-fleet")
    assert fleet["status"] == "active" and fleet["controller"] == "com.example.fleet"
    assert fleet["sent"] == {"batches": 4, "samples": 40, "first": world["now"] - 90, "last": world["now"] - 5}
    assert {s["scope"]: s["samples_sent"] for s in fleet["scopes"]} == {"read_odometer": 30, "read_location": 10}
    assert fleet["deleted"] == [{"reason": "retention", "batches": 2, "at": fleet["deleted"][0]["at"],
                                 "key_destroyed": False}]
    assert fleet["held_on_device"]["batches"] == 1 and fleet["retention_s"] == 3600
    assert fleet["limits"]["read_location"]["precision_m"] == 500

    ins = _grant(r, "g-ins")
    assert ins["status"] == "revoked" and ins["controller"] == "com.example.insurer"  # from the audit log
    assert ins["sent"]["batches"] == 2 and ins["sent"]["first"] is None  # not recorded != zero
    assert {s["scope"]: s["samples_sent"] for s in ins["scopes"]} == {"read_speedometer": None, "read_vin": None}
    [d] = ins["deleted"]
    assert d["reason"] == "revocation" and d["batches"] == 3 and d["key_destroyed"]
    assert ins["held_on_device"] == {"batches": 0, "bytes": 0}
    assert [x["reason"] for x in r["rejected_documents"]] == ["malformed"]


def test_report_holds_no_signal_value(world: dict[str, Any], tmp_path: Path) -> None:
    r = collect(world["cfg"])
    for text in (json.dumps(r), render_text(r), render_html(r)):
        for value in SECRET_VALUES:
            assert value not in text


def test_expiry_and_regrant_from_audit_entries() -> None:
    entries = [
        {"n": 1, "t": 100.0, "event": "consent-applied", "ver": 1, "grants": [{"id": "g", "scopes": ["read_fuel"]}]},
        {"n": 2, "t": 200.0, "event": "consent-expired", "ver": 1, "exp": 200},
        {"n": 3, "t": 200.0, "event": "grant-stopped", "grant": "g", "reason": "expired", "ver": 1},
        {"n": 4, "t": 200.0, "event": "key-destroyed", "grant": "g"},
        {"n": 5, "t": 200.0, "event": "erasure-done", "grant": "g", "batches_deleted": 5, "reason": "expired"},
    ]
    r = build_report(device="d", entries=entries, counters={}, outbox={}, consent=None, generated=0)
    [g] = r["grants"]
    assert g["status"] == "expired" and g["deleted"][0]["reason"] == "expiry" and g["deleted"][0]["batches"] == 5
    assert r["expiries"] == [{"at": 200.0, "version": 1, "expired_at": 200}]
    # Granted again later: active again, the earlier deletion still reported.
    entries.append({"n": 6, "t": 300.0, "event": "consent-applied", "ver": 2,
                    "grants": [{"id": "g", "scopes": ["read_fuel"]}]})
    view = ConsentView(ver=2, exp=999, expired=False, grants=({"id": "g", "scopes": ["read_fuel"]},))
    [g] = build_report(device="d", entries=entries, counters={}, outbox={}, consent=view, generated=0)["grants"]
    assert g["status"] == "active" and g["granted_at"] == 300.0 and g["deleted"][0]["batches"] == 5


def test_tampered_audit_log_is_flagged(world: dict[str, Any]) -> None:
    log = world["state"].dir / "audit.log"
    lines = log.read_text().splitlines()
    del lines[1]
    log.write_text("\n".join(lines) + "\n")
    r = collect(world["cfg"])
    assert not r["audit"]["intact"] and "line 2" in r["audit"]["problem"]
    assert "tampered" in render_html(r)


class _Page(HTMLParser):
    VOID: ClassVar[set[str]] = {"meta", "link", "br", "hr", "img", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_cli_report_json_text_and_html(world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    out = tmp_path / "report.html"
    assert main(["report", "--config", str(world["cfg"]), "--json", "--html", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {g["id"] for g in doc["grants"]} == {"g-fleet", "g-ins"}
    assert main(["report", "--config", str(world["cfg"])]) == 0
    text = capsys.readouterr().out
    assert "grant g-ins (com.example.insurer / usage-based-insurance): revoked" in text
    assert "deleted by revocation: 3 batch(es)" in text

    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    p = _Page()
    p.feed(page)
    p.close()
    assert not p.errors and not p.stack
    names = [t for t, _ in p.tags]
    assert "script" not in names and "iframe" not in names and "object" not in names
    for _, attrs in p.tags:  # self-contained: nothing loaded from anywhere
        for key in ("src", "href"):
            assert not attrs.get(key), attrs
        assert not any(k.startswith("on") for k in attrs)
    assert ("html", {"lang": "en"}) in p.tags and "title" in names and names.count("h1") == 1
    assert all(attrs.get("scope") in ("col", "row") for t, attrs in p.tags if t == "th")
    words = " ".join(p.text)
    assert "What your car shared" in words and "You withdrew the permission" in words
    assert "Kept longer than the agreed time" in words and "com.example.fleet" in words


def test_html_escapes_everything_from_documents() -> None:
    evil = "<script>alert(1)</script>"
    entries = [{"n": 1, "t": 1.0, "event": "consent-applied", "ver": 1,
                "grants": [{"id": "g", "scopes": ["read_fuel"], "controller": evil, "purpose": evil}]},
               {"n": 2, "t": 2.0, "event": "consent-rejected", "ver": None, "reason": evil}]
    page = render_html(build_report(device="d", entries=entries, counters={}, outbox={}, consent=None))
    assert "<script>" not in page and "&lt;script&gt;" in page


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture
def india_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The device's time zone is Asia/Kolkata (UTC+5:30, no daylight saving: a fixed, checkable offset)."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _owner_report() -> dict[str, Any]:
    t0 = 1_795_996_800  # 2026-11-30 00:00:00 UTC = 05:30 in Kolkata
    ver = t0 * 1000  # the consent service numbers versions by Unix time in ms (docs/fleet.md)
    entries = [
        {"n": 1, "t": t0, "event": "consent-applied", "ver": ver, "grants": [
            {"id": "g-fleet", "scopes": ["read_odometer", "read_location"], "controller": "com.example.fleet",
             "purpose": "fleet-maintenance"},
            {"id": "g-ins", "scopes": ["read_speedometer"], "controller": "com.example.insurer"}]},
        {"n": 2, "t": t0 + 7200, "event": "grant-stopped", "grant": "g-ins", "reason": "revoked", "ver": ver + 1},
        {"n": 3, "t": t0 + 7201, "event": "erasure-done", "grant": "g-ins", "batches_deleted": 3,
         "reason": "revoked"},
    ]
    counters = {"sent_batches:g-fleet": 4, "sent_samples:g-fleet": 40, "sent_samples:g-fleet:read_odometer": 40,
                "first_sent:g-fleet": t0 + 60, "last_sent:g-fleet": t0 + 3600, "sent_batches:g-ins": 2,
                "sent_samples:g-ins": 7, "sent_samples:g-ins:read_speedometer": 7, "first_sent:g-ins": t0 + 120,
                "last_sent:g-ins": t0 + 7000}
    consent = ConsentView(ver=ver + 1, exp=t0 + 30 * 86400, expired=False, grants=(
        {"id": "g-fleet", "controller": "com.example.fleet", "purpose": "fleet-maintenance",
         "scopes": ["read_odometer", "read_location"], "limits": {}, "retention_s": None},))
    return build_report(device="dev-0001", entries=entries, counters=counters, outbox={}, consent=consent,
                        generated=t0 + 86400)


def test_html_for_the_owner_local_time_dates_names_timeline(india_time: None) -> None:
    """The page showed UTC times, versions as 13-digit numbers and apps as reverse-DNS ids, and no picture."""
    page = render_html(_owner_report())
    p = _Page()
    p.feed(page)
    p.close()
    assert not p.errors and not p.stack
    words = " ".join(p.text)
    # Local time (05:30 in Kolkata for 00:00 UTC) and the zone named; no UTC time on the page.
    assert "30 Nov 2026, 05:31" in words and "IST (UTC+0530)" in words and " UTC" not in words
    assert "consent in force is the version of 30 Nov 2026, 05:30" in words
    assert str(1_795_996_800_000) not in words
    assert "Fleet (example.com)" in words and "Insurer (example.com)" in words and "fleet maintenance" in words
    # The timeline: inline SVG, one row per app and scope, sent spans only where readings left the car.
    names = [t for t, _ in p.tags]
    assert names.count("svg") == 1 and "script" not in names and "image" not in names and "use" not in names
    assert "Fleet (example.com): Odometer" in words or any("Fleet (example.com): " in w for w in p.text)
    rows = [w for w in p.text if w.startswith(("Fleet (example.com): ", "Insurer (example.com): "))]
    assert len(rows) == 3
    titles = [w for w in p.text if w.startswith("sent ")]
    assert len(titles) == 2  # fleet odometer and insurer speed: the fleet's location sent nothing
    assert any(w.startswith("deleted in the car 30 Nov 2026, 07:30") for w in p.text)
    # A scope without limits says so in words (it showed a bare "-" that an owner could not read).
    assert "none: every reading" in p.text
    # What "withdrawn" means for data already sent, in plain words.
    assert "deletes everything it still holds" in words and "erasure receipt" in words
    assert "deleting it is the app's duty" in words


def chromium() -> str | None:
    return next((b for b in ("chromium", "chromium-browser") if shutil.which(b)), None)


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (`make deps` installs it; "
                                                "apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(world: dict[str, Any], tmp_path: Path) -> None:
    browser = chromium()
    assert browser is not None
    page = tmp_path / "report.html"
    page.write_text(render_html(collect(world["cfg"])), encoding="utf-8")
    shot = tmp_path / "report.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1000,1600", page.as_uri()], check=True, capture_output=True, timeout=90)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    if os.environ.get("VGW_KEEP_SCREENSHOT"):  # to look at it: VGW_KEEP_SCREENSHOT=/tmp/report.png
        shutil.copy(shot, os.environ["VGW_KEEP_SCREENSHOT"])


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (`make deps` installs it; "
                                                "apt-get install -y chromium)")
def test_timeline_fits_a_phone_screen(tmp_path: Path) -> None:
    """On a phone (400 px wide) the 704 px timeline ran off the right edge: the end time, most of each bar and
    the red deletion marks were hidden behind a horizontal scroll bar. Measured in Chromium's layout: a copy of
    the page with a measuring script (the report itself has none) writes the timeline's right edge and its
    text size into the DOM, which --dump-dom prints."""
    browser = chromium()
    assert browser is not None
    page = render_html(_owner_report())
    probe = ("<script>window.onload=()=>{const s=document.querySelector('figure.timeline svg').getBoundingClientRect();"
             "const t=document.querySelector('figure.timeline svg text').getBoundingClientRect();"
             "document.body.setAttribute('data-probe',[Math.round(s.right),document.documentElement.clientWidth,"
             "Math.round(t.height)].join(','));};</script>")
    copy = tmp_path / "phone.html"
    copy.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    r = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                        "--window-size=400,900", copy.as_uri()], check=True, capture_output=True, text=True,
                       timeout=90)
    found = re.search(r'data-probe="(\d+),(\d+),(\d+)"', r.stdout)
    assert found, r.stdout[-2000:]
    right, viewport, text_h = map(int, found.groups())
    assert right <= viewport, (right, viewport)
    assert text_h >= 10  # the labels are scaled down, but still readable


def test_report_json_is_report_version_2(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """`vgw report --json`: the owner's report of README "Privacy report" (report_version 2): periods per grant
    and per scope, `to` null while in force, every scope listed, the scopes' counts adding up to the grant's."""
    assert main(["report", "--config", str(world["cfg"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["report_version"] == 2 and doc["device"] == DEVICE
    by_id = {g["id"]: g for g in doc["grants"]}
    fleet, ins = by_id["g-fleet"], by_id["g-ins"]
    for g in (fleet, ins):
        assert isinstance(g["periods"], list) and g["periods"]
        assert all(set(p) >= {"from", "to"} and isinstance(p["from"], float) for p in g["periods"])
        assert set(g["sent"]) >= {"samples", "batches"}
        for sc in g["scopes"]:
            assert set(sc) >= {"scope", "samples_sent", "periods"}
    assert fleet["periods"][-1]["to"] is None and ins["periods"][-1]["to"] is not None
    assert sum(sc["samples_sent"] for sc in fleet["scopes"]) == fleet["sent"]["samples"] == 40
    assert [p["to"] is None for sc in fleet["scopes"] for p in sc["periods"]] == [True, True]
