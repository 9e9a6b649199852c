"""`vgw sim elm327`: a simulated ELM327 v1.5 adapter plugged into the simulated car.

    vgw sim elm327 [--scenario normal|engine-off|unplugged|clone|slow|no-auto|endless|drip|flood|echo-probe]
                   [--tcp [--port N]] [--seed N] [--protocol 3|6|7|8|9]

The first line of stdout is what to put in ``[obd] port``: the pty path (``/dev/pts/N``), or with ``--tcp``
a pyserial URL ``socket://127.0.0.1:PORT`` (a Wi-Fi dongle); stderr says which ``[obd]`` lines make the
agent read it, as ``vgw sim can`` does for ``[can]``. It then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType
from typing import Any

from vgw.base.errors import ConfigError


def register(sim_subparsers: Any) -> None:
    """Add ``elm327`` to the ``vgw sim`` subcommands."""
    scenarios: tuple[str, ...] | None = None
    protocols: tuple[str, ...] | None = None
    try:
        from vgw_sim.elm327_sim import SCENARIOS, SIMULATED_CAR_PROTOCOLS

        scenarios, protocols = SCENARIOS, SIMULATED_CAR_PROTOCOLS
    except ModuleNotFoundError:  # the car's install: `vgw sim elm327` then says what is missing when run
        pass

    p = sim_subparsers.add_parser("elm327", help="simulated ELM327 OBD-II adapter on a pty (or TCP)",
                                  description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="normal", choices=scenarios, help="fault scenario (default normal)")
    p.add_argument("--tcp", action="store_true", help="listen on 127.0.0.1 like a Wi-Fi dongle instead of a pty")
    p.add_argument("--port", type=int, default=0, help="TCP port with --tcp (default: a free port)")
    p.add_argument("--seed", type=int, default=1, help="vehicle model seed (default 1)")
    p.add_argument("--protocol", default="6", choices=protocols,
                   help="the car's OBD protocol (ELM327 numbering; default 6 = CAN 11/500)")
    p.set_defaults(func=run_elm327)


def run_elm327(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT. Raises ConfigError when the TCP port cannot be bound."""
    from vgw_sim.elm327_sim import Elm327Simulator

    sim = Elm327Simulator(scenario=args.scenario, seed=args.seed, car_protocol=args.protocol)
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.tcp:
            try:
                port = sim.open_tcp("127.0.0.1", args.port)
            except OSError as exc:
                raise ConfigError(f"--port {args.port}: cannot listen on 127.0.0.1: {exc.strerror}") from exc
            where = f"socket://127.0.0.1:{port}"
        else:
            where = sim.open_pty()
        print(where, flush=True)
        # protocol "auto" lets the agent find the car's protocol as it would on a real car.
        print(f'vgw sim elm327: to read this adapter with the agent, put into [obd] of its config:\n'
              f'    port = "{where}"\n    protocol = "auto"', file=sys.stderr, flush=True)
        while not stop.wait(0.2):
            pass
    finally:
        sim.close()
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
