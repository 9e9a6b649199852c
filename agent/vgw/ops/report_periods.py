"""The periods of the privacy report (README "Privacy report"): when each grant, and each scope within it, was in
force on this device, and what the broker acknowledged in each, from the audit log and the outbox's sent log.

Pure: audit entries and sent-log rows in, :class:`GrantHistory` out. A grant is in force from the
``consent-applied`` entry that lists it until the first entry that no longer does (a new document without it,
``consent-expired``, or ``grant-stopped``: revoked, expired, not in force, uninstalled); granted again, it has a
new period. A scope is in force within its grant's period from the document that lists it in the grant's
``scopes`` until the one that does not (narrowed away) or the grant's end.

The sent log counts what the broker acknowledged per grant, scope and consent version in force at the
acknowledgement (:meth:`vgw.state.outbox.Outbox.mark_sent`): each version belongs to the period open when it was
applied. An acknowledgement of a batch published just before a revocation may arrive under the next version;
it belongs to the grant's last period before that version (nothing of a grant is published once it stops).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# (grant, scope or '' for the whole grant, consent version, samples, batches, first ack ms, last ack ms)
SentRow = tuple[str, str, int, int, int, int, int]


@dataclass
class Period:
    """One interval in force, with what the broker acknowledged in it (times in Unix seconds)."""

    start: float
    end: float | None = None  # None: still in force
    versions: list[int] = field(default_factory=list)
    samples: int = 0
    batches: int = 0
    first_sent: float | None = None
    last_sent: float | None = None

    def add(self, samples: int, batches: int, first_ms: int, last_ms: int) -> None:
        self.samples += samples
        self.batches += batches
        first, last = first_ms / 1000, last_ms / 1000
        self.first_sent = first if self.first_sent is None else min(self.first_sent, first)
        self.last_sent = last if self.last_sent is None else max(self.last_sent, last)

    def to_json(self, *, count_key: str) -> dict[str, Any]:
        out: dict[str, Any] = {"from": self.start, "to": self.end, count_key: self.samples}
        if count_key == "samples":
            out["batches"] = self.batches
        # Sent times within the period: a PUBACK that came after the period ended was for a batch published in it.
        last = self.last_sent
        if last is not None and self.end is not None:
            last = min(last, self.end)
        first = self.first_sent
        if first is not None:
            first = max(first, self.start)
            if last is not None:
                first = min(first, last)
        out["first_sent"], out["last_sent"] = first, last
        return out


@dataclass
class GrantHistory:
    grant_id: str
    periods: list[Period] = field(default_factory=list)
    scopes: dict[str, list[Period]] = field(default_factory=dict)  # in order of first appearance

    @property
    def open(self) -> bool:
        return bool(self.periods) and self.periods[-1].end is None

    def close(self, t: float) -> None:
        if self.open:
            self.periods[-1].end = t
        for ps in self.scopes.values():
            if ps and ps[-1].end is None:
                ps[-1].end = t


def histories(entries: Iterable[Mapping[str, Any]], sent_log: Iterable[SentRow] = (),
              counters: Mapping[str, int] | None = None) -> dict[str, GrantHistory]:
    """Per grant id (in order of first appearance), its periods and its scopes' periods, with what was sent.

    ``counters``: the outbox's totals (``sent_samples:<g>`` ...), for a grant with no sent-log row (sent by an
    agent before the log existed): with exactly one period, its totals belong to it; with several they cannot
    be placed, and the periods show none.
    """
    sent_log = list(sent_log)
    out: dict[str, GrantHistory] = {}
    last_listed: dict[str, frozenset[str]] = {}  # the grants (and scopes) the newest applied document lists
    last_ver: int | None = None
    for e in entries:
        event, t = e.get("event"), e.get("t")
        if not isinstance(t, int | float) or isinstance(t, bool):
            continue
        if event == "consent-applied":
            ver = e.get("ver") if type(e.get("ver")) is int else None
            listed: dict[str, list[str]] = {}
            grants = e.get("grants")
            for g in grants if isinstance(grants, list) else []:
                if isinstance(g, Mapping) and isinstance(g.get("id"), str):
                    scopes = g.get("scopes")
                    listed[g["id"]] = [s for s in scopes if isinstance(s, str)] if isinstance(scopes, list) else []
            for gid, h in out.items():
                if gid not in listed:
                    h.close(float(t))
            for gid, scopes in listed.items():
                _grant_in_force(out.setdefault(gid, GrantHistory(gid)), scopes, float(t), ver)
            last_listed = {gid: frozenset(s) for gid, s in listed.items()}
            last_ver = ver
        elif event == "consent-expired":
            for h in out.values():
                h.close(float(t))
            last_listed = {}
        elif event == "grant-stopped" and isinstance(e.get("grant"), str):
            h = out.setdefault(e["grant"], GrantHistory(e["grant"]))
            stop_ver = e.get("ver")
            regrant = (e["grant"] in last_listed and e.get("reason") == "revoked" and type(stop_ver) is int
                       and last_ver is not None and stop_ver < last_ver)
            if regrant and last_ver is not None:
                for p in [*h.periods[-1:], *(ps[-1] for ps in h.scopes.values() if ps)]:
                    if p.end is None and p.versions and p.versions[-1] == last_ver:
                        p.versions.pop()  # the newer version belongs to the new period
            h.close(float(t))
            if regrant:
                # Revoked by a version that a newer one superseded before it was applied, and granted again by
                # the newer one (vgw.state.consent.manager): erased, then in force afresh from here.
                _grant_in_force(h, sorted(last_listed[e["grant"]]), float(t), last_ver)
            last_listed.pop(e["grant"], None)
    _attribute(out, sent_log)
    logged = {row[0] for row in sent_log}
    for gid, h in out.items():
        if counters and gid not in logged:
            _attribute_totals(h, counters)
    return out


def _attribute_totals(h: GrantHistory, counters: Mapping[str, int]) -> None:
    g = h.grant_id
    first, last = counters.get(f"first_sent:{g}"), counters.get(f"last_sent:{g}")
    if first is None or last is None:
        return
    ms = (int(first) * 1000, int(last) * 1000)
    if len(h.periods) == 1:
        h.periods[0].add(int(counters.get(f"sent_samples:{g}", 0)), int(counters.get(f"sent_batches:{g}", 0)), *ms)
    for scope, ps in h.scopes.items():
        n = counters.get(f"sent_samples:{g}:{scope}")
        if len(ps) == 1 and n:
            ps[0].add(int(n), 0, *ms)


def _grant_in_force(h: GrantHistory, scopes: list[str], t: float, ver: int | None) -> None:
    if not h.open:
        h.periods.append(Period(t))
    if ver is not None:
        h.periods[-1].versions.append(ver)
    for scope in scopes:
        ps = h.scopes.setdefault(scope, [])
        if not ps or ps[-1].end is not None:
            ps.append(Period(t))
        if ver is not None:
            ps[-1].versions.append(ver)
    for scope, ps in h.scopes.items():
        if scope not in scopes and ps and ps[-1].end is None:
            ps[-1].end = t  # narrowed away


def _period_of(periods: list[Period], ver: int) -> Period | None:
    """The period ``ver`` was applied in; else the last one begun under an older version (a late PUBACK)."""
    best: Period | None = None
    for p in periods:
        if ver in p.versions:
            return p
        if p.versions and min(p.versions) < ver:
            best = p
    return best if best is not None else (periods[-1] if periods else None)


def _attribute(out: dict[str, GrantHistory], sent_log: Iterable[SentRow]) -> None:
    for gid, scope, ver, samples, batches, first_ms, last_ms in sent_log:
        h = out.get(gid)
        if h is None:
            continue
        periods = h.periods if scope == "" else h.scopes.get(scope)
        if not periods:
            continue
        p = _period_of(periods, ver)
        if p is not None:
            p.add(samples, batches, first_ms, last_ms)
