"""`vgw cloud enroll`: the enrollment and renewal service, and device revocation (README "Enrollment").

    vgw cloud enroll serve --broker HOST:PORT --ca FILE --cert FILE --tls-key FILE
                           --ca-cert FILE --ca-key FILE --allow FILE --ledger FILE [--days N]
    vgw cloud enroll revoke --ca-cert FILE --ca-key FILE --ledger FILE --crl FILE [--device-id ID | DEVICE]

``serve`` answers until SIGTERM/SIGINT and prints a ready line on stderr once subscribed; ``revoke`` without
DEVICE writes the CRL of the devices revoked so far (an empty one at first: a broker with ``crlfile`` needs one).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any


def register(sub: Any, broker_options: Any) -> None:
    """Add ``enroll`` to the ``vgw cloud`` sub-commands; ``broker_options(parser, required=)`` adds
    --broker/--ca/--cert/--tls-key/--protocol/--prefix/--client-id."""
    e = sub.add_parser("enroll", help="the enrollment and renewal service; revoke a device (CRL)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.set_defaults(func=lambda _a: (e.print_help(sys.stderr), 2)[1])
    esub = e.add_subparsers(dest="enroll_command", metavar="COMMAND")

    s = esub.add_parser("serve", help="answer enrollment and renewal requests until stopped")
    broker_options(s, required=True)
    _ca_options(s)
    s.add_argument("--allow", type=Path, required=True, metavar="FILE",
                   help="allow file (TOML): [[device]] tables with id and token")
    s.add_argument("--ledger", type=Path, required=True, metavar="FILE",
                   help="append-only record of issuances and revocations (created)")
    s.add_argument("--days", type=int, default=365, metavar="N", help="certificate validity (default 365)")
    s.add_argument("--duration", type=float, metavar="S", help=argparse.SUPPRESS)
    s.set_defaults(func=run_serve, cloud_command="enroll")

    r = esub.add_parser("revoke", help="revoke every certificate issued to DEVICE and write the CRL (PEM)")
    _ca_options(r)
    r.add_argument("--ledger", type=Path, required=True, metavar="FILE", help="the service's ledger")
    r.add_argument("--crl", type=Path, required=True, metavar="FILE", help="the CRL to write (the broker's crlfile)")
    r.add_argument("--device-id", "--device", dest="device_id", metavar="ID",
                   help="device id, as the other commands take it (omit, and DEVICE: only write the CRL)")
    r.add_argument("device", nargs="?", metavar="DEVICE", help="device id, instead of --device-id")
    r.set_defaults(func=run_revoke)


def _ca_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-cert", type=Path, required=True, metavar="FILE", help="the CA that signs device certificates")
    p.add_argument("--ca-key", type=Path, required=True, metavar="FILE", help="its private key")


def run_serve(args: argparse.Namespace) -> int:
    import os
    import time

    from vgw.cli.cloud import _on_signals, _opts, _restore
    from vgw.cloud.enrollment import EnrollService, Issuer

    issuer = Issuer.load(args.ca_cert, args.ca_key, args.allow, args.ledger, args.days)
    opts = _opts(args)
    if args.client_id is None:
        opts = type(opts)(**{**opts.__dict__, "client_id": f"vgw-cloud-enroll-{os.getpid()}"})
    service = EnrollService(opts, issuer)
    stop = threading.Event()
    previous = _on_signals(stop)

    def announce() -> None:
        if service.ready.wait(60) and not stop.is_set():
            print(f"vgw cloud enroll: serving {opts.prefix}/enroll/+/request and {opts.prefix}/+/cert/request "
                  f"({len(issuer.allow.tokens)} device(s) allowed)", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        service.run(stop, deadline=None if args.duration is None else time.monotonic() + args.duration)
    finally:
        _restore(previous)
    print(json.dumps({"summary": {**issuer.counts, "dropped": service.dropped}}), file=sys.stderr)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from vgw.base.errors import ConfigError
    from vgw.cloud.enrollment import revoke

    if args.device_id is not None and args.device is not None and args.device_id != args.device:
        raise ConfigError(f"two devices: --device-id {args.device_id} and DEVICE {args.device}; give one")
    device = args.device_id if args.device_id is not None else args.device
    serials = revoke(args.ca_cert, args.ca_key, args.ledger, args.crl, device)
    if device is None:
        print(f"wrote {args.crl}")
    else:
        print(f"revoked {device}: {len(serials)} certificate(s) added; wrote {args.crl}")
    return 0
