"""The privacy report (`vgw report`): per grant and scope, what left the car and what was deleted, and why.

Built only from the hash-chained audit log, the outbox counters and the outbox's row counts: never from a
batch, so it cannot show a signal value. :func:`build_report` is pure (data in, a JSON-ready dict out);
:func:`collect` reads a state directory; :func:`render_text` and :func:`render_html` format the dict. The HTML
page is for the vehicle owner: self-contained, no script, no external resource, readable without CSS.

Counters the report reads (``counters`` table of the outbox), per grant ``<g>``:

  ``sent_batches:<g>``          batches the broker acknowledged (PUBACK)
  ``sent_samples:<g>``          samples in those batches
  ``sent_samples:<g>:<scope>``  of which, per scope
  ``first_sent:<g>``            Unix time (s) of the first acknowledged batch
  ``last_sent:<g>``             Unix time (s) of the latest acknowledged batch
  ``retention_deleted:<g>``     batches deleted unsent because they outlived ``retention_s``

A counter the agent does not record (yet) shows as "not recorded", never as zero.

Periods (README "Privacy report"): per grant and per scope, the intervals in force, from the audit log, and what the
broker acknowledged in each, from the outbox's ``sent_log`` (:mod:`vgw.ops.report_periods`).

Collection rules (README "Collection rules"): for a grant with rules, the agent adds to the counters, per scope,
the samples decoded and the samples its rules let through (``rules_decoded:<g>:<scope>``,
``rules_kept:<g>:<scope>``, stored with the status every few seconds and at shutdown, so they survive restarts);
the report shows both and the share the rules kept back in the car, and says in plain words what each app
receives (:mod:`vgw.contract.rules.describe`).
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgw.base.timefmt import utc_text
from vgw.contract.rules.describe import SCOPE_LABELS
from vgw.ops.report_owner import (
    WITHDRAWN_TEXT,
    app_name,
    local_second,
    local_when,
    purpose_text,
    timeline_svg,
    version_text,
    zone_name,
)
from vgw.ops.report_periods import SentRow, histories

REPORT_VERSION = 2

# Why data were deleted, in the owner's words (audit ``reason`` -> report reason).
_DELETE_REASONS = {"revoked": "revocation", "expired": "expiry", "not-in-force": "no longer in force"}

__all__ = ["SCOPE_LABELS", "ConsentView", "build_report", "collect", "render_html", "render_text"]


@dataclass(frozen=True)
class ConsentView:
    """What the report needs of the consent in force (no keys)."""

    ver: int
    exp: int
    expired: bool
    grants: tuple[dict[str, Any], ...]  # id, controller, purpose, scopes, limits, retention_s


def _counter(counters: Mapping[str, int], name: str) -> int | None:
    v = counters.get(name)
    return int(v) if v is not None else None


def build_report(
    *,
    device: str,
    entries: Iterable[Mapping[str, Any]],
    counters: Mapping[str, int],
    outbox: Mapping[str, Mapping[str, int]],
    consent: ConsentView | None,
    audit_ok: bool = True,
    audit_problem: str | None = None,
    generated: float | None = None,
    rule_counts: Mapping[str, Mapping[str, Mapping[str, int]]] | None = None,
    sent_log: Iterable[SentRow] = (),
) -> dict[str, Any]:
    """The report as a JSON-ready dict. Pure: reads nothing, and no input it reads holds a signal value.

    Each grant and each of its scopes has its ``periods`` in force (from the audit log) with what the broker
    acknowledged in each (from ``sent_log``, :mod:`vgw.ops.report_periods`); every scope that ever was in force is
    listed, also after it was narrowed away. ``rule_counts``: per grant and scope, samples decoded and let
    through by the collection rules; None: read from the persisted counters ``rules_decoded`` / ``rules_kept``.
    """
    entries = list(entries)
    history = histories(entries, sent_log, counters)
    if rule_counts is None:
        rule_counts = _persisted_rule_counts(counters)
    grants: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    rejected: list[dict[str, Any]] = []
    expiries: list[dict[str, Any]] = []

    def grant_rec(gid: str) -> dict[str, Any]:
        if gid not in grants:
            order.append(gid)
            grants[gid] = {"id": gid, "controller": None, "purpose": None, "scopes": [], "granted_at": None,
                           "granted_in_version": None, "stopped_at": None, "stop_reason": None,
                           "deleted": [], "_retention_audit": 0}
        return grants[gid]

    for e in entries:
        event = e.get("event")
        t = e.get("t")
        if event == "consent-applied":
            listed = e.get("grants")
            for g in listed if isinstance(listed, list) else []:
                if not isinstance(g, Mapping) or not isinstance(g.get("id"), str):
                    continue
                rec = grant_rec(g["id"])
                if rec["granted_at"] is None or rec["stopped_at"] is not None:
                    rec["granted_at"], rec["granted_in_version"] = t, e.get("ver")
                    rec["stopped_at"] = rec["stop_reason"] = None  # granted again after a stop
                for k in ("controller", "purpose"):
                    if isinstance(g.get(k), str):
                        rec[k] = g[k]
        elif event == "consent-rejected":
            rejected.append({"at": t, "version": e.get("ver"), "reason": e.get("reason"), "source": e.get("source")})
        elif event == "consent-expired":
            expiries.append({"at": t, "version": e.get("ver"), "expired_at": e.get("exp")})
        elif event == "grant-stopped" and isinstance(e.get("grant"), str):
            rec = grant_rec(e["grant"])
            rec["stopped_at"], rec["stop_reason"] = t, e.get("reason")
        elif event == "erasure-done" and isinstance(e.get("grant"), str):
            rec = grant_rec(e["grant"])
            reason = str(e.get("reason") or "revoked")
            rec["deleted"].append({"reason": _DELETE_REASONS.get(reason, reason),
                                   "batches": e.get("batches_deleted", 0), "at": t, "key_destroyed": True})
        elif event == "retention-delete" and isinstance(e.get("grant"), str):
            rec = grant_rec(e["grant"])
            n = e.get("batches_deleted")
            rec["_retention_audit"] += n if type(n) is int and n > 0 else 0  # a damaged entry counts nothing
            rec["_retention_last"] = t

    in_force = {g["id"]: g for g in consent.grants} if consent else {}
    for gid in in_force:
        grant_rec(gid)
    out_grants = []
    for gid in order:
        rec = grants[gid]
        g = in_force.get(gid)
        h = history.get(gid)
        if g is not None:
            rec["controller"] = g.get("controller") or rec["controller"]
            rec["purpose"] = g.get("purpose") or rec["purpose"]
        # Every scope ever in force (narrowed-away ones too), then any in force the audit log does not know.
        rec["scopes"] = list(h.scopes) if h is not None else []
        rec["scopes"] += [s for s in (g or {}).get("scopes") or () if s not in rec["scopes"]]
        active = g is not None and consent is not None and not consent.expired
        if active:
            status = "active"
        elif rec["stop_reason"] == "expired" or (g is not None and consent is not None and consent.expired):
            status = "expired"
        elif rec["stop_reason"] is not None:
            status = "revoked"
        else:
            status = "stopped"
        retention_counter = _counter(counters, f"retention_deleted:{gid}")
        retention = max(rec.pop("_retention_audit"), retention_counter or 0)
        retention_last = rec.pop("_retention_last", None)
        if retention:
            rec["deleted"].insert(0, {"reason": "retention", "batches": retention, "at": retention_last,
                                      "key_destroyed": False})
        per_scope = {s: _counter(counters, f"sent_samples:{gid}:{s}") for s in rec["scopes"]}
        sent = {
            "batches": _counter(counters, f"sent_batches:{gid}"),
            "samples": _counter(counters, f"sent_samples:{gid}"),
            "first": _counter(counters, f"first_sent:{gid}"),
            "last": _counter(counters, f"last_sent:{gid}"),
        }
        held = outbox.get(gid, {})
        counted = (rule_counts or {}).get(gid, {})
        periods = [p.to_json(count_key="samples") for p in h.periods] if h is not None else []
        if not active and periods and periods[-1]["to"] is None:
            periods[-1]["to"] = rec["stopped_at"]  # stopped with no entry the history reads (damaged log)
        scope_periods = {s: [p.to_json(count_key="samples_sent") for p in ps] for s, ps in h.scopes.items()} \
            if h is not None else {}
        in_force_scopes = set((g or {}).get("scopes") or ()) if active else set()
        for s, ps in scope_periods.items():
            if ps and ps[-1]["to"] is None and s not in in_force_scopes:
                ps[-1]["to"] = periods[-1]["to"] if periods else None
        out_grants.append({
            **rec,
            "periods": periods,
            "status": status,
            "limits": (g or {}).get("limits", {}),
            "retention_s": (g or {}).get("retention_s"),
            "sent": sent,
            "scopes": [_scope_rec(s, per_scope[s], counted.get(s), scope_periods.get(s, []), s in in_force_scopes)
                       for s in rec["scopes"]],
            "collect": list((g or {}).get("collect", [])),
            "receives": list((g or {}).get("receives", [])),
            "held_on_device": {"batches": int(held.get("rows", 0)), "bytes": int(held.get("bytes", 0))},
        })
    return {
        "report_version": REPORT_VERSION,
        "device": device,
        "generated": round(generated if generated is not None else time.time(), 3),
        "audit": {"intact": audit_ok, "problem": audit_problem},
        "consent": None if consent is None else {"version": consent.ver, "expires": consent.exp,
                                                 "expired": consent.expired},
        "grants": out_grants,
        "expiries": expiries,
        "rejected_documents": rejected,
    }


def _scope_rec(scope: str, sent: int | None, counted: Mapping[str, int] | None, periods: list[dict[str, Any]],
               in_force: bool) -> dict[str, Any]:
    """One scope's line: its periods, samples sent, and for a grant with rules, decoded / let through / share kept
    back."""
    decoded = int(counted.get("decoded", 0)) if counted else None
    after = int(counted.get("after_rules", 0)) if counted else None
    kept_back = round(1 - after / decoded, 4) if decoded and after is not None else None
    return {"scope": scope, "label": SCOPE_LABELS.get(scope, scope), "samples_sent": sent, "periods": periods,
            "in_force": in_force, "samples_decoded": decoded, "samples_after_rules": after,
            "kept_back_by_rules": kept_back}


def _persisted_rule_counts(counters: Mapping[str, int]) -> dict[str, dict[str, dict[str, int]]]:
    """``rules_decoded:<g>:<scope>`` / ``rules_kept:<g>:<scope>`` -> {g: {scope: {decoded, after_rules}}}."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for name, value in counters.items():
        kind, _, rest = name.partition(":")
        if kind not in ("rules_decoded", "rules_kept"):
            continue
        gid, _, scope = rest.rpartition(":")
        rec = out.setdefault(gid, {}).setdefault(scope, {"decoded": 0, "after_rules": 0})
        rec["decoded" if kind == "rules_decoded" else "after_rules"] += int(value)
    return out


def collect(config_path: str | Path) -> dict[str, Any]:
    """Read a state directory (works while `vgw run` runs) and build the report. Raises VgwError."""
    from vgw.config.settings import load_config
    from vgw.ops.stateview import read_state

    cfg = load_config(config_path)
    state = read_state(cfg)
    verdict = state.audit.verify()
    consent = state.consent
    view = None
    if consent is not None:
        summary = consent.summary()
        view = ConsentView(ver=consent.ver, exp=consent.exp, expired=state.expired,
                           grants=tuple(summary["grants"]))  # type: ignore[arg-type]
    problem = None if verdict.ok else f"line {verdict.first_bad}: {verdict.reason}"
    return build_report(device=cfg.device.id, entries=state.audit.entries(), counters=state.counters,
                        outbox=state.outbox_stats, consent=view, audit_ok=verdict.ok, audit_problem=problem,
                        sent_log=state.outbox.sent_log)


# ---------------------------------------------------------------- formatting


def _when(t: Any) -> str:
    # The audit log and counters are files: a damaged one may hold any number (2**63, NaN); never a traceback.
    return utc_text(t)


def _num(v: Any) -> str:
    return "not recorded" if v is None else str(v)


def _duration(s: Any) -> str:
    if not isinstance(s, int) or s <= 0:
        return "-"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= size and s % size == 0:
            n = s // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{s} s"


def _share(v: Any) -> str:
    # Two decimals: 1 - 12/36000 must read 99.97%, not a rounded "100.0%" that would claim nothing was sent.
    return "-" if not isinstance(v, int | float) else f"{100 * v:.2f}%"


def render_text(report: Mapping[str, Any]) -> str:
    lines = [f"privacy report for {report['device']}, generated {_when(report['generated'])}"]
    audit = report["audit"]
    lines.append("audit log: intact" if audit["intact"] else f"audit log: BROKEN ({audit['problem']})")
    c = report["consent"]
    lines.append("consent: none in force" if c is None else
                 f"consent: v{c['version']}, {'EXPIRED' if c['expired'] else 'expires'} {_when(c['expires'])}")
    for g in report["grants"]:
        who = " / ".join(x for x in (g["controller"], g["purpose"]) if x)
        lines.append(f"grant {g['id']} ({who or 'unknown recipient'}): {g['status']}")
        if g.get("periods"):
            lines.append("  in force: " + "; ".join(
                f"{_when(p['from'])} to {_when(p['to']) if p['to'] is not None else 'now'} ({p['samples']} sample(s))"
                for p in g["periods"]))
        s = g["sent"]
        lines.append(f"  sent: {_num(s['batches'])} batch(es), {_num(s['samples'])} sample(s); first "
                     f"{_when(s['first'])}, last {_when(s['last'])}")
        for sc in g["scopes"]:
            line = f"    {sc['scope']:<18} {_num(sc['samples_sent'])} sample(s)"
            if sc.get("periods"):
                line += "; in force " + ", ".join(
                    f"{_when(p['from'])} to {_when(p['to']) if p['to'] is not None else 'now'}" for p in sc["periods"])
            if sc.get("samples_decoded") is not None:
                line += (f"; decoded {sc['samples_decoded']}, let through by the rules {sc['samples_after_rules']}"
                         f" ({_share(sc['kept_back_by_rules'])} kept back in the car)")
            lines.append(line)
        if g.get("receives"):
            lines.append("  what it receives:")
            lines += [f"    {r}" for r in g["receives"]]
        for d in g["deleted"]:
            lines.append(f"  deleted by {d['reason']}: {d['batches']} batch(es)"
                         + (f" at {_when(d['at'])}" if d.get("at") else "")
                         + ("; data key destroyed" if d.get("key_destroyed") else ""))
        held = g["held_on_device"]
        lines.append(f"  waiting on the device: {held['batches']} batch(es), {held['bytes']} bytes (encrypted)")
    for r in report["rejected_documents"]:
        lines.append(f"rejected consent document v{r['version'] if r['version'] is not None else '?'} at "
                     f"{_when(r['at'])}: {r['reason']}")
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;
line-height:1.5;color:#1a1a1a;background:#fff}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-top:1px solid #ccc;padding-top:1rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem}
th,td{border:1px solid #999;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#eee}caption{text-align:left;font-weight:600;padding:.25rem 0}
.ok{color:#0a5d1a;font-weight:600}.bad{color:#a00000;font-weight:600}
.status{display:inline-block;padding:0 .4rem;border:1px solid currentColor;border-radius:.25rem}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}dt{font-weight:600}dd{margin:0}
.small{font-size:.85rem;color:#444;margin:0}figure.timeline{margin:0}
figure.timeline svg{max-width:100%;height:auto}
@media print{body{margin:0}}
"""


def _kept_back(sc: Mapping[str, Any]) -> str:
    if sc.get("samples_decoded") is None:
        return "no rule: every reading (within the limits)"
    return f"{_share(sc['kept_back_by_rules'])} of {sc['samples_decoded']} readings"


def _period_text(p: Mapping[str, Any], *, count: bool = True) -> str:
    """"7 Dec 2026, 06:33:01 to 06:33:27: 12 readings" (the date once when both ends share it)."""
    start, end = local_second(p.get("from")), p.get("to")
    if end is None:
        text = f"since {start}"
    else:
        stop = local_second(end)
        same_day = stop.split(", ")[0] == start.split(", ")[0]
        text = f"{start} to {stop.split(', ')[-1] if same_day else stop}"
    n = p.get("samples", p.get("samples_sent"))
    if count and isinstance(n, int):
        text += f": {n} reading{'s' if n != 1 else ''} sent"
    return text


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained HTML page for the vehicle owner (no script, no external resource)."""
    e = html.escape
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>What your car shared: {e(str(report['device']))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        "<h1>What your car shared</h1>",
        f"<p>Device <strong>{e(str(report['device']))}</strong>. Report made {e(local_when(report['generated']))}. "
        "It counts what left the car and what was deleted; it never shows the data themselves. Times are in "
        f"{e(zone_name(report['generated']))}, this device's time zone.</p>",
    ]
    audit = report["audit"]
    if audit["intact"]:
        out.append('<p class="ok">The device\'s audit log is intact: no entry was changed, removed or '
                   "reordered.</p>")
    else:
        out.append(f'<p class="bad" role="alert">Warning: the device\'s audit log has been tampered with or '
                   f"damaged ({e(str(audit['problem']))}). The figures below may be incomplete.</p>")
    c = report["consent"]
    if c is None:
        out.append("<p>No consent is in force: the car collects and sends nothing.</p>")
    elif c["expired"]:
        out.append(f"<p>Your consent ({e(version_text(c['version']))}) expired on "
                   f"{e(local_when(c['expires']))}. Nothing is collected or sent until you give a new one.</p>")
    else:
        out.append(f"<p>Your consent in force is the {e(version_text(c['version']))}; it ends on "
                   f"{e(local_when(c['expires']))} unless you withdraw it earlier.</p>")
    if not report["grants"]:
        out.append("<p>No app has ever received data from this car through this device.</p>")
    svg = timeline_svg(report)
    if svg:
        out.append('<section aria-labelledby="timeline"><h2 id="timeline">What was shared when</h2>')
        out.append(f'<figure class="timeline">{svg}</figure></section>')
    out.append('<section aria-labelledby="withdrawn"><h2 id="withdrawn">What &ldquo;withdrawn&rdquo; means for '
               f"data already sent</h2><p>{e(WITHDRAWN_TEXT)}</p></section>")
    for g in report["grants"]:
        who = app_name(g["controller"])
        out.append(f'<section aria-labelledby="g-{e(g["id"])}">')
        out.append(f'<h2 id="g-{e(g["id"])}">{e(who)}'
                   + (f" &mdash; {e(purpose_text(g['purpose']))}" if g["purpose"] else "") + "</h2>")
        status_text = {"active": "Sharing now", "revoked": "You withdrew this permission",
                       "expired": "This permission expired", "stopped": "Stopped"}.get(g["status"], g["status"])
        s = g["sent"]
        out.append("<dl>")
        out.append(f"<dt>Permission</dt><dd><span class=\"status\">{e(status_text)}</span></dd>")
        periods = g.get("periods") or []
        if periods:
            items = "".join(f"<li>{e(_period_text(p))}</li>" for p in periods)
            out.append(f"<dt>In force</dt><dd><ul class=\"periods\">{items}</ul></dd>")
        else:
            out.append(f"<dt>Given</dt><dd>{e(local_second(g['granted_at']))}</dd>")
            if g["stopped_at"]:
                out.append(f"<dt>Stopped</dt><dd>{e(local_second(g['stopped_at']))}</dd>")
        if s["samples"] is None and s["batches"] is None:
            sent_text = "not recorded by this device"
        elif s["samples"] is None:
            sent_text = f"{s['batches']} encrypted messages (readings not counted)"
        else:
            sent_text = f"{s['samples']} readings in {_num(s['batches'])} encrypted messages"
        out.append(f"<dt>Sent</dt><dd>{e(sent_text)}</dd>")
        if not periods:
            out.append(f"<dt>First sent</dt><dd>{e(local_second(s['first']))}</dd>")
            out.append(f"<dt>Last sent</dt><dd>{e(local_second(s['last']))}</dd>")
        if g.get("retention_s"):
            out.append(f"<dt>Kept unsent at most</dt><dd>{e(_duration(g['retention_s']))}</dd>")
        held = g["held_on_device"]
        out.append(f"<dt>Waiting in the car</dt><dd>{held['batches']} encrypted messages</dd>")
        out.append("</dl>")
        if g.get("receives"):
            out.append(f"<p>What {e(who)} receives, decided in the car before anything is sent:</p><ul>")
            out += [f"<li>{e(r)}</li>" for r in g["receives"]]
            out.append("</ul>")
        ruled = any(sc.get("samples_decoded") is not None for sc in g["scopes"])
        out.append("<table>")
        out.append(f"<caption>What {e(who)} may read, and how much of it left the car</caption>")
        out.append('<thead><tr><th scope="col">Kind of data</th><th scope="col">Shared</th>'
                   '<th scope="col">Readings sent</th>'
                   '<th scope="col">Limits applied in the car</th>'
                   + ('<th scope="col">Kept back in the car by the collection rules</th>' if ruled else "")
                   + "</tr></thead><tbody>")
        for sc in g["scopes"]:
            lim = (g.get("limits") or {}).get(sc["scope"], {})
            parts = []
            if lim.get("max_hz"):
                hz = float(lim["max_hz"])
                parts.append(f"at most one reading every {1 / hz:g} s" if hz < 1 else f"at most {hz:g} per second")
            if lim.get("precision_m"):
                parts.append(f"position rounded to {float(lim['precision_m']):g} m")
            when = "; ".join(_period_text(p, count=False) for p in sc.get("periods") or [])
            if sc.get("periods") and not sc.get("in_force"):
                when += " (no longer shared)"
            out.append(f'<tr><th scope="row">{e(sc["label"])}</th><td>{e(when or "-")}</td>'
                       f"<td>{e(_num(sc['samples_sent']))}</td><td>{e('; '.join(parts) or 'none: every reading')}</td>"
                       + (f"<td>{e(_kept_back(sc))}</td>" if ruled else "") + "</tr>")
        out.append("</tbody></table>")
        if g["deleted"]:
            out.append("<table>")
            out.append("<caption>Deleted from the car before it was sent</caption>")
            out.append('<thead><tr><th scope="col">Why</th><th scope="col">Messages deleted</th>'
                       '<th scope="col">When</th></tr></thead><tbody>')
            why = {"revocation": "You withdrew the permission (the encryption key was destroyed first)",
                   "expiry": "The consent expired (the encryption key was destroyed first)",
                   "retention": "Kept longer than the agreed time"}
            for d in g["deleted"]:
                out.append(f"<tr><td>{e(why.get(d['reason'], d['reason']))}</td><td>{e(str(d['batches']))}</td>"
                           f"<td>{e(local_when(d.get('at')))}</td></tr>")
            out.append("</tbody></table>")
        # The raw identifiers, for a question to the app or a support case: out of the owner's way.
        ids = [f"grant {g['id']}"] + ([f"app {g['controller']}"] if g["controller"] else []) + [
            "scopes " + ", ".join(sc["scope"] for sc in g["scopes"])]
        out.append(f'<p class="small details">Details: {e("; ".join(ids))}</p>')
        out.append("</section>")
    if report["rejected_documents"]:
        out.append('<section aria-labelledby="rejected"><h2 id="rejected">Refused consent documents</h2>')
        out.append("<p>The car refused these documents and kept your consent unchanged.</p>")
        out.append('<table><thead><tr><th scope="col">When</th><th scope="col">Version</th>'
                   '<th scope="col">Why refused</th></tr></thead><tbody>')
        for r in report["rejected_documents"]:
            out.append(f"<tr><td>{e(local_when(r['at']))}</td><td>{e(version_text(r['version']))}</td>"
                       f"<td>{e(str(r['reason']))}</td></tr>")
        out.append("</tbody></table></section>")
    out += ["</main>", "</body>", "</html>", ""]
    return "\n".join(out)
