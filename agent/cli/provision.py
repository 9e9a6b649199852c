"""`vgw provision`: create this device's identity, keys, state dir and config; later install its certificate.

Step 1: vgw provision --device-id ID --broker HOST:PORT --ca FILE --consent-key FILE [--out DIR] [--force]
Step 2: vgw provision --install-cert FILE [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vgw.provisioning import DEFAULT_OUT, Report


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "provision", help="create the device key, CSR, storage key and config; install the signed certificate",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device-id", metavar="ID", help="this device's id (MQTT client id, certificate CN and SAN)")
    p.add_argument("--broker", metavar="HOST:PORT", help="the MQTT broker (port 8883 if omitted)")
    p.add_argument("--ca", metavar="FILE", type=Path, help="PEM CA certificate(s) the broker's certificate chains to")
    p.add_argument("--consent-key", metavar="FILE", type=Path,
                   help="Ed25519 public key (PEM) whose consent documents this device accepts")
    p.add_argument("--out", metavar="DIR", type=Path, default=DEFAULT_OUT,
                   help=f"config folder (default {DEFAULT_OUT})")
    p.add_argument("--state-dir", metavar="DIR", type=Path,
                   help="state folder (default /var/lib/vgw with the default --out, else DIR/state)")
    p.add_argument("--dbc-dir", metavar="DIR", type=Path,
                   help="folder with the vehicle.dbc and signals.toml to copy (default: the shipped ones)")
    p.add_argument("--force", action="store_true",
                   help="replace existing keys (a new identity: the old certificate stops matching)")
    p.add_argument("--install-cert", metavar="FILE", type=Path,
                   help="install the certificate the cloud CA signed (checks it matches the key and the CA)")
    p.set_defaults(func=cmd_provision, _parser=p)


def _print(report: Report, title: str) -> None:
    print(title)
    for line in report.lines:
        print(f"  {line}")
    if report.next_steps:
        print("Next steps:")
        for i, step in enumerate(report.next_steps, 1):
            print(f"  {i}. {step}")


def cmd_provision(args: argparse.Namespace) -> int:
    from vgw.provisioning import install_cert, provision

    parser: argparse.ArgumentParser = args._parser
    if args.install_cert is not None:
        extra = [f"--{n.replace('_', '-')}" for n in ("device_id", "broker", "consent_key", "state_dir", "dbc_dir")
                 if getattr(args, n) is not None]
        if extra or args.force:
            parser.error(f"--install-cert takes only --out and --ca, not {(extra or ['--force'])[0]}")
        report = install_cert(args.install_cert, out=args.out, ca=args.ca)
        _print(report, "Certificate installed.")
        return 0
    missing = [f"--{n.replace('_', '-')}" for n in ("device_id", "broker", "ca", "consent_key")
               if getattr(args, n) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --install-cert FILE)")
    report = provision(device_id=args.device_id, broker=args.broker, ca=args.ca, consent_key=args.consent_key,
                       out=args.out, state_dir=args.state_dir, dbc_dir=args.dbc_dir, force=args.force)
    _print(report, f"Provisioned device {args.device_id} in {args.out.expanduser().absolute()}.")
    return 0
