"""`vgw status`: grants in force, outbox rows and bytes per grant, last publish, link state."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from vgw.timefmt import local_text, valid_time


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="what the agent holds and does now", description=__doc__)
    p.add_argument("--config", required=True, help="agent config file (TOML)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)


def collect_status(config_path: str) -> dict[str, Any]:
    from vgw.config import load_config
    from vgw.runtime import STATUS_FILE, AgentLock
    from vgw.stateview import read_state

    cfg = load_config(config_path)
    state = read_state(cfg)
    running = AgentLock.held_by_other(cfg.state_dir)
    live = read_live_status(cfg.state_dir / STATUS_FILE)
    consent = state.consent
    grants = [{"id": g.id, "scopes": list(g.scopes), "expires": consent.exp}
              for g in state.active_grants()] if consent else []
    outbox_view = {g["id"]: {"rows": 0, "bytes": 0} for g in grants}
    outbox_view.update(state.outbox_stats)
    return {
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
        "last_publish": live.get("last_publish"),
        "counters": {**state.counters, **live.get("counters", {})},
        "quota": {"quota_bytes": cfg.outbox.quota_bytes, "used_bytes": state.used_bytes},
        "storage": live.get("storage", {"ok": True, "error": None}) if running else {"ok": True, "error": None},
        "obd": live.get("obd") if running else None,
        "health": live.get("health", {"ok": True, "problem": None}) if running else {"ok": True, "problem": None},
    }


def read_live_status(path: Path) -> dict[str, Any]:
    """The running agent's status file with its known fields checked: a damaged or hand-edited file (not JSON,
    not an object, a time no calendar shows, counters that are not numbers) must not break `vgw status`.
    A field that fails its check is dropped, as if the agent had not written it."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}
    if not isinstance(raw, dict):
        return {}
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
        print(f"consent: v{st['consent_version']}" + (" EXPIRED" if st["consent_expired"] else ""))
    for g in st["grants"]:
        ob = st["outbox"].get(g["id"], {"rows": 0, "bytes": 0})
        print(f"  grant {g['id']}: {', '.join(g['scopes'])}; outbox {ob['rows']} batch(es), {ob['bytes']} bytes")
    quota = st["quota"]
    drops = {k.split(":", 1)[1]: v for k, v in st["counters"].items() if k.startswith("dropped_quota:") and v}
    print(f"outbox: {quota['used_bytes']} of {quota['quota_bytes']} bytes (quota)"
          + ("; dropped for quota: " + ", ".join(f"{g} {n} batch(es)" for g, n in sorted(drops.items()))
             if drops else ""))
    if not st["storage"]["ok"]:
        print(f"storage: NOT STORING ({st['storage']['error']}); "
              f"{st['counters'].get('store_failures', 0)} batch(es) not stored")
    obd = st["obd"]
    if obd:
        print(f"obd: {obd['state']}" + ("" if obd["ok"] else f" (FAILING: {obd['last_error']})"))
    if not st["health"]["ok"]:
        print(f"health: NOT OK ({st['health']['problem']}); the systemd watchdog restarts the agent")
    last = st["last_publish"]
    print(f"last publish: {local_text(last) if last else 'never'}; "
          f"receipts queued: {st['receipts_queued']}")
    return 0
