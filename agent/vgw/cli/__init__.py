"""The `vgw` command line (README "Running the agent").

Each subcommand lives in its own module under ``vgw.cli`` and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (``Callable[[argparse.Namespace], int]``) as the default. ``main`` turns
every :class:`~vgw.base.errors.VgwError` into one line on stderr and a non-zero exit; ``--debug`` shows the
traceback instead.

Daemon conventions (systemd and can-utils habits): ``--config`` defaults to :data:`DEFAULT_CONFIG`;
``--debug`` and ``--log-level`` are accepted before or after the subcommand; ``vgw run`` reloads on SIGHUP
(vgw.daemon.agent, "Reload").
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

from vgw.base.errors import VgwError
from vgw.daemon.signals import DaemonSignals

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
    "enroll",
    "doctor",
    "install",
    "bench",
    "dev",
    "monitor",
)

# Long-running commands log progress at INFO; the others print their result and log errors only.
_DAEMONS = {"run", "sim"}

DEFAULT_CONFIG = "/etc/vgw/vgw.toml"  # where `vgw provision` writes it (docs/install-raspberry-pi.md)
LOG_LEVELS = ("debug", "info", "warning", "error")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3


# reStructuredText inline markup of the module docstrings the subcommands take as descriptions.
_RST_ROLE = re.compile(r":(?:data|class|func|meth|mod|attr|exc|obj|ref):`~?([^`]+)`")


def plain_text(text: str) -> str:
    """A docstring's inline markup as a terminal shows it: ``x`` and :role:`a.b.x` become `x` (the backticks
    every help text uses for a command or a name); a ``~`` target keeps its last part, as Sphinx shows it."""

    def role(match: re.Match[str]) -> str:
        target = match.group(1)
        shown = target.rpartition(".")[2] if match.group(0).find("`~") >= 0 else target
        return f"`{shown}`"

    return _RST_ROLE.sub(role, text).replace("``", "`")


class VgwArgumentParser(argparse.ArgumentParser):
    """The parser of `vgw` and (by argparse's own inheritance through ``add_subparsers``) of every subcommand:
    help and usage are printed as plain text (:func:`plain_text`), so a module docstring can be the description.
    The description is made plain before argparse wraps it; what else carries markup is made plain as printed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key in ("description", "epilog"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = plain_text(kwargs[key])
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        return plain_text(super().format_help())

    def format_usage(self) -> str:
        return plain_text(super().format_usage())


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `vgw`; with ``command`` (one of :data:`_COMMANDS`), only that subcommand's module is
    imported and registered: `vgw run` does not import the modules of `vgw provision`, `vgw cloud`, ... at
    every start (docs/performance.md, "A lighter start"). Without it, every subcommand (help, a typo)."""
    parser = VgwArgumentParser(prog="vgw", description="vgw: consent-first edge vehicle gateway")
    _log_options(parser, argparse.SUPPRESS)
    parser.set_defaults(debug=False, log_level=None)
    parser.add_argument("--version", action="version", version=f"vgw {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (command,) if command in _COMMANDS else _COMMANDS:
        importlib.import_module(f"vgw.cli.{name}").register(sub)
    _log_options_everywhere(sub)
    return parser


def _log_options(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=default,
                   help="log threshold (default: info for `run` and `sim`, error for the others)")


def _log_options_everywhere(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``--debug``/``--log-level`` after any subcommand too (`vgw run --debug`), as daemons take them.

    SUPPRESS as the default: a subcommand that does not see the option leaves the top-level value alone.
    """
    for p in set(sub.choices.values()):
        if not any(a.dest == "debug" for a in p._actions):
            _log_options(p, argparse.SUPPRESS)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _log_options_everywhere(action)


def command_of(args: Sequence[str]) -> str | None:
    """The subcommand ``args`` name (after the global ``--debug``, ``--log-level LEVEL``), or None (none, an
    option such as ``--help`` or ``--version`` first, or a name that is no subcommand)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--log-level":
            i += 2
        elif arg == "--debug" or arg.startswith("--log-level="):
            i += 1
        else:
            return arg if arg in _COMMANDS else None
    return None


def _version() -> str:
    from vgw import __version__

    return __version__


# `vgw run`'s signal handlers, installed before anything else loads: a stop while it is still starting
# (imports, config) is remembered and honoured as soon as the agent exists (vgw.daemon.signals).
RUN_SIGNALS = DaemonSignals()


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "run" in args_in[:3]:
        # systemd may stop the service before it is up: a SIGTERM now must still end in a clean exit 0.
        RUN_SIGNALS.install()
    parser = build_parser(command_of(args_in))
    args = parser.parse_args(args_in)
    from vgw.base.logs import setup_logging

    daemon = args.command in _DAEMONS or getattr(args, "cloud_command", None) == "serve"  # `vgw cloud serve` too
    setup_logging(debug=args.debug, verbose=daemon, level=args.log_level)
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
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "vgw_sim" or args.debug:
            raise
        # The car's install (agent/pyproject.toml, what `vgw install` lays out) has no simulators.
        print(f"vgw {args.command}: needs the simulators (vgw_sim), which the car's install leaves out; install vgw "
              "from the repository's top folder (pip install .) on a development machine", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    finally:
        logging.shutdown()
