"""`vgw enroll`: zero-touch enrollment of this device (README "Enrollment").

    vgw enroll --config FILE --claim-cert FILE --claim-key FILE --token TOKEN [--timeout S]
    vgw enroll ... --token-file FILE      (the token from a file, 0600: kept out of the process list)

Exit 0: a certificate was issued and installed (or the device was enrolled already: nothing changed);
1: refused (the service's reason on stderr); 2: no answer within --timeout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vgw.cli import DEFAULT_CONFIG

EXIT_REFUSED = 1
EXIT_TIMEOUT = 2


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("enroll", help="get this device's certificate with a claim identity and a one-time token",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"agent config file (TOML; default {DEFAULT_CONFIG})")
    p.add_argument("--claim-cert", type=Path, required=True, metavar="FILE", help="the batch's claim certificate")
    p.add_argument("--claim-key", type=Path, required=True, metavar="FILE", help="its private key")
    token = p.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="this device's one-time enrollment token")
    token.add_argument("--token-file", type=Path, metavar="FILE", help="read the token from FILE (first line)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="give up after S seconds without an answer (default 60; exit 2)")
    p.set_defaults(func=cmd_enroll)


def read_token(path: Path) -> str:
    """The first line of a token file. Raises ConfigError naming the file."""
    from vgw.base.errors import ConfigError
    from vgw.base.fsutil import read_small_file

    try:
        text = read_small_file(path, what="token file", max_bytes=4096, error=ConfigError).decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the token file: {exc}") from exc
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError(f"{path}: the token file is empty")
    return token


def cmd_enroll(args: argparse.Namespace) -> int:
    from vgw.base.errors import EnrollmentRefused, EnrollmentTimeout
    from vgw.ops.enroll import enroll

    if not args.timeout > 0:
        print(f"vgw enroll: --timeout {args.timeout}: must be > 0", file=sys.stderr)
        return EXIT_REFUSED
    token = args.token if args.token is not None else read_token(args.token_file)
    try:
        done = enroll(Path(args.config), args.claim_cert, args.claim_key, token, args.timeout)
    except EnrollmentRefused as exc:
        print(f"vgw enroll: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except EnrollmentTimeout as exc:
        print(f"vgw enroll: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    until = f"{done.not_after:%Y-%m-%d}"
    if done.already:
        print(f"{done.device}: already enrolled (certificate {done.serial}, valid until {until}); nothing changed")
    else:
        key = "new key made on this device" if done.key_made else "existing key"
        print(f"{done.device}: enrolled (certificate {done.serial}, valid until {until}; {key})")
    return 0
