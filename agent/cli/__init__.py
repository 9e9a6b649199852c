"""The `vgw` command line (README "Running the agent").

Each subcommand lives in its own module under ``vgw.cli`` and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (``Callable[[argparse.Namespace], int]``) as the default. ``main`` turns
every :class:`~vgw.errors.VgwError` into one line on stderr and a non-zero exit; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from vgw.errors import VgwError

# Subcommand modules, imported in this order; each registers its own parser.
_COMMANDS = (
    "run",
    "consent",
    "status",
    "demo",
    "sim",
    "cloud",
    "audit",
    "report",
    "provision",
    "doctor",
    "install",
    "bench",
)

# Long-running commands log progress at INFO; the others print their result and log errors only.
_DAEMONS = {"run", "sim"}

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vgw", description="vgw: consent-first edge vehicle gateway")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"vgw {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"vgw.cli.{name}").register(sub)
    return parser


def _version() -> str:
    from vgw import __version__

    return __version__


# Signals that arrived while `vgw run` was still starting (imports, config); the agent honours them at once.
EARLY_SIGNALS: list[int] = []


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "run" in args_in[:3] and threading.current_thread() is threading.main_thread():
        # systemd may stop the service before it is up: a SIGTERM now must still end in a clean exit 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: EARLY_SIGNALS.append(signum))
    parser = build_parser()
    args = parser.parse_args(argv)
    from vgw.logs import setup_logging

    setup_logging(debug=args.debug, verbose=args.command in _DAEMONS)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except VgwError as exc:
        if args.debug:
            raise
        print(f"vgw {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    finally:
        logging.shutdown()
