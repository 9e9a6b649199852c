"""`vgw demo`: mosquitto (mTLS), vehicle simulator, cloud peer and agent on one machine; revokes a grant."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the whole system locally and revoke a grant half-way",
                       description=__doc__)
    p.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds to run (default 20)")
    p.add_argument("--json", action="store_true", help="end with one JSON summary on stdout")
    p.add_argument("--keep", type=Path, metavar="DIR", help="copy the demo's state, PKI and logs to DIR")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from vgw.tools.demo import run_demo

    return run_demo(args.duration, as_json=args.json, keep=args.keep)
