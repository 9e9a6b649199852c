"""`vgw doctor --config FILE [--json]`: check this device end to end; exit 1 if any check FAILs."""

from __future__ import annotations

import argparse
import json

from vgw.cli import DEFAULT_CONFIG


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("doctor", help="self-check: config, CAN/OBD, certificate, broker, clock, state, consent",
                       description=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"agent config file (TOML; default {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="print a JSON list of {check, status, detail}")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from vgw.ops.doctor import exit_code, format_text, run_checks

    results = run_checks(args.config)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print(format_text(results))
    return exit_code(results)
