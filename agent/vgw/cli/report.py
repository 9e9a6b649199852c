"""`vgw report`: per grant and scope, what left the car and what was deleted and why (no signal values)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vgw.base.errors import ConfigError
from vgw.cli import DEFAULT_CONFIG


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="privacy report: what left the car, what was deleted and why",
                       description=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"agent config file (TOML; default {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page for the vehicle owner")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from vgw.base.fsutil import atomic_write
    from vgw.ops.report import collect, render_html, render_text

    report = collect(args.config)
    if args.html:
        out = Path(args.html)
        if not out.parent.is_dir():
            raise ConfigError(f"{out}: folder {out.parent} does not exist")
        atomic_write(out, render_html(report).encode("utf-8"), mode=0o644)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_text(report), end="")
        if args.html:
            print(f"HTML report written to {args.html}")
    return 0
