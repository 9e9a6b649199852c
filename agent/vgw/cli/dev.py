"""`vgw dev`: your own dev stack in a directory you keep (README "Your own dev stack").

    vgw dev init DIR [--device-id ID] [--trace FILE]   lay out broker config, PKI, keys, grants, agent config
    vgw dev up DIR [--service | --no-service]          start broker, simulator, cloud listener, agent (background);
                                                       --service: the owner's consent service signs the car's
                                                       consent from now on, --no-service: grants.toml again
    vgw dev status DIR [--json]                        which parts run
    vgw dev down DIR                                stop them (logs, state and keys stay)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``vgw dev`` and its actions to the top-level ``subparsers``."""
    p = subparsers.add_parser("dev", help="a kept dev stack in a directory: init, up, status, down",
                              description=__doc__.split("\n\n")[0])
    p.set_defaults(func=lambda _a: (p.print_help(sys.stderr), 2)[1])
    sub = p.add_subparsers(dest="dev_command", metavar="ACTION")

    i = sub.add_parser("init", help="lay out a new dev stack in DIR (broker, PKI 0600, keys, grants, config)")
    i.add_argument("dir", type=Path, metavar="DIR")
    i.add_argument("--device-id", "--device", dest="device", metavar="ID", default="dev-car-01",
                   help="device id (default dev-car-01)")
    i.add_argument("--trace", type=Path, metavar="FILE",
                   help="the agent replays this trace (copied in, looped) instead of the simulator's SLCAN pty")
    i.set_defaults(func=cmd_init)

    u = sub.add_parser("up", help="start the stack's parts in the background (pid files in DIR/run)")
    u.add_argument("dir", type=Path, metavar="DIR")
    u.add_argument("--service", action=argparse.BooleanOptionalAction, default=None,
                   help="--service: start the owner's consent service (docs/consent-service.md) and let it alone "
                        "sign the car's consent from now on, every later `up` too (grants.toml is then not pushed); "
                        "--no-service: stop it and sign grants.toml again. Default: keep the stack's choice")
    u.set_defaults(func=cmd_up)

    s = sub.add_parser("status", help="which parts of the stack run (exit 3 unless all do)")
    s.add_argument("dir", type=Path, metavar="DIR")
    s.add_argument("--json", action="store_true",
                   help='one JSON object: {"dir", "running" (all parts), "parts": {NAME: {"running", "pid"}}}')
    s.set_defaults(func=cmd_status)

    d = sub.add_parser("down", help="stop the stack's parts (everything on disk stays)")
    d.add_argument("dir", type=Path, metavar="DIR")
    d.set_defaults(func=cmd_down)


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def cmd_init(args: argparse.Namespace) -> int:
    from vgw.tools.devstack import init

    stack = init(args.dir, device=args.device, trace=args.trace, progress=_say)
    print(f"dev stack laid out in {stack.dir}; start it with: vgw dev up {args.dir}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from vgw.tools.devstack import parts, up

    stack = up(args.dir, service=args.service, progress=_say)
    d = args.dir
    own_adapter = f" -c {d}/run/can1" if "sim" in parts(stack) else ""  # a pty has one reader: the agent's
    print(f"dev stack running in {stack.dir}. Next:\n"
          f"  vgw status --config {d}/vgw.toml          what the agent holds and sends\n"
          f"  vgw monitor --config {d}/vgw.toml{own_adapter}   live view of the signals and the consent\n"
          f"  tail -f {d}/logs/agent.log {d}/cloud/received.jsonl\n"
          f"  vgw dev down {d}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from vgw.tools.devstack import status

    parts = status(args.dir)
    running = all(pid for pid in parts.values())
    if args.json:
        print(json.dumps({"dir": str(args.dir.expanduser().absolute()), "running": running,
                          "parts": {part: {"running": pid is not None, "pid": pid} for part, pid in parts.items()}}))
    else:
        for part, pid in parts.items():
            print(f"{part:<7} {'running (pid ' + str(pid) + ')' if pid else 'stopped'}")
    return 0 if running else 3


def cmd_down(args: argparse.Namespace) -> int:
    from vgw.tools.devstack import down

    stack = down(args.dir, progress=_say)
    print(f"dev stack in {stack.dir} stopped (logs, state and keys kept)")
    return 0
