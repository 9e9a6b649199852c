"""`vgw run --config FILE`: the agent daemon, in the foreground (systemd runs it)."""

from __future__ import annotations

import argparse

from vgw.cli import DEFAULT_CONFIG


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run the agent (foreground)", description=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"agent config file (TOML; default {DEFAULT_CONFIG})")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from vgw.cli import RUN_SIGNALS
    from vgw.config.settings import load_config
    from vgw.daemon.agent import run_agent

    return run_agent(load_config(args.config), RUN_SIGNALS)
