"""`vgw install` and `vgw uninstall`: lay the agent out on Debian / Raspberry Pi OS (run as root), or remove it."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("install", help="install the agent: venv in /opt/vgw, units, can0, udev rule",
                       description="Install the agent from this source checkout: a venv under /opt/vgw, "
                       "/etc/vgw, vgw-agent.service (enabled), 80-can0.network, 60-vgw-obd.rules, the vgw user.")
    _common(p)
    p.add_argument("--config", metavar="FILE", type=Path, help="install FILE as /etc/vgw/vgw.toml")
    p.add_argument("--source", metavar="DIR", type=Path, help="the source checkout (default: this one)")
    p.add_argument("--python", metavar="EXE",
                   help="interpreter for the venv, one the agent's user can run (default: this vgw's, else "
                   "/usr/bin/python3; an interpreter in a folder only root may enter is refused)")
    p.add_argument("--no-venv", action="store_true", help="skip creating the venv and pip install")
    p.set_defaults(func=cmd_install)

    u = sub.add_parser("uninstall", help="remove the agent; --purge also erases every grant and the state",
                       description="Remove what `vgw install` laid out. With --purge, first erase every grant "
                       "(data key destroyed, rows deleted, erasure receipt), then remove the state dir and /etc/vgw.")
    _common(u)
    u.add_argument("--purge", action="store_true", help="final erasure of every grant, then remove state and config")
    u.add_argument("--config", metavar="FILE", type=Path,
                   help="config naming the state dir (default PREFIX/etc/vgw/vgw.toml)")
    u.add_argument("--receipt-timeout", metavar="S", type=float, default=10.0,
                   help="seconds to try delivering the erasure receipts to the broker (0: do not try)")
    u.set_defaults(func=cmd_uninstall)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", metavar="DIR", type=Path, default=Path("/"),
                   help="root directory to install into (default /; anything else is a staging tree)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    p.add_argument("--no-systemctl", action="store_true",
                   help="do not create the user or run systemctl/udevadm (implied when --prefix is not /)")


def cmd_install(args: argparse.Namespace) -> int:
    from vgw.ops.install import install

    install(prefix=args.prefix, config=args.config, source=args.source, python=args.python,
            venv=not args.no_venv, system=not args.no_systemctl, dry_run=args.dry_run)
    if not args.dry_run:
        print("Installed. Next: vgw provision --device-id ID --broker HOST:PORT --ca FILE --consent-key FILE "
              "--source can|obd|both")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from vgw.ops.install import uninstall

    uninstall(prefix=args.prefix, purge=args.purge, config=args.config, system=not args.no_systemctl,
              dry_run=args.dry_run, receipt_timeout_s=args.receipt_timeout)
    return 0
