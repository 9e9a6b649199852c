"""The privacy report with collection rules: plain words per app, and decoded / let through / kept back."""

from __future__ import annotations

from html.parser import HTMLParser

from vgw.contract.rules.describe import describe_grant
from vgw.contract.rules.rules import parse_rules
from vgw.ops.report import ConsentView, build_report, render_html, render_text

SCOPES = ["read_speedometer", "read_location"]
RULES = parse_rules([{"scope": "read_speedometer", "mode": "aggregate", "window_s": 60},
                     {"scope": "read_location", "mode": "trigger", "when": "rising(Vehicle.Speed < 5)",
                      "pre_s": 10, "post_s": 5}], SCOPES)


def report() -> dict:  # type: ignore[type-arg]
    limits = {"read_location": {"max_hz": 0.2, "precision_m": 100.0}}
    grant = {"id": "g-ins", "controller": "com.example.insurer", "purpose": "usage-based-insurance",
             "scopes": SCOPES, "limits": limits, "retention_s": None,
             "collect": [r.to_json() for r in RULES], "receives": describe_grant(SCOPES, RULES, limits)}
    return build_report(device="dev-0001", entries=[], counters={"sent_samples:g-ins:read_speedometer": 12},
                        outbox={}, consent=ConsentView(ver=1, exp=2_000_000_000, expired=False, grants=(grant,)),
                        rule_counts={"g-ins": {"read_speedometer": {"decoded": 36_000, "after_rules": 12}}},
                        generated=0)


def test_counts_and_share_kept_back_per_scope() -> None:
    g = report()["grants"][0]
    speed, location = g["scopes"]
    assert (speed["samples_decoded"], speed["samples_after_rules"]) == (36_000, 12)
    assert speed["kept_back_by_rules"] == round(1 - 12 / 36_000, 4)
    # A scope the agent has no count for shows as not recorded (None), never as zero.
    assert location["samples_decoded"] is None and location["kept_back_by_rules"] is None
    text = render_text(report())
    assert "decoded 36000, let through by the rules 12 (99.97% kept back in the car)" in text


def test_plain_words_in_text_and_html() -> None:
    r = report()
    expected = ("Location (position of the car): only from 10 seconds before to 5 seconds after the moment speed "
                "falls below 5")
    assert any(line.startswith(expected) for line in r["grants"][0]["receives"])
    assert expected in render_text(r)
    page = render_html(r)
    HTMLParser().feed(page)
    assert "What Insurer (example.com) receives" in page and "per minute, not the trace" in page
    assert "Kept back in the car by the collection rules" in page and "99.97% of 36000 readings" in page
