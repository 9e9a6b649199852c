"""`vgw audit verify|show`: check the hash chain of the audit log, or list it.

Both read only ``audit.log`` in the state directory (no keys, no outbox), so they work while `vgw run` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vgw.base.errors import ConfigError
from vgw.base.timefmt import utc_text

EXIT_BROKEN = 1
# Shown first in `audit show`; every other field follows in name order.
_LEAD = ("n", "t", "event")
_HIDDEN = ("prev", "hash")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("audit", help="verify or list the hash-chained audit log", description=__doc__)
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    v = asub.add_parser("verify", help="check the chain; report the first broken link (exit 1 if broken)")
    _source_args(v)
    v.add_argument("--json", action="store_true", help="print the result as one JSON object")
    v.set_defaults(func=cmd_verify)

    s = asub.add_parser("show", help="list the audit log")
    _source_args(s)
    s.add_argument("--json", action="store_true", help="print one JSON object per line (the raw entries)")
    s.set_defaults(func=cmd_show)


def _source_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="agent config file (TOML); the log is <state_dir>/audit.log")
    src.add_argument("--file", help="an audit log file to read directly (e.g. a copy taken off the device)")


def _open(args: argparse.Namespace) -> Any:
    """The audit log to read: a copy named by ``--file``, or the state directory's (read as a state file)."""
    from vgw.state.audit import AuditLog

    if args.file:
        path = Path(args.file)
        if not path.exists():
            raise ConfigError(f"{path}: audit log not found")
        return AuditLog(path.parent, file=path)
    from vgw.config.settings import load_config

    return AuditLog(load_config(args.config).state_dir)


def cmd_verify(args: argparse.Namespace) -> int:
    log = _open(args)
    path, result = log.path, log.verify()
    if args.json:
        print(json.dumps({"file": str(path), "ok": result.ok, "entries": result.entries,
                          "first_bad_line": result.first_bad, "reason": result.reason or None}))
    elif result.ok:
        print(f"{path}: audit chain intact ({result.entries} entries)")
    else:
        print(f"{path}: audit chain BROKEN at line {result.first_bad}: {result.reason}", file=sys.stderr)
    return 0 if result.ok else EXIT_BROKEN


def cmd_show(args: argparse.Namespace) -> int:
    log = _open(args)
    path, entries = log.path, log.entries()
    if args.json:
        for e in entries:
            print(json.dumps(e, sort_keys=True))
        return 0
    if not entries:
        print(f"{path}: no audit entries")
        return 0
    for e in entries:
        print(format_entry(e))
    return 0


def format_entry(e: dict[str, Any]) -> str:
    """One readable line: number, UTC time, event, then the other fields as key=value."""
    t = e.get("t")
    when = utc_text(t, "%Y-%m-%d %H:%M:%SZ", missing="?")  # a damaged entry may hold any number
    rest = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(e.items()) if k not in _LEAD and k not in _HIDDEN)
    return f"{e.get('n', '?'):>5} {when} {e.get('event', '?'):<18} {rest}".rstrip()


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v if v and " " not in v else json.dumps(v)
    return json.dumps(v, separators=(",", ":"), sort_keys=True)
