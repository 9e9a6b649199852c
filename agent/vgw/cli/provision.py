"""`vgw provision`: create this device's identity, keys, state dir and config; later install its certificate.

Step 1: vgw provision --device-id ID --broker HOST:PORT --ca FILE --consent-key FILE
                      --source can --dbc FILE --signal-map FILE   (your vehicle's DBC and signal map)
                   or --source obd [--obd-port /dev/vgw-obd]      (a USB OBD-II adapter only)
                   or --source both --dbc FILE --signal-map FILE
                      [--out DIR] [--force]
Step 2: vgw provision --install-cert FILE [--out DIR]

Zero-touch (README "Enrollment"): step 1 plus --enroll-claim-cert FILE --enroll-claim-key FILE
--enroll-token TOKEN enrolls right away with the batch's claim identity: no CSR to carry, no step 2.

Without --source on a terminal, provision asks. --demo-dbc uses the demo car's DBC (a test bench only: it
decodes nothing meaningful on a real vehicle).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vgw.ops.provisioning import DEFAULT_CAN_CHANNEL, DEFAULT_OBD_PORT, DEFAULT_OUT, SERVICE_USER, Report, Sources

SOURCE_CHOICES = {"1": "can", "2": "obd", "3": "both", "can": "can", "obd": "obd", "both": "both"}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "provision", help="create the device key, CSR, storage key and config; install the signed certificate",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device-id", "--device", dest="device_id", metavar="ID",
                   help="this device's id (MQTT client id, certificate CN and SAN)")
    p.add_argument("--broker", metavar="HOST:PORT", help="the MQTT broker (port 8883 if omitted)")
    p.add_argument("--ca", metavar="FILE", type=Path, help="PEM CA certificate(s) the broker's certificate chains to")
    p.add_argument("--consent-key", metavar="FILE", type=Path,
                   help="Ed25519 public key (PEM) whose consent documents this device accepts")
    p.add_argument("--source", choices=("can", "obd", "both"),
                   help="where the vehicle's data come from: the CAN bus, a USB OBD-II adapter, or both "
                   "(asked on a terminal when omitted)")
    p.add_argument("--dbc", metavar="FILE", type=Path, action="append",
                   help="your vehicle's description: DBC, ARXML, KCD or SYM (repeat for several); copied "
                        "next to the config")
    p.add_argument("--signal-map", metavar="FILE", type=Path,
                   help="your signal map (DBC signal -> VSS path -> scope); copied next to the config")
    p.add_argument("--demo-dbc", action="store_true",
                   help="use the demo car's DBC and signal map (a test bench only; warns)")
    p.add_argument("--can-channel", metavar="NAME", default=DEFAULT_CAN_CHANNEL,
                   help=f"SocketCAN interface (default {DEFAULT_CAN_CHANNEL})")
    p.add_argument("--obd-port", metavar="PATH", default=DEFAULT_OBD_PORT,
                   help=f"serial port of the OBD-II adapter (default {DEFAULT_OBD_PORT}, from 60-vgw-obd.rules)")
    p.add_argument("--out", metavar="DIR", type=Path, default=DEFAULT_OUT,
                   help=f"config folder (default {DEFAULT_OUT})")
    p.add_argument("--state-dir", metavar="DIR", type=Path,
                   help="state folder (default /var/lib/vgw with the default --out, else DIR/state)")
    p.add_argument("--dbc-dir", metavar="DIR", type=Path,
                   help="folder with a vehicle.dbc and signals.toml: the same as --dbc DIR/vehicle.dbc "
                   "--signal-map DIR/signals.toml")
    p.add_argument("--force", action="store_true",
                   help="replace existing keys (a new identity: the old certificate stops matching)")
    p.add_argument("--service-user", metavar="NAME|UID[:GID]", default=SERVICE_USER,
                   help=f"run as root: the account the agent runs as (User= of vgw-agent.service; default "
                   f"{SERVICE_USER}), given the state dir and the device key; an existing state dir keeps its owner")
    p.add_argument("--install-cert", metavar="FILE", type=Path,
                   help="install the certificate the cloud CA signed (checks it matches the key and the CA)")
    e = p.add_argument_group("zero-touch enrollment (instead of step 2)")
    e.add_argument("--enroll-claim-cert", metavar="FILE", type=Path, help="the batch's claim certificate")
    e.add_argument("--enroll-claim-key", metavar="FILE", type=Path, help="its private key")
    e.add_argument("--enroll-token", metavar="TOKEN", help="this device's one-time enrollment token")
    e.add_argument("--enroll-timeout", metavar="S", type=float, default=60.0,
                   help="give up waiting for the enrollment service after S seconds (default 60; exit 2)")
    p.set_defaults(func=cmd_provision, _parser=p)


def _print(report: Report, title: str) -> None:
    for warning in report.warnings:
        bar = "!" * 78
        print(f"{bar}\nWARNING: {warning}\n{bar}", file=sys.stderr)
    print(title)
    for line in report.lines:
        print(f"  {line}")
    if report.next_steps:
        print("Next steps:")
        for i, step in enumerate(report.next_steps, 1):
            print(f"  {i}. {step}")


def _ask(question: str) -> str:
    """One answer from the terminal; end of input is a usage error, never a silent default."""
    try:
        return input(question).strip()
    except EOFError:
        raise SystemExit("vgw provision: no answer (end of input); pass --source and its files as flags") from None


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def resolve_sources(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Sources:
    """Sources from the flags, asking on a terminal for what is missing; a usage error off a terminal."""
    dbc: list[Path] = list(args.dbc or [])
    signal_map: Path | None = args.signal_map
    if args.dbc_dir is not None:
        if dbc or signal_map is not None:
            parser.error("--dbc-dir replaces --dbc and --signal-map: give one or the other")
        dbc, signal_map = [args.dbc_dir / "vehicle.dbc"], args.dbc_dir / "signals.toml"
    source = args.source
    if source is None and (dbc or args.demo_dbc):
        source = "can"
    if source is None:
        if not _interactive():
            parser.error("choose the data source: --source can (with --dbc FILE --signal-map FILE), "
                         "--source obd, or --source both")
        print("Where does this device read the vehicle's data?\n"
              f"  1) the CAN bus ({args.can_channel}) with your vehicle's DBC and signal map\n"
              f"  2) a USB OBD-II adapter ({args.obd_port})\n"
              "  3) both")
        while (source := SOURCE_CHOICES.get(_ask("Choose 1, 2 or 3: ").lower())) is None:
            print("Please answer 1, 2 or 3.")
    can = source in ("can", "both")
    demo = bool(args.demo_dbc)
    if can and demo and (dbc or signal_map is not None):
        parser.error("--demo-dbc and --dbc/--signal-map exclude each other")
    if can and not demo and (not dbc or signal_map is None):
        if not _interactive():
            parser.error(f"--source {source} needs your vehicle's --dbc FILE and --signal-map FILE "
                         "(--demo-dbc: the demo car's, for a test bench only)")
        while not dbc:
            answer = _ask("Your vehicle's DBC file (or 'demo' for the demo car's, a test bench only): ")
            if answer.lower() == "demo":
                demo = True
                break
            if answer:
                dbc = [Path(answer).expanduser()]
        while not demo and signal_map is None:
            answer = _ask("Your signal map (signals.toml: DBC signal -> VSS path -> scope): ")
            signal_map = Path(answer).expanduser() if answer else None
    if not can and (dbc or signal_map is not None or demo):
        parser.error("--source obd takes no --dbc, --signal-map or --demo-dbc (they describe a CAN bus)")
    return Sources(can=can, obd=source in ("obd", "both"), dbc=tuple(dbc), signal_map=signal_map, demo=demo,
                   can_channel=args.can_channel, obd_port=args.obd_port)


def cmd_provision(args: argparse.Namespace) -> int:
    from vgw.ops.provisioning import install_cert, provision, resolve_account

    parser: argparse.ArgumentParser = args._parser
    if args.install_cert is not None:
        extra = [f"--{n.replace('_', '-')}" for n in ("device_id", "broker", "consent_key", "state_dir", "dbc_dir",
                                                       "source", "dbc", "signal_map")
                 if getattr(args, n) is not None]
        if extra or args.force or args.demo_dbc:
            parser.error(f"--install-cert takes only --out and --ca, not {(extra or ['--force/--demo-dbc'])[0]}")
        report = install_cert(args.install_cert, out=args.out, ca=args.ca)
        _print(report, "Certificate installed.")
        return 0
    missing = [f"--{n.replace('_', '-')}" for n in ("device_id", "broker", "ca", "consent_key")
               if getattr(args, n) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --install-cert FILE)")
    enrolling = [getattr(args, n) is not None for n in ("enroll_claim_cert", "enroll_claim_key", "enroll_token")]
    if any(enrolling) and not all(enrolling):
        parser.error("--enroll-claim-cert, --enroll-claim-key and --enroll-token go together")
    sources = resolve_sources(args, parser)
    report = provision(device_id=args.device_id, broker=args.broker, ca=args.ca, consent_key=args.consent_key,
                       sources=sources, out=args.out, state_dir=args.state_dir, force=args.force,
                       service_user=resolve_account(args.service_user))
    if all(enrolling):
        return _enroll_now(args, report)
    _print(report, f"Provisioned device {args.device_id} in {args.out.expanduser().absolute()} "
                   f"(source: {sources.kind}).")
    return 0


def _enroll_now(args: argparse.Namespace, step1: Report) -> int:
    """Step 1 done: enroll now instead of step 2. Exit 0 enrolled, 1 refused, 2 no answer (as `vgw enroll`)."""
    from vgw.base.errors import EnrollmentRefused, EnrollmentTimeout
    from vgw.ops.provisioning import enroll_provisioned

    step1.next_steps.clear()  # the CSR steps: the enrollment service does them
    _print(step1, f"Provisioned device {args.device_id} in {args.out.expanduser().absolute()}.")
    again = (f"vgw enroll --config {args.out.expanduser().absolute() / 'vgw.toml'} --claim-cert "
             f"{args.enroll_claim_cert} --claim-key {args.enroll_claim_key} --token TOKEN")
    try:
        report = enroll_provisioned(args.enroll_claim_cert, args.enroll_claim_key, args.enroll_token, out=args.out,
                                    timeout=args.enroll_timeout)
    except EnrollmentRefused as exc:
        print(f"vgw provision: {exc}", file=sys.stderr)
        return 1
    except EnrollmentTimeout as exc:
        print(f"vgw provision: {exc}; when the broker is reachable: {again}", file=sys.stderr)
        return 2
    _print(report, "Enrolled.")
    return 0
