"""`vgw cloud serve|app add|owner add`: the owner's consent service (README "The owner's consent service").

    vgw cloud serve --config FILE
    vgw cloud app add --config FILE --id ID --name NAME --redirect-uri URI --recipient FILE [--purpose TEXT]
    vgw cloud owner add --config FILE --id OWNER --device-id ID      (password on stdin)

Registered by :mod:`vgw.cli.cloud`. Needs the ``service`` extra (``pip install 'vgw[service]'``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from vgw.base.errors import ConfigError


def register(sub: Any) -> None:
    """Add ``serve``, ``app`` and ``owner`` to ``vgw cloud``'s subparsers."""
    s = sub.add_parser("serve", help="the owner's consent service: OAuth 2.0 sign-in, consent and withdrawal pages",
                       description="Serve the owner's consent service (an OAuth 2.0 authorization server, RFC 6749 "
                                   "with PKCE S256): owners allow and withdraw apps' access in a browser; each "
                                   "change is signed, pushed to the car and receipted (docs/consent-service.md).")
    s.add_argument("--config", type=Path, required=True, help="the service's TOML file ([service], [broker])")
    s.set_defaults(func=run_serve)

    a = sub.add_parser("app", help="register an app (OAuth client) with the consent service")
    asub = a.add_subparsers(dest="app_command", metavar="COMMAND")
    a.set_defaults(func=lambda _a: (a.print_help(sys.stderr), 2)[1])
    aa = asub.add_parser("add", help="register an app; prints {client_id, client_secret} as JSON")
    aa.add_argument("--config", type=Path, required=True, help="the service's TOML file")
    aa.add_argument("--id", required=True, help="the app's client id (also the grant's controller)")
    aa.add_argument("--name", required=True, help="the name owners see")
    aa.add_argument("--redirect-uri", required=True, help="the one redirect URI, matched exactly")
    aa.add_argument("--recipient", type=Path, required=True,
                    help="the app's public key file (`vgw cloud keygen`'s recipients/NAME.pub.json)")
    aa.add_argument("--purpose", help="what the app uses the data for, as owners read it (default: the name)")
    aa.set_defaults(func=run_app_add)

    o = sub.add_parser("owner", help="register a car's owner with the consent service")
    osub = o.add_subparsers(dest="owner_command", metavar="COMMAND")
    o.set_defaults(func=lambda _a: (o.print_help(sys.stderr), 2)[1])
    oa = osub.add_parser("add", help="register the owner of a device; the password is read from stdin")
    oa.add_argument("--config", type=Path, required=True, help="the service's TOML file")
    oa.add_argument("--id", required=True, help="the owner's user name")
    oa.add_argument("--device-id", "--device", dest="device", metavar="ID", required=True,
                    help="the device id of the owner's car")
    oa.set_defaults(func=run_owner_add)


def _config(args: argparse.Namespace) -> Any:
    try:
        from vgw.cloud.service.config import load_service_config
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigError(f"the consent service needs its extra: pip install 'vgw[service]' ({exc.name} missing)"
                          ) from exc
    return load_service_config(args.config)


def run_serve(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vgw.cloud.service.server import ConsentService

    service = ConsentService(cfg)
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = [(sig, signal.signal(sig, handler)) for sig in (signal.SIGTERM, signal.SIGINT)]
    ready = threading.Event()

    def stopper() -> None:
        stop.wait()
        service.stop()

    threading.Thread(target=stopper, name="vgw-service-stopper", daemon=True).start()

    def announce() -> None:
        if ready.wait(60):
            host, port = service.address
            scheme = "https" if cfg.https else "http"
            print(f"vgw cloud serve: listening on {scheme}://{host}:{port} (issuer {cfg.issuer})", file=sys.stderr,
                  flush=True)

    threading.Thread(target=announce, name="vgw-service-announce", daemon=True).start()
    try:
        service.serve(ready)
    finally:
        stop.set()
        for sig, old in previous:
            signal.signal(sig, old)
    return 0


def run_app_add(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vgw.cloud.service.server import add_app

    out = add_app(cfg, client_id=args.id, name=args.name, redirect_uri=args.redirect_uri, recipient=args.recipient,
                  purpose=args.purpose)
    print(json.dumps(out))
    return 0


def run_owner_add(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from vgw.cloud.service.server import add_owner

    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ConfigError("vgw cloud owner add: give the password on stdin (one line)")
    add_owner(cfg, owner_id=args.id, device=args.device, password=password)
    print(f"owner {args.id} of device {args.device} registered", file=sys.stderr)
    return 0
