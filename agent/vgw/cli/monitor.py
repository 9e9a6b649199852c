"""`vgw monitor`: a live view of each mapped signal, its rate, and whether the consent in force sends it.

    vgw monitor --config FILE [-i INTERFACE] [-c CHANNEL] [-b BITRATE] [--fd] [--interval S] [--duration S]

On a terminal the view redraws in place (plain ANSI, fine over SSH; q or Ctrl-C quits); otherwise it prints
the table every --interval seconds (default 5). It reads the CAN source itself and the consent from the state
directory, read-only: run it as the agent's user. A serial adapter or pty has one reader: give the monitor its
own (`-c`), e.g. the second pty of `vgw sim can --link A --link B`.
"""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("monitor", help="live view: signal values, rates, and what consent does with them",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="agent config file (TOML)")
    p.add_argument("-i", "--interface", help="read this python-can interface instead of the config's")
    p.add_argument("-c", "--channel", help="read this channel instead of the config's (e.g. a second SLCAN pty)")
    p.add_argument("-b", "--bitrate", type=int, help="open the bus at this bitrate in bit/s instead of the config's")
    p.add_argument("--fd", action="store_true", help="open the bus in CAN FD mode (README \"CAN FD\")")
    p.add_argument("--interval", type=float, metavar="S",
                   help="seconds between redraws (default 0.5 on a terminal, 5 otherwise)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until q/Ctrl-C)")
    p.set_defaults(func=cmd_monitor)


def cmd_monitor(args: argparse.Namespace) -> int:
    from vgw.base.errors import ConfigError
    from vgw.config.settings import load_config
    from vgw.ops.monitor import run_monitor

    if args.interval is not None and args.interval <= 0:
        raise ConfigError(f"--interval {args.interval}: must be > 0")
    cfg = load_config(args.config)
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = [(s, signal.signal(s, handler)) for s in (signal.SIGINT, signal.SIGTERM)]
    try:
        return run_monitor(cfg, interface=args.interface, channel=args.channel, bitrate=args.bitrate, fd=args.fd,
                           interval=args.interval, duration=args.duration, stop=stop)
    finally:
        for sig, old in previous:
            signal.signal(sig, old)
