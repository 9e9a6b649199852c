"""`vgw status`: grants in force, outbox rows and bytes per grant, last publish, link state.

``--json`` prints one object (README "Running the agent": ``device``, ``consent_version``, ``grants``,
``outbox`` at least)
with ``schema_version`` (:data:`SCHEMA_VERSION`, raised when a field changes meaning or moves) and the
counters as a tree: ``counters.agent`` (name -> n) and ``counters.grants`` (grant -> name -> n, with
``by_scope`` for per-scope counts), never flat ``name:grant:scope`` keys. ``erasures_pending`` lists the
erasures whose receipt waits until no copy is left in the outbox's files; ``consent_pending`` a consent document
applied in memory whose disk part waits (read from its own record, which a full disk cannot stop); and
``consent_sync`` what the link knows of the consent retained at the broker (README "Topics").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgw.base.timefmt import local_text, valid_time
from vgw.cli import DEFAULT_CONFIG
from vgw.contract.consent.model import version_text

if TYPE_CHECKING:
    from vgw.state.consent.store import ConsentStore

# 1: flat counters ("dropped_quota:g1"); 2: counters.agent / counters.grants[g] (by_scope), this version.
SCHEMA_VERSION = 2


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="what the agent holds and does now", description=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"agent config file (TOML; default {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)


def collect_status(config_path: str) -> dict[str, Any]:
    from vgw.config.settings import load_config
    from vgw.ops.stateview import read_state
    from vgw.state.consent.store import ConsentStore
    from vgw.state.statedir import AgentLock

    cfg = load_config(config_path)
    state = read_state(cfg)
    running = AgentLock.held_by_other(cfg.state_dir)
    live = read_live_status(cfg.state_dir)
    consent = state.consent
    grants = [{"id": g.id, "scopes": list(g.scopes), "expires": consent.exp}
              for g in state.active_grants()] if consent else []
    outbox_view = {g["id"]: {"rows": 0, "bytes": 0} for g in grants}
    outbox_view.update(state.outbox_stats)
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "device": cfg.device.id,
        "state_dir": str(cfg.state_dir),
        "consent_version": consent.ver if consent else None,
        "state": "present" if state.exists else "none",
        "consent_expired": state.expired,
        "grants": grants,
        "outbox": outbox_view,
        "receipts_queued": state.receipts_queued,
        "agent_running": running,
        "link": live.get("link", "offline") if running else "stopped",
        "link_error": live.get("link_error") if running else None,
        # README "Topics": "waiting" while stored batches wait for the consent retained at the broker
        "consent_sync": live.get("consent_sync") if running and isinstance(live.get("consent_sync"), str) else None,
        "last_publish": live.get("last_publish"),
        "counters": structured_counters({**state.counters, **live.get("counters", {})}),
        "quota": {"quota_bytes": cfg.outbox.quota_bytes, "used_bytes": state.used_bytes},
        "storage": live.get("storage", {"ok": True, "error": None}) if running else {"ok": True, "error": None},
        "obd": live.get("obd") if running else None,
        "bus": live.get("bus") if running else None,
        "health": live.get("health", {"ok": True, "problem": None}) if running else {"ok": True, "problem": None},
        # where batches are sealed ([agent] seal_workers): only a running agent's own word
        "seal": live.get("seal") if running and isinstance(live.get("seal"), dict) else None,
        "certificate": certificate_status(cfg, live if running else {}),
        **pending_erasures(ConsentStore(cfg.state_dir)),
    }
    pending = pending_consent(ConsentStore(cfg.state_dir))
    out["consent_pending"] = pending
    if pending is not None:
        # What the cache says is in force, less what the pending document stopped: what is collected now.
        out["grants"] = [g for g in out["grants"] if g["id"] not in pending["grants_stopped"]]
        # Read from the record itself (written in place, so a full disk that stops status.json cannot hide it).
        out["storage"] = {"ok": False, "error": f"consent v{pending['ver']} not yet stored: "
                          + str(pending.get("error") or "retrying")}
    return out


def pending_consent(store: ConsentStore) -> dict[str, Any] | None:
    """``consent_pending``: a document applied in memory whose disk part waits (docs/guarantees.md "Revocation
    wins every race"): its version, the grants it stopped, since when, why. No personal data."""
    from vgw.base.errors import StorageError
    from vgw.contract.consent.verifier import peek_version
    from vgw.state.consent.pending import read_record

    try:
        raw = store.read_pending_apply()
        doc = read_record(raw) if raw is not None else None
    except (StorageError, ValueError):
        return None
    if doc is None:
        return None
    since = doc.get("since")
    return {"ver": peek_version(doc["token"]), "grants_stopped": sorted(str(g) for g in doc["stopped"]),
            "since": since if valid_time(since) else None, "error": doc.get("error")}


def certificate_status(cfg: Any, live: dict[str, Any]) -> dict[str, Any]:
    """The client certificate (README "Enrollment"): ``not_after`` read from [mqtt] cert_file (a read, nothing
    written), and from the running agent the renewal ``state``, ``attempts`` and ``last_error``."""
    from cryptography import x509

    from vgw.state.credentials import device_credentials

    out: dict[str, Any] = {"not_after": None, "state": None, "attempts": 0, "last_error": None}
    cert_file, _key = device_credentials(cfg.mqtt.cert_file, cfg.mqtt.key_file, cfg.state_dir)
    try:
        leaf = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
        out["not_after"] = leaf.not_valid_after_utc.timestamp()
    except (OSError, ValueError, IndexError):
        pass
    renewal = live.get("certificate")
    if isinstance(renewal, dict):
        if isinstance(renewal.get("state"), str):
            out["state"] = renewal["state"]
        if isinstance(renewal.get("attempts"), int):
            out["attempts"] = renewal["attempts"]
        if isinstance(renewal.get("last_error"), str):
            out["last_error"] = renewal["last_error"][:300]
        if valid_time(renewal.get("renew_from")):
            out["renew_from"] = renewal["renew_from"]
    return out


def pending_erasures(store: ConsentStore) -> dict[str, Any]:
    """``erasures_pending``: erasures (and narrowings) done in the outbox whose receipt waits until no copy is
    left in its files (README "Receipts"): grant, reason, since when, batches deleted; no personal data."""
    from vgw.base.errors import StorageError

    try:
        items = store.pending_erasures()
    except StorageError as exc:
        return {"erasures_pending": [], "erasures_pending_error": str(exc)}
    return {"erasures_pending": [{"grant": p.grant, "reason": p.reason, "since": p.since,
                                  "batches_deleted": p.batches_deleted} for p in items]}


def structured_counters(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"frames": 9, "dropped_quota:g1": 2, "sent_samples:g1:read_fuel": 5}`` ->
    ``{"agent": {"frames": 9}, "grants": {"g1": {"dropped_quota": 2, "by_scope": {"read_fuel": {"sent_samples": 5}}}}}``
    """
    agent: dict[str, Any] = {}
    grants: dict[str, dict[str, Any]] = {}
    for key, value in sorted(flat.items()):
        name, _, rest = key.partition(":")
        if not rest:
            agent[name] = value
            continue
        gid, _, scope = rest.partition(":")
        entry = grants.setdefault(gid, {})
        if scope:
            entry.setdefault("by_scope", {}).setdefault(scope, {})[name] = value
        else:
            entry[name] = value
    return {"agent": agent, "grants": grants}


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB" (IEC units, as df -h and du -h print them)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """65 -> "1 min 5 s ago"."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min {s % 60} s ago"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min ago"
    return f"{s // 86400} d {s % 86400 // 3600} h ago"


def read_live_status(state_dir: Path) -> dict[str, Any]:
    """The running agent's status file with its known fields checked: a damaged or hand-edited file (not JSON,
    not an object, a time no calendar shows, counters that are not numbers) must not break `vgw status`.
    A field that fails its check is dropped, as if the agent had not written it. Raises StorageError for a file
    the agent never writes (see :func:`vgw.state.statedir.read_status_file`)."""
    from vgw.state.statedir import read_status_file

    raw = read_status_file(state_dir)
    live: dict[str, Any] = dict(raw)
    for key in ("link", "link_error"):
        if not isinstance(live.get(key), str):
            live.pop(key, None)
    if not valid_time(live.get("last_publish")):
        live.pop("last_publish", None)
    counters = live.pop("counters", None)
    if isinstance(counters, dict):
        live["counters"] = {k: v for k, v in counters.items()
                            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    storage = live.pop("storage", None)
    if isinstance(storage, dict) and isinstance(storage.get("ok"), bool):
        live["storage"] = {"ok": storage["ok"], "error": str(storage.get("error") or "") or None}
    return live


def cmd_status(args: argparse.Namespace) -> int:
    st = collect_status(args.config)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"device {st['device']}: agent {'running' if st['agent_running'] else 'not running'}, link {st['link']}"
          + (f" ({st['link_error']})" if st["link_error"] else ""))
    if st["state"] == "none":
        print(f"no state yet: {st['state_dir']} does not exist (nothing was applied or collected here)")
    if st["consent_version"] is None:
        print("consent: none in force (nothing is collected)")
    else:
        print(f"consent: {version_text(st['consent_version']).removeprefix('consent ')}"
              + (" EXPIRED" if st["consent_expired"] else ""))
    per_grant = st["counters"]["grants"]
    for g in st["grants"]:
        ob = st["outbox"].get(g["id"], {"rows": 0, "bytes": 0})
        print(f"  grant {g['id']}: {', '.join(g['scopes'])}; outbox {ob['rows']} batch(es), "
              f"{human_bytes(ob['bytes'])}")
    quota = st["quota"]
    drops = {gid: c["dropped_quota"] for gid, c in per_grant.items() if c.get("dropped_quota")}
    share = 100 * quota["used_bytes"] / quota["quota_bytes"] if quota["quota_bytes"] else 0.0
    print(f"outbox: {human_bytes(quota['used_bytes'])} of {human_bytes(quota['quota_bytes'])} quota ({share:.0f} %)"
          + ("; dropped for quota: " + ", ".join(f"{g} {n} batch(es)" for g, n in sorted(drops.items()))
             if drops else ""))
    if st.get("consent_sync") == "waiting":
        print("link: stored data wait for the consent document retained at the broker")
    elif st.get("consent_sync") == "none":
        print("link: no consent document retained at the broker (stored data go out under the cached consent)")
    if st.get("consent_pending"):
        p = st["consent_pending"]
        which = version_text(p["ver"]) if p["ver"] is not None else "a consent document"
        print(f"{which} PENDING: applied in memory, not yet on disk ({p.get('error') or 'retrying'}); "
              f"stopped: {', '.join(p['grants_stopped']) or 'none'}")
    if not st["storage"]["ok"]:
        print(f"storage: NOT STORING ({st['storage']['error']}); "
              f"{st['counters']['agent'].get('store_failures', 0)} batch(es) not stored")
    obd = st["obd"]
    if obd:
        print(f"obd: {obd['state']}" + ("" if obd["ok"] else f" (FAILING: {obd['last_error']})"))
    bus = st["bus"]
    if bus and bus.get("silent"):
        print(f"can: SILENT, no frame for {bus['last_frame_age_s']:.0f} s (check [can] channel, cable, simulator)")
    seal = st["seal"]
    if seal and seal.get("workers"):
        print(f"sealing: {seal.get('mode')}" + (f", worker pid {seal['pid']}" if seal.get("pid") else "")
              + (f", {seal['restarts']} restart(s)" if seal.get("restarts") else "")
              + (f" ({seal['error']})" if seal.get("error") and seal.get("mode") != "worker" else ""))
    if not st["health"]["ok"]:
        print(f"health: NOT OK ({st['health']['problem']}); the systemd watchdog restarts the agent")
    if st["erasures_pending"]:
        print("erasures pending (no receipt until no copy is left): " + "; ".join(
            f"{p['grant']} {p['reason']}, {p['batches_deleted']} batch(es), since "
            + (local_text(p["since"]) if valid_time(p["since"]) else "unknown") for p in st["erasures_pending"]))
    if st.get("erasures_pending_error"):
        print(f"erasures pending: UNREADABLE ({st['erasures_pending_error']})")
    cert = st["certificate"]
    if cert["not_after"] is not None:
        line = f"certificate: valid until {local_text(cert['not_after'])}"
        if cert["state"] in ("refused", "failed"):
            line += (f"; RENEWAL FAILING ({cert['attempts']} attempt(s): {cert['last_error']}); "
                     "still using the current certificate, retrying")
        elif cert["state"] not in (None, "valid", "off"):
            line += f"; renewal {cert['state']}"
        print(line)
    last = st["last_publish"]
    print(f"last publish: {f'{local_text(last)} ({human_age(time.time() - last)})' if last else 'never'}; "
          f"receipts queued: {st['receipts_queued']}")
    return 0
