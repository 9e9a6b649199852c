"""The explorer's invariants, judged after a schedule (tests/explore.py) on what the cloud received and the disk.

(a) **No withdrawn sample leaves the car once the device could know.** Every data message is opened with the
    keys of its grant's incarnations (tests/explore_model.py); a sample of scope s sealed to incarnation I is
    withdrawn once a version >= the first that withdrew s from I exists. It is a violation if the device could
    know such a version when it published: it had applied it (its status said so earlier on the same
    connection; or before this connection began, by ``M_CONNECT`` s: a status on any broker more than
    ``M_STATUS`` s, its audit log or a `vgw consent apply` more than ``M_LOCAL`` s earlier), or the document was
    retained at the broker when this connection began (it reached the broker more than ``M_RETAINED`` s before
    the connection's first status, which the agent publishes right after it subscribes), or it was delivered
    live on this connection more than ``T_LIVE`` s before (not across a restart of that broker). The broker
    forwards one publisher's messages to the cloud in order, so "earlier on the same connection" is exact; the
    margins only make the other cases conservative (no false alarm from a message in flight, or held by a
    broker that was down and delivered when it came back).
(b) **Every revocation ends in an erasure receipt that is true on disk.** For each grant the device had applied
    and then applied a version without it (audit log), an ``erasure`` receipt (``revoked``, ``not-in-force`` or
    ``expired``, ``key_destroyed``) reached the cloud or waits in the outbox; a grant not in force at the end
    has no data key and no row left; no erasure is still pending; and after the calm end the agent reports the
    cloud's newest version (a revocation that never takes effect fails here).
(c) **No seq gap except batches counted as dropped**: per grant, in the outbox's epoch, every seq below the next
    one reached the cloud or is still on disk, except at most as many as erasure receipts and drop counters
    account for; none above it reached the cloud.
(d) The agent stays alive (or is restarted by the explorer, its supervisor, after a kill) and stops within the
    limit on SIGTERM with exit code 0 (tests/explore.py records those).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from vgw.pipeline.catalogue import load_catalogue
from vgw_sim.cloud import EnvelopeError, ReceiptError, open_envelope, verify_receipt
from vgw_sim.paths import default_dbc, default_signal_map
from vgw_sim.pki import device_public_key_from_cert

from tests.explore_model import ConsentModel, Incarnation
from tests.explore_world import Message

M_STATUS = 1.0
M_LOCAL = 2.0
M_RETAINED = 0.5
T_LIVE = 8.0
M_CONNECT = 1.0  # a connection's first status may reach the cloud that late (the cloud reconnecting too)
REVOKED_REASONS = ("revoked", "not-in-force", "expired")


@dataclass
class Disk:
    rows: dict[str, set[int]] = field(default_factory=dict)
    next_seq: dict[str, int] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    receipts: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    epoch: str = ""
    pending: list[Any] = field(default_factory=list)


def read_disk(state: Path) -> Disk | None:
    """The outbox and pending erasures of a stopped agent (None if there is no outbox)."""
    path = state / "outbox.sqlite"
    if not path.exists():
        return None
    d = Disk()
    db = sqlite3.connect(path, timeout=10.0)
    try:
        for g, s in db.execute("SELECT grant_id, seq FROM batches"):
            d.rows.setdefault(str(g), set()).add(int(s))
        d.next_seq = {str(g): int(n) for g, n in db.execute("SELECT grant_id, next_seq FROM seqs")}
        d.keys = {str(g) for (g,) in db.execute("SELECT grant_id FROM grant_keys")}
        d.receipts = [str(t) for (t,) in db.execute("SELECT token FROM receipts")]
        d.counters = {str(k): int(v) for k, v in db.execute("SELECT name, value FROM counters")}
        row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        d.epoch = str(row[0]) if row else ""
    finally:
        db.close()
    pending = state / "erasures.pending.json"
    if pending.exists():
        try:
            doc = json.loads(pending.read_text() or "[]")
            d.pending = doc if isinstance(doc, list) else list(doc.get("pending", [])) if isinstance(doc, dict) else []
        except ValueError:
            d.pending = ["unreadable"]
    return d


def status_of(m: Message) -> dict[str, Any] | None:
    if not m.topic.endswith("/status"):
        return None
    try:
        st = json.loads(m.payload)
    except ValueError:
        return None
    return st if isinstance(st, dict) else None


@cache
def _scope_of() -> dict[str, str]:
    return load_catalogue([default_dbc()], default_signal_map()).scope_of_path()


@dataclass
class Opened:
    inc: Incarnation
    seq: int
    epoch: str
    scopes: frozenset[str]


@dataclass
class Evidence:
    device: str
    model: ConsentModel
    streams: dict[str, list[Message]]
    local: list[tuple[float, int]]
    audit_path: Path
    wall0: float  # time.time() - time.monotonic() when the schedule began
    disk: Disk | None
    device_cert: Path
    _opened: dict[bytes, Opened | None] = field(default_factory=dict)
    _receipts: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    # -- decoding ---------------------------------------------------------------------------------------

    def open(self, m: Message) -> Opened | None:
        if m.payload in self._opened:
            return self._opened[m.payload]
        gid = m.topic.rsplit("/", 1)[1]
        found = None
        for inc in self.model.keys_of(gid):
            try:
                batch = open_envelope(m.payload, inc.key, self.device, gid)
            except EnvelopeError:
                continue
            scope_of = _scope_of()
            scopes = frozenset(scope_of.get(str(s["path"]), "?" + str(s["path"])) for s in batch["samples"])
            found = Opened(inc, int(batch["seq"]), str(batch.get("epoch", "")), scopes)
            break
        self._opened[m.payload] = found
        return found

    def receipt(self, token: str) -> dict[str, Any] | None:
        if token not in self._receipts:
            try:
                self._receipts[token] = verify_receipt(token, device_public_key_from_cert(self.device_cert),
                                                       device=self.device)
            except (ReceiptError, ValueError):
                self._receipts[token] = None
        return self._receipts[token]

    def receipt_tokens(self) -> set[str]:
        tokens = {m.payload.decode("ascii", "replace") for s in self.streams.values() for m in s
                  if m.topic.endswith("/receipt")}
        return tokens | set(self.disk.receipts if self.disk else [])

    def erasures(self) -> list[dict[str, Any]]:
        out = []
        for t in self.receipt_tokens():
            claims = self.receipt(t)
            if claims is not None and claims.get("typ") == "erasure":
                out.append(claims)
        return out

    def erasure_receipts_for(self, gid: str) -> int:
        return sum(1 for c in self.erasures() if c.get("grant") == gid and c.get("reason") in REVOKED_REASONS
                   and c.get("key_destroyed") is True)

    def audit(self) -> list[dict[str, Any]]:
        try:
            lines = self.audit_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict):
                out.append(e)
        return out


def expected_erasures(ev: Evidence) -> dict[str, int]:
    """Per grant: how many times the device applied a version without a grant it had applied before."""
    held: dict[str, Incarnation] = {}
    want: dict[str, int] = {}
    for e in ev.audit():
        if e.get("event") != "consent-applied" or not isinstance(e.get("ver"), int):
            continue
        doc = ev.model.docs.get(e["ver"])
        if doc is None:
            continue
        for gid in list(held):
            if gid not in doc.grants:
                want[gid] = want.get(gid, 0) + 1
                del held[gid]
        for gid, (inc, _scopes) in doc.grants.items():
            held[gid] = inc
    return want


# ---------------------------------------------------------------- the checks


def check(ev: Evidence) -> list[str]:
    return [*_withdrawn_data(ev), *_erasures(ev), *_seqs(ev)]


def _knowledge_events(ev: Evidence) -> list[tuple[float, float, int, str]]:
    """(when, when with its margin, version, how) of every moment the device is known to have applied a version
    (monotonic times)."""
    out: list[tuple[float, float, int, str]] = []
    for name, stream in ev.streams.items():
        for m in stream:
            st = status_of(m)
            if st and st.get("state") == "online" and isinstance(st.get("consent_version"), int):
                out.append((m.arrived, m.arrived + M_STATUS, st["consent_version"], f"its status on {name} said v"))
    for e in ev.audit():
        if e.get("event") == "consent-applied" and isinstance(e.get("ver"), int) and isinstance(e.get("t"),
                                                                                               (int, float)):
            at = e["t"] - ev.wall0
            out.append((at + 0.2, at + M_LOCAL, e["ver"], "its audit log applied v"))
    for at, ver in ev.local:
        out.append((at, at + M_LOCAL, ver, "`vgw consent apply` applied v"))
    return sorted(out)


def _withdrawn_data(ev: Evidence) -> list[str]:
    known_events = _knowledge_events(ev)
    device_msgs = {name: [m.arrived for m in s if not m.topic.startswith("marker/")] for name, s in ev.streams.items()}
    out: list[str] = []
    bad: dict[tuple[str, str, int, str, str], set[int]] = {}
    for name, stream in ev.streams.items():
        others = [a for other, arr in device_msgs.items() if other != name for a in arr]
        consents: list[tuple[float, int]] = []
        live: list[tuple[float, int]] = []
        conn_known, conn_how, status_known = 0, "", 0
        conn_ref = float("-inf")  # when the current connection began (its first status reached the cloud)
        started = conn_started = float("-inf")  # when the explorer started the agent process (of this connection)
        pending_connect, last_arrival = True, float("-inf")
        for m in stream:
            if m.topic.startswith("marker/"):
                pending_connect = True
                if m.topic == "marker/start":
                    started = m.arrived
                if m.topic in ("marker/down", "marker/up"):
                    live = []  # what the broker still delivers after a restart may have been published before
                continue
            kind = m.topic.rsplit("/", 2)
            if m.topic.endswith("/consent"):
                ver = ev.model.genuine_ver(m.payload.decode("ascii", "replace"))
                consents.append((m.arrived, ver))
                if not pending_connect:
                    live.append((m.arrived, ver))
            elif m.topic.endswith("/status"):
                st = status_of(m) or {}
                if st.get("state") != "online":
                    pending_connect = True
                else:
                    switched = any(last_arrival < a < m.arrived for a in others)
                    if pending_connect or switched:
                        pending_connect = False
                        conn_ref, conn_started = m.arrived, started
                        conn_known = _retained(consents, m.arrived)
                        conn_how = f"v{conn_known} was retained on {name} when it connected"
                        status_known, live = 0, []
                    if isinstance(st.get("consent_version"), int):
                        status_known = max(status_known, st["consent_version"])
            elif len(kind) == 3 and kind[1] == "data":
                opened = ev.open(m)
                if opened is None:
                    out.append(f"a: a {kind[2]} batch on {name} that no key of the grant opens")
                    continue
                known, how = conn_known, conn_how
                if status_known > known:
                    known, how = status_known, f"its status said v{status_known} earlier on this connection"
                # Knowledge from elsewhere counts from the start of this connection on, not from this message's
                # arrival (a broker that was down delivers what it held long after it was published): exactly when
                # it came before the explorer started this agent process, with the margins otherwise.
                for at, at_margin, ver, what in known_events:
                    if (at < conn_started or at_margin <= conn_ref - M_CONNECT) and ver > known:
                        known, how = ver, f"{what}{ver} before this connection began"
                for at, ver in live:
                    if at + T_LIVE <= m.arrived and ver > known:
                        known, how = ver, f"v{ver} was delivered live on this connection {T_LIVE:g} s before"
                for scope in sorted(opened.scopes):
                    w = opened.inc.withdrawn_at(scope)
                    if w == 0 or known >= w:
                        bad.setdefault((opened.inc.name, scope, w, name, how), set()).add(opened.seq)
            last_arrival = m.arrived
    for (inc, scope, w, name, how), seqs in sorted(bad.items()):
        out.append(f"a: {inc} {scope} (withdrawn in v{w}) reached the cloud through {name} in {len(seqs)} batch(es) "
                   f"(seq {sorted(seqs)[:6]}), but {how}")
    return out


def _retained(consents: list[tuple[float, int]], connected: float) -> int:
    """The version surely retained when a connection began: the last document that reached the broker more than
    ``M_RETAINED`` s before; if another came within the margin it may have been that one (the smaller counts)."""
    j = None
    for i, (at, _ver) in enumerate(consents):
        if at <= connected - M_RETAINED:
            j = i
    if j is None:
        return 0
    return min(ver for _at, ver in consents[j:])


def _erasures(ev: Evidence) -> list[str]:
    out = []
    for gid, n in sorted(expected_erasures(ev).items()):
        got = ev.erasure_receipts_for(gid)
        if got < n:
            out.append(f"b: {gid} was revoked {n} time(s) after the device applied it, but {got} erasure "
                       f"receipt(s) reached the cloud or wait in the outbox")
    disk = ev.disk
    if disk is None:
        return out
    in_force = set(ev.model.current)
    for claims in ev.erasures():
        gid = str(claims.get("grant"))
        if gid in in_force or claims.get("key_destroyed") is not True:
            continue
        if gid in disk.keys:
            out.append(f"b: an erasure receipt of {gid} says key_destroyed, but its data key is in the outbox")
        if disk.rows.get(gid):
            out.append(f"b: an erasure receipt of {gid} exists, but {len(disk.rows[gid])} row(s) of it are on disk")
    if disk.pending:
        out.append(f"b: erasure(s) still pending at the end: {disk.pending}")
    for gid in sorted(set(disk.keys) - in_force):
        out.append(f"b: {gid} is not in force at the end, but its data key is in the outbox")
    return out


def _seqs(ev: Evidence) -> list[str]:
    disk = ev.disk
    if disk is None:
        return []
    out = []
    seen: dict[str, set[int]] = {}
    for stream in ev.streams.values():
        for m in stream:
            if "/data/" in m.topic:
                opened = ev.open(m)
                if opened is not None and opened.epoch == disk.epoch:
                    seen.setdefault(opened.inc.gid, set()).add(opened.seq)
    erased: dict[str, int] = {}
    for claims in ev.erasures():
        gid = str(claims.get("grant"))
        erased[gid] = erased.get(gid, 0) + int(claims.get("batches_deleted", 0) or 0)
    for gid, nxt in sorted(disk.next_seq.items()):
        committed = set(range(1, nxt))
        missing = committed - seen.get(gid, set()) - disk.rows.get(gid, set())
        counted = erased.get(gid, 0) + sum(v for k, v in disk.counters.items()
                                           if k.endswith(":" + gid) and k.startswith(("dropped", "retention")))
        if len(missing) > counted:
            out.append(f"c: {gid}: {len(missing)} seq(s) neither at the cloud nor on disk (e.g. "
                       f"{sorted(missing)[:5]}), only {counted} counted as erased or dropped")
        above = sorted(s for s in seen.get(gid, set()) if s >= nxt)
        if above:
            out.append(f"c: {gid}: seq(s) {above[:5]} reached the cloud but are above the outbox's next seq {nxt}")
    return out
