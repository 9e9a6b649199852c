"""The owner's report is computed from the consent history (README "Privacy report": ``report_version`` 2).

Seen, after g-fleet {odometer, fuel, tires, location} had the thermometer added and then narrowed away, and
g-insurer was granted, withdrawn, granted again and withdrawn again:
- the outside temperature sent to Fleet vanished from the HTML and the JSON (the header's total then did not add
  up to the table);
- Insurer's timeline drew one "sent" bar through the withdrawal, as if data flowed while it was withdrawn;
- "Given 06:39 ... First sent 06:33"; the thermometer row showed permission from the grant's start.
Here a real car (tests/historykit.py) goes through that history; the report must hold each period as it was.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from vgw.ops.report import render_html, render_text
from vgw_sim.pki import TestPKI

from tests.consentkit import Authority
from tests.historykit import Car, Cloud

DEVICE = "dev-0001"
FLEET = ["read_odometer", "read_fuel", "read_tires", "read_location"]
PATHS = {"read_odometer": "Vehicle.TraveledDistance", "read_fuel": "Vehicle.Powertrain.FuelSystem.RelativeLevel",
         "read_thermometer": "Vehicle.Exterior.AirTemperature", "read_speedometer": "Vehicle.Speed"}


class Drive:
    def __init__(self, tmp_path: Path, pki: TestPKI) -> None:
        self.auth = Authority(tmp_path)
        self.car = Car(tmp_path, pki, self.auth)
        self.cloud = Cloud(self.auth)
        self.t = 1_795_920_000.0
        self.ver = 0
        self.changes: list[tuple[float, float]] = []  # wall time just before and just after each document

    def doc(self, fleet: list[str] | None, insurer: bool) -> None:
        grants = []
        if fleet is not None:
            grants.append(self.auth.grant("g-fleet", fleet, controller="com.example.fleet"))
        if insurer:
            grants.append(self.auth.grant("g-insurer", ["read_speedometer"], controller="com.example.insurer"))
        self.ver += 1
        token = self.auth.doc(DEVICE, self.ver, grants, iat=int(time.time()) - 10)
        self.car.flush()
        self.cloud.drain(self.car)
        before = time.time()
        assert self.car.apply(token) == "applied"
        self.changes.append((before, time.time()))

    def drive(self, steps: int = 5) -> None:
        for _ in range(steps):
            self.t += 0.5
            self.car.feed([(path, scope, self.t, 20.0) for scope, path in PATHS.items()])
            self.car.flush()
            self.cloud.drain(self.car)
            time.sleep(0.01)  # acknowledgements spread over time, as a broker's would


def _grant(report: dict[str, Any], gid: str) -> dict[str, Any]:
    [g] = [g for g in report["grants"] if g["id"] == gid]
    return g


def _seen_history(tmp_path: Path, pki: TestPKI) -> tuple[Drive, dict[str, Any]]:
    d = Drive(tmp_path, pki)
    d.doc(FLEET, insurer=True)  # 1: both granted
    d.drive()
    d.doc([*FLEET, "read_thermometer"], insurer=True)  # 2: thermometer added to fleet
    d.drive()
    d.doc([*FLEET, "read_thermometer"], insurer=False)  # 3: insurer withdrawn
    d.drive()
    d.doc(FLEET, insurer=True)  # 4: thermometer narrowed away; insurer granted again
    d.drive()
    d.doc(FLEET, insurer=False)  # 5: insurer withdrawn again
    d.drive()
    return d, d.car.report()


def test_report_periods_follow_the_history(tmp_path: Path, pki: TestPKI) -> None:
    d, r = _seen_history(tmp_path, pki)
    try:
        assert r["report_version"] == 2 and r["device"] == DEVICE
        fleet, ins = _grant(r, "g-fleet"), _grant(r, "g-insurer")
        # What left the car: every scope that ever sent, the narrowed-away thermometer included; counts add up.
        got = {sc["scope"]: sc["samples_sent"] for sc in fleet["scopes"]}
        received = {s: sum(1 for x in d.cloud.samples["g-fleet"] if x["path"] == p) for s, p in PATHS.items()}
        assert got["read_thermometer"] == received["read_thermometer"] > 0
        assert sum(v or 0 for v in got.values()) == fleet["sent"]["samples"] == len(d.cloud.samples["g-fleet"])
        # The thermometer was in force from document 2 to document 4, not from the grant's start.
        [thermo] = [sc for sc in fleet["scopes"] if sc["scope"] == "read_thermometer"]
        [tp] = thermo["periods"]
        assert d.changes[1][0] <= tp["from"] <= d.changes[1][1] and d.changes[3][0] <= tp["to"] <= d.changes[3][1]
        assert tp["samples_sent"] == received["read_thermometer"]
        assert len(fleet["periods"]) == 1 and fleet["periods"][0]["to"] is None
        # The insurer: two periods, each with what the app received in it, sent only inside it.
        p1, p2 = ins["periods"]
        assert d.changes[0][0] <= p1["from"] <= d.changes[0][1] and d.changes[2][0] <= p1["to"] <= d.changes[2][1]
        assert d.changes[3][0] <= p2["from"] <= d.changes[3][1] and d.changes[4][0] <= p2["to"] <= d.changes[4][1]
        acks = [(t, n) for g, t, n in d.cloud.acked_at if g == "g-insurer"]
        for p in (p1, p2):
            assert p["samples"] == sum(n for t, n in acks if p["from"] <= t <= p["to"]) > 0
            assert p["from"] <= p["first_sent"] <= p["last_sent"] <= p["to"]
        assert p1["samples"] + p2["samples"] == ins["sent"]["samples"] == len(d.cloud.samples["g-insurer"])
        [speed] = ins["scopes"]
        assert [(q["from"], q["to"]) for q in speed["periods"]] == [(p1["from"], p1["to"]), (p2["from"], p2["to"])]
    finally:
        d.car.close()


def test_text_and_html_show_each_period(tmp_path: Path, pki: TestPKI) -> None:
    d, r = _seen_history(tmp_path, pki)
    try:
        text = render_text(r)
        assert "read_thermometer" in text
        ins_lines = text.split("grant g-insurer")[1]
        assert ins_lines.count("in force ") >= 1 and ins_lines.count(" to ") >= 2, ins_lines
        page = render_html(r)
        assert "Outside temperature" in page
        # One "sent" bar per period with data: the insurer has two rows' worth of separate bars, none across
        # the withdrawal.
        assert page.count("<title>sent ") >= 4  # fleet odometer, fuel, thermometer ... and insurer twice
        assert "g-insurer" not in page.split("<svg")[1].split("</svg>")[0]  # raw ids stay out of the picture
    finally:
        d.car.close()


def test_rule_counts_survive_a_restart(tmp_path: Path, pki: TestPKI, broker: Any, channel: str, vehicle: Any
                                       ) -> None:
    """The report's "decoded / let through by the rules" came from the running agent's status file: a restart
    set them back to zero, so the share kept back in the car described only the last run."""
    import json

    from vgw.cli import main
    from vgw.ops.report import collect
    from vgw_sim.cloud import consent_claims, grant, sign_consent

    from tests.agentkit import AgentThread, wait_until, write_config
    from tests.agentkit import Authority as AgentAuthority

    auth = AgentAuthority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    g = grant("g-ins", ["read_speedometer"], auth.recipient("g-ins"))
    g["collect"] = [{"scope": "read_speedometer", "mode": "aggregate", "window_s": 1}]
    doc = tmp_path / "v1.jws"
    doc.write_text(sign_consent(consent_claims(DEVICE, 1, [g]), auth.key))
    assert main(["consent", "apply", "--config", str(cfg), str(doc)]) == 0
    status = tmp_path / "state" / "status.json"

    def decoded_now() -> int:
        try:
            return int(json.loads(status.read_text())["collect"]["g-ins"]["read_speedometer"]["decoded"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def reported() -> int:
        [ins] = [x for x in collect(cfg)["grants"] if x["id"] == "g-ins"]
        [speed] = ins["scopes"]
        return int(speed["samples_decoded"] or 0)

    with AgentThread(cfg):
        assert wait_until(lambda: decoded_now() >= 50, timeout=30)
    first = reported()
    assert first >= 50
    status.unlink()
    with AgentThread(cfg):
        assert wait_until(lambda: decoded_now() >= 50, timeout=30)
    second_run = decoded_now()
    assert reported() >= first + second_run - 1, (first, second_run, reported())


def _seen_report() -> dict[str, Any]:
    """The history of a report that once lost the narrowed-away thermometer and drew one sent bar across the
    insurer's withdrawal, as the audit log and the sent log hold it (times of 6 Dec 2026, UTC)."""
    from vgw.ops.report import ConsentView, build_report

    day = 1_796_600_000.0 - 1_796_600_000.0 % 86400
    at = {k: day + 6 * 3600 + m * 60 + s for k, (m, s) in {
        "v1": (32, 0), "v2": (33, 1), "v3": (33, 16), "v4": (33, 27), "v5": (39, 0), "v6": (39, 28),
        "v7": (39, 38)}.items()}
    fleet = {"id": "g-fleet", "controller": "com.example.fleet", "purpose": "fleet-maintenance",
             "scopes": ["read_odometer", "read_fuel", "read_tires", "read_location"]}
    thermo = {**fleet, "scopes": [*fleet["scopes"], "read_thermometer"]}
    ins = {"id": "g-insurer", "controller": "com.example.insurer", "purpose": "usage-based-insurance",
           "scopes": ["read_speedometer"]}
    entries: list[dict[str, Any]] = []
    for ver, grants in ((1, [fleet]), (2, [fleet, ins]), (3, [thermo, ins]), (4, [thermo]), (5, [fleet]),
                        (6, [fleet, ins]), (7, [fleet])):
        entries.append({"t": at[f"v{ver}"], "event": "consent-applied", "ver": ver, "grants": grants})
        if ver in (4, 7):
            entries += [{"t": at[f"v{ver}"] + 0.01, "event": "grant-stopped", "grant": "g-insurer",
                         "reason": "revoked", "ver": ver},
                        {"t": at[f"v{ver}"] + 0.02, "event": "erasure-done", "grant": "g-insurer",
                         "batches_deleted": 1, "reason": "revoked"}]

    def ms(t: float) -> int:
        return int(t * 1000)

    log = [("g-insurer", "", 2, 26, 26, ms(at["v2"] + 1), ms(at["v3"])),
           ("g-insurer", "", 3, 10, 10, ms(at["v3"] + 1), ms(at["v4"] - 1)),
           ("g-insurer", "", 4, 1, 1, ms(at["v4"] + 0.4), ms(at["v4"] + 0.4)),  # a PUBACK after the withdrawal
           ("g-insurer", "", 6, 10, 10, ms(at["v6"] + 1), ms(at["v7"] - 0.5))]
    log += [("g-insurer", "read_speedometer", v, n, b, f, last) for _, _, v, n, b, f, last in log[:4]]
    log += [("g-fleet", "", 1, 300, 30, ms(at["v1"] + 1), ms(at["v7"] + 20)),
            ("g-fleet", "", 3, 68, 20, ms(at["v3"] + 1), ms(at["v5"] - 1)),
            ("g-fleet", "read_odometer", 1, 300, 30, ms(at["v1"] + 1), ms(at["v7"] + 20)),
            ("g-fleet", "read_thermometer", 3, 68, 20, ms(at["v3"] + 1), ms(at["v5"] - 1))]
    counters = {"sent_samples:g-insurer": 47, "sent_batches:g-insurer": 47, "sent_samples:g-fleet": 368,
                "sent_batches:g-fleet": 50, "sent_samples:g-insurer:read_speedometer": 47,
                "sent_samples:g-fleet:read_odometer": 300, "sent_samples:g-fleet:read_thermometer": 68}
    consent = ConsentView(ver=7, exp=int(at["v7"]) + 86400, expired=False, grants=(fleet,))
    return build_report(device=DEVICE, entries=entries, counters=counters, outbox={}, consent=consent,
                        generated=at["v7"] + 60, sent_log=log)


def test_timeline_geometry_in_headless_chromium(tmp_path: Path) -> None:
    """Measured in Chromium's layout: in every row each "sent" bar lies inside one of its "permission" bars (none
    crosses a withdrawn stretch), and the insurer's row has two permission bars with a gap between them. A copy
    of the page with a measuring script (the report itself has none) writes the boxes into the DOM, which
    --dump-dom prints; a screenshot of the page itself is taken too."""
    import json
    import re
    import subprocess

    from tests.test_report import CHROMIUM_FLAGS, chromium

    browser = chromium()
    if browser is None:
        pytest.skip("Debian's chromium is not installed (`make test-deps` installs it)")
    report = _seen_report()
    ins = _grant(report, "g-insurer")
    assert [round(p["to"] - p["from"]) for p in ins["periods"]] == [26, 10]
    assert ins["periods"][0]["last_sent"] <= ins["periods"][0]["to"]
    page = render_html(report)
    shot = tmp_path / "report.png"
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}",
                    "--window-size=1000,1800", (tmp_path / "report.html").as_uri()], check=True, capture_output=True,
                   timeout=90)
    assert shot.read_bytes().startswith(b"\x89PNG")
    probe = ("<script>window.onload=()=>{const out=[];for(const r of document.querySelectorAll("
             "'figure.timeline rect[data-row]')){const b=r.getBoundingClientRect();out.push([r.getAttribute('class'),"
             "+r.getAttribute('data-row'),b.left,b.right]);}document.body.setAttribute('data-probe',"
             "JSON.stringify(out));};</script>")
    copy = tmp_path / "probe.html"
    copy.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    r = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                        "--window-size=1000,1800", copy.as_uri()], check=True, capture_output=True, text=True,
                       timeout=90)
    found = re.search(r"data-probe=\"([^\"]*)\"", r.stdout)
    assert found, r.stdout[-2000:]
    boxes = json.loads(found.group(1).replace("&quot;", '"'))
    rows: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for kind, row, left, right in boxes:
        rows.setdefault(row, {"permission": [], "sent": []})[kind].append((left, right))
    assert rows and any(b["sent"] for b in rows.values())
    for row, b in rows.items():
        for left, right in b["sent"]:
            assert any(pl - 0.5 <= left and right <= pr + 0.5 for pl, pr in b["permission"]), (row, left, right, b)
    # The insurer's speed row (the last row): two permission bars, a gap between them, no sent bar in the gap.
    last = rows[max(rows)]
    (_, a1), (b0, _) = sorted(last["permission"])
    assert a1 < b0
    assert not any(left < b0 and right > a1 for left, right in last["sent"])
    # The thermometer's row: permission only from the document that added it.
    labels = re.findall(r">([^<]*: Outside temperature)<", page)
    assert labels


def test_sent_log_counts_a_batch_once_for_its_grant(tmp_path: Path, pki: TestPKI) -> None:
    """A batch with a path of unknown scope (counted under '') must not add to the grant's own row twice."""
    from vgw.state.outbox import OUTBOX_FILE, read_figures
    from vgw.state.outbox.batches import Row

    from tests.consentkit import State

    auth = Authority(tmp_path)
    s = State(tmp_path, pki, auth)
    try:
        assert s.manager.apply(auth.doc(DEVICE, 5, [auth.grant("g", ["read_fuel"])]), source="mqtt").status \
            == "applied"
        s.outbox.mark_sent(Row(1, "g", 1, b"", samples=5, scopes='{"": 2, "read_fuel": 3}'), when=1000.5)
        log = read_figures(s.dir / OUTBOX_FILE).sent_log
        assert ("g", "", 5, 5, 1, 1_000_500, 1_000_500) in log and ("g", "read_fuel", 5, 3, 1, 1_000_500,
                                                                     1_000_500) in log
        assert len(log) == 2
    finally:
        s.close()


def test_report_of_a_real_agent_granted_withdrawn_granted_again(tmp_path: Path, pki: TestPKI, broker: Any,
                                                                cloud: Any, channel: str, vehicle: Any) -> None:
    """End to end (virtual CAN -> agent -> mosquitto over mutual TLS -> cloud peer): an insurer granted,
    withdrawn, granted again; `vgw report --json` then has its two periods, each with what the app received in
    it, and nothing sent between them."""
    from vgw.ops.report import collect
    from vgw_sim.cloud import consent_claims, grant, sign_consent

    from tests.agentkit import AgentThread, write_config
    from tests.agentkit import Authority as AgentAuthority

    auth = AgentAuthority(tmp_path)
    cfg = write_config(tmp_path, pki, broker.port, auth.trust, can={"channel": channel})
    cloud.add_recipient("g-ins", auth.recipient("g-ins"))
    cloud.add_recipient("g-fleet", auth.recipient("g-fleet"))
    fleet = grant("g-fleet", ["read_odometer"], auth.recipient("g-fleet"))
    ins = grant("g-ins", ["read_speedometer"], auth.recipient("g-ins"))

    def publish(ver: int, grants: list[dict[str, Any]]) -> None:
        cloud.publish_consent(DEVICE, sign_consent(consent_claims(DEVICE, ver, grants), auth.key))
        assert cloud.wait_for(lambda: any(r.claims.get("ver") == ver
                                          for r in cloud.receipts(DEVICE, "consent-applied")), 15)

    def speed() -> int:
        return len(cloud.samples(DEVICE, "g-ins"))

    with AgentThread(cfg) as agent:
        assert agent.wait_link()
        publish(1, [fleet, ins])
        assert cloud.wait_for(lambda: speed() >= 50, 15)
        publish(2, [fleet])  # withdrawn
        assert cloud.wait_for(lambda: len(cloud.receipts(DEVICE, "erasure")) == 1, 15)
        between = speed()
        n_fleet = len(cloud.samples(DEVICE, "g-fleet"))
        assert cloud.wait_for(lambda: len(cloud.samples(DEVICE, "g-fleet")) > n_fleet + 5, 15)
        assert speed() == between  # nothing while withdrawn
        publish(3, [fleet, ins])  # granted again
        assert cloud.wait_for(lambda: speed() >= between + 50, 15)
    report = collect(cfg)
    g = _grant(report, "g-ins")
    p1, p2 = g["periods"]
    assert p1["to"] is not None and p1["to"] < p2["from"] and p2["to"] is None
    assert p1["samples"] == between and p2["samples"] == speed() - between
    assert g["sent"]["samples"] == speed() == sum(sc["samples_sent"] for sc in g["scopes"])
    assert p1["last_sent"] <= p1["to"] and p2["first_sent"] >= p2["from"]


def test_periods_end_at_expiry_and_a_skipped_revocation() -> None:
    """Expiry ends every period; a grant revoked by a version that a newer one superseded before it was applied
    (and granted again by the newer one) has two periods meeting at that moment."""
    from vgw.ops.report import ConsentView, build_report

    g = {"id": "g", "scopes": ["read_fuel"]}
    entries = [
        {"t": 100.0, "event": "consent-applied", "ver": 1, "grants": [g]},
        {"t": 200.0, "event": "consent-expired", "ver": 1, "exp": 200},
        {"t": 200.0, "event": "grant-stopped", "grant": "g", "reason": "expired", "ver": 1},
        {"t": 300.0, "event": "consent-applied", "ver": 2, "grants": [g]},
        {"t": 400.0, "event": "consent-applied", "ver": 4, "grants": [g]},
        {"t": 400.5, "event": "grant-stopped", "grant": "g", "reason": "revoked", "ver": 3},
    ]
    log = [("g", "", 1, 5, 1, 150_000, 150_000), ("g", "", 2, 7, 1, 350_000, 350_000),
           ("g", "", 4, 9, 1, 450_000, 450_000)]
    view = ConsentView(ver=4, exp=10_000, expired=False, grants=(g,))
    [r] = build_report(device="d", entries=entries, counters={}, outbox={}, consent=view, generated=500,
                       sent_log=log)["grants"]
    assert [(p["from"], p["to"], p["samples"]) for p in r["periods"]] == [
        (100.0, 200.0, 5), (300.0, 400.5, 7), (400.5, None, 9)]
    [fuel] = r["scopes"]
    assert [(p["from"], p["to"]) for p in fuel["periods"]] == [(100.0, 200.0), (300.0, 400.5), (400.5, None)]
