"""`vgw sim`: the simulators (README "Running the agent").

``vgw sim can`` drives the demo vehicle onto a bus or into a trace, with can-utils' short flags::

    vgw sim can [-i slcan|socketcan|virtual] [-c CHANNEL] [-b BITRATE] [--link PATH ...] [--dbc FILE]
                [--seed N] [--vin VIN] [--duration S] [--realtime | --fast]
    vgw sim can --record trace.log [--duration 60] [--realtime | --fast]
    vgw sim can --play trace.log [-l N|i] [--fast] [-i ...]        # like canplayer -I trace.log

The default output is an SLCAN adapter on a pseudo-terminal, which any process on any Linux can open (a
python-can ``virtual`` bus reaches only its own process). Its path is the first line of stdout, then it
serves until killed (or ``--duration``); stderr says which ``[can]`` lines make the agent read it. Each
``--link PATH`` adds one more adapter on the same simulated bus with a stable symbolic link to its pty
(a pty has one reader: the agent takes one, ``vgw monitor`` another). Other simulators plug in as modules
``vgw.cli.sim_<name>`` (see ``_SIM_COMMANDS``) exposing ``register(sim_subparsers)``.

A J1939 DBC (messages with ``VFrameFormat`` ``J1939PG``) drives a J1939 truck: its parameter groups from
several source addresses, a DM1 fault that comes and goes, VIN and component identification by TP.BAM
(simulators/vgw_sim/j1939_sim.py). A DBC with CAN FD messages (``VFrameFormat`` ``StandardCAN_FD`` or
``ExtendedCAN_FD``, or more than 8 bytes) sends them as FD frames: SocketCAN opens in FD mode (the interface
must be up with ``fd on``), the SLCAN pty writes them in the CANable 2.0 dialect (``d``/``D``/``b``/``B``
lines) that python-can's slcan reads; an adapter firmware without that dialect cannot carry FD.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from vgw.base.errors import ConfigError

# Further `vgw sim <name>` commands, each in vgw.cli.sim_<name> with register(sim_subparsers).
_SIM_COMMANDS = ("elm327", "fleet")

DEFAULT_RECORD_S = 60.0


def register(subparsers: Any) -> None:
    """Add the ``sim`` command and its simulators to the top-level ``subparsers``."""
    sim = subparsers.add_parser(
        "sim", help="run a simulator (CAN bus, ELM327 ...)", description=__doc__.split("\n\n")[0]
    )
    sim.set_defaults(func=lambda _args: _usage(sim))
    sim_sub = sim.add_subparsers(dest="simulator", metavar="SIMULATOR")
    _register_can(sim_sub)
    for name in _SIM_COMMANDS:
        try:
            module = importlib.import_module(f"vgw.cli.sim_{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"vgw.cli.sim_{name}":
                continue  # not built yet
            raise
        module.register(sim_sub)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _register_can(sim_sub: Any) -> None:
    p = sim_sub.add_parser(
        "can",
        help="simulated vehicle CAN traffic (SLCAN pty, SocketCAN, virtual bus, or a trace file)",
        description="Drive the demo vehicle and send its DBC-encoded frames at their cycle times, or play a "
        "recorded trace like canplayer. Default output: an SLCAN adapter on a pty (path on stdout's first line).",
    )
    p.add_argument("-i", "--interface", choices=("slcan", "socketcan", "virtual"),
                   help="output bus (default slcan: a pty any process can open; virtual reaches only this process)")
    p.add_argument("-c", "--channel", help="bus channel (socketcan/virtual; default vcan0)")
    p.add_argument("-b", "--bitrate", type=int, help="bitrate in bit/s, where the interface takes one")
    p.add_argument("--link", action="append", default=[], metavar="PATH",
                   help="slcan: a symbolic link PATH to the pty, one more adapter per --link (repeatable)")
    p.add_argument("--dbc", type=Path, help="vehicle description: DBC, ARXML, KCD or SYM (default: the shipped "
                   "dbc/vehicle.dbc)")
    p.add_argument("--seed", type=int, default=1, help="vehicle model seed (default 1)")
    p.add_argument("--vin", help="VIN the vehicle reports (default: a sample VIN)")
    p.add_argument("--duration", type=float, help="simulated seconds (default: forever; 60 with --record)")
    p.add_argument(
        "--record", type=Path, metavar="FILE", help="write a trace (.log = candump) instead of a bus"
    )
    p.add_argument("-I", "--play", type=Path, metavar="FILE",
                   help="send a recorded trace (candump .log, .asc, .blf ...) with its timing, like canplayer")
    p.add_argument("-l", "--loop", default="1", metavar="N|i",
                   help="with --play: play the trace N times, i = forever (default 1)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime",
        dest="realtime",
        action="store_true",
        default=None,
        help="pace frames at their real periods (default for buses)",
    )
    pace.add_argument(
        "-t", "--fast", dest="realtime", action="store_false",
        help="as fast as possible (default for --record; with --play: ignore the timestamps, canplayer -t)"
    )
    p.add_argument(
        "--no-obd", dest="obd", action="store_false",
        help="do not answer OBD-II requests (by default the simulated ECUs answer ISO-TP on 0x7DF/0x7E0)"
    )
    p.set_defaults(func=run_can)


def _loops(text: str) -> int | None:
    if text == "i":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--loop {text!r}: expected a number >= 1 or i (forever)")
    return n


def run_can(args: argparse.Namespace) -> int:
    """Run ``vgw sim can``. Raises ConfigError / SourceOpenError (printed as one line by the CLI)."""
    from vgw_sim.can_sim import CanSimulator, open_output
    from vgw_sim.j1939_sim import J1939Simulator, is_j1939_dbc
    from vgw_sim.vehicle import DEFAULT_VIN, VehicleModel

    if args.duration is not None and args.duration < 0:
        raise ConfigError(f"--duration must be >= 0, got {args.duration}")
    if args.record is not None and (args.interface is not None or args.play is not None):
        raise ConfigError("use --record FILE alone, not with --interface or --play")
    if args.link and args.interface not in (None, "slcan"):
        raise ConfigError("--link makes SLCAN ptys: it needs -i slcan")
    loops = _loops(args.loop)
    if args.play is not None:
        from vgw_sim.can_play import check_trace

        check_trace(args.play)  # a bad trace is one line on stderr before any pty appears
        if args.duration is not None:
            raise ConfigError("--play sends the trace's own length: use --loop, not --duration")
    try:
        model = VehicleModel(seed=args.seed, vin=args.vin or DEFAULT_VIN)
    except ValueError as exc:
        raise ConfigError(f"--vin: {exc}") from exc
    sim = CanSimulator(args.dbc, model)
    if is_j1939_dbc(sim.messages):
        # A J1939 DBC (VFrameFormat J1939PG): a truck network -- several sources, DM1, VIN by TP.BAM.
        sim = J1939Simulator(args.dbc, model)

    if args.record is not None:
        duration = DEFAULT_RECORD_S if args.duration is None else args.duration
        started = time.monotonic()
        count = sim.record(args.record, duration, realtime=bool(args.realtime))
        print(
            f"vgw sim can: recorded {count} frames ({duration:g} s simulated) to {args.record} "
            f"in {time.monotonic() - started:.2f} s",
            file=sys.stderr,
        )
        return 0

    interface = args.interface or "slcan"
    links = tuple(str(Path(link).absolute()) for link in args.link)
    bus = open_output(interface, args.channel, args.bitrate, fd=sim.has_fd, links=links)
    stop = threading.Event()
    previous = _on_sigterm(stop)
    responder: Any = None  # ObdResponder or J1939Responder: each has close()
    try:
        if interface == "slcan":
            # README "Simulated buses": the pty path is the first line of stdout; one line per further adapter follows.
            for path in getattr(bus, "paths", [getattr(bus, "path", "")]):
                print(path, flush=True)
        _hint(interface, bus, args, links)
        if args.play is not None:
            pass  # a recorded trace answers nothing
        elif isinstance(sim, J1939Simulator):
            # The truck's engine answers J1939 requests (PGN 59904) for its VIN and component identification.
            from vgw_sim.j1939_sim import J1939Responder

            responder = J1939Responder(bus, sim).start()
        elif args.obd:
            # The simulated ECUs also answer OBD-II requests (ISO-TP on 0x7DF/0x7E0 -> 0x7E8) on this bus.
            from vgw_sim.obd_responder import attach

            responder = attach(bus, sim.model)
        started = time.monotonic()
        realtime = True if args.realtime is None else args.realtime
        skipped = 0
        if args.play is not None:
            from vgw_sim.can_play import Skipped, play

            if interface == "slcan" and not _wait_for_reader(bus, stop):
                return 0  # stopped before anybody read the bus
            damaged = Skipped()
            sent = play(bus, args.play, loops=loops, realtime=realtime, stop_event=stop, skipped=damaged)
            skipped = damaged.lines
        else:
            sent = sim.run(bus, args.duration, realtime=realtime, stop_event=stop)
        print(
            f"vgw sim can: sent {sent} frames on {bus.channel_info} in {time.monotonic() - started:.1f} s"
            + (f" ({sim.dropped} dropped)" if sim.dropped else "")
            + (f"; skipped {skipped} damaged line(s) of the trace (per pass)" if skipped else ""),
            file=sys.stderr,
        )
    finally:
        if responder is not None:
            responder.close()
        bus.shutdown()
        _restore_sigterm(previous)
    return 0


def _wait_for_reader(bus: Any, stop: threading.Event) -> bool:
    """A trace played onto SLCAN ptys before any program opened one would reach nobody (a pty's path is only
    known once it exists, so the reader always comes later): wait until one opens its channel. False when
    stopped first."""
    adapters = getattr(bus, "adapters", [bus])
    if any(a.is_open for a in adapters):
        return True
    print("vgw sim can: --play waits until a reader (the agent, vgw monitor) opens the channel", file=sys.stderr,
          flush=True)
    while not stop.wait(0.05):
        if any(a.is_open for a in adapters):
            return True
    return False


def _hint(interface: str, bus: Any, args: argparse.Namespace, links: tuple[str, ...]) -> None:
    """Tell a person on stderr how to make the agent read this bus (the exact [can] lines)."""
    if interface == "virtual":
        print("vgw sim can: a python-can virtual bus reaches only this process; another process sees nothing "
              "(use the default -i slcan, or -i socketcan with vcan)", file=sys.stderr, flush=True)
        return
    if interface == "slcan":
        paths = list(links) + getattr(bus, "paths", [bus.path])[len(links):]
        lines = ['interface = "slcan"', f'channel = "{paths[0]}"', f"bitrate = {args.bitrate or 500000}"]
        more = (f"\n  a second program (vgw monitor, a logger) opens its own adapter: {', '.join(paths[1:])}"
                if len(paths) > 1 else "")
    else:
        lines = ['interface = "socketcan"', f'channel = "{args.channel or "vcan0"}"']
        more = ""
    print("vgw sim can: to read this bus with the agent, put into [can] of its config:\n    "
          + "\n    ".join(lines) + more, file=sys.stderr, flush=True)


def _on_sigterm(stop: threading.Event) -> Any:
    """Let SIGTERM (systemd, ``kill``, a test's terminate()) end the simulator cleanly."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
