"""`vgw cloud`: the cloud side of the contract (README "The contract, in our words"), for integrators and operators.

    vgw cloud keygen --dir KEYS [--recipient NAME ...] [--force]
    vgw cloud sign --key KEYS/consent-signer.key --grants grants.toml --device-id ID [...] [--ver N] [-o OUT]
    vgw cloud push BROKER-OPTIONS DOC [DOC ...]
    vgw cloud revoke --key K --current DOC (--grant ID ... | --all) [-o OUT] [BROKER-OPTIONS]
    vgw cloud listen BROKER-OPTIONS --recipient FILE|DIR --device-cert FILE|DIR [--share GROUP] [--out FILE]
    vgw cloud listen --nats HOST:PORT[,...] --ca CA --cert CERT --tls-key KEY --recipient ... [--durable NAME]
    vgw cloud relay --nats HOST:PORT[,...] --ca CA --cert CERT --tls-key KEY [--prefer N] [--drain S]
    vgw cloud verify-receipt --device-cert FILE|DIR [--json] FILE
    vgw cloud serve --config FILE                  (the owner's consent service: vgw.cli.cloud_service)
    vgw cloud app add ... / vgw cloud owner add ...
    vgw cloud enroll serve|revoke ...   (README "Enrollment")

BROKER-OPTIONS: --broker HOST:PORT --ca CA --cert CERT --tls-key KEY [--protocol auto|5|3.1.1] [--prefix vgw],
or as mosquitto_pub/sub spell them: -h HOST [-p PORT] --cafile CA --cert CERT --key KEY (push, listen, revoke:
there -h is the broker host and --help the help; in revoke --key stays the consent signing key).
Exit codes: 0 success, 1 error (one line on stderr), 3 receipt/document rejected.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any

import jwt

from vgw.cli import cloud_enroll, cloud_service
from vgw.contract.consent.model import version_text
from vgw.contract.topics import consent_topic

EXIT_REJECTED = 3


def register(subparsers: Any) -> None:
    """Add ``vgw cloud`` and its commands to the top-level ``subparsers``."""
    p = subparsers.add_parser("cloud", help="the cloud side: consent keys, documents, push, listen, receipts",
                              description=__doc__.split("\n\n")[0])
    p.set_defaults(func=lambda _a: (p.print_help(sys.stderr), 2)[1])
    sub = p.add_subparsers(dest="cloud_command", metavar="COMMAND")

    k = sub.add_parser("keygen", help="consent signing key and HPKE recipient key pairs (private keys 0600)")
    k.add_argument("--dir", type=Path, required=True, help="key directory (created)")
    k.add_argument("--recipient", action="append", default=[], metavar="NAME",
                   help="a controller's recipient key pair recipients/NAME.key + NAME.pub.json (repeatable)")
    k.add_argument("--no-signer", action="store_true", help="only recipient keys")
    k.add_argument("--force", action="store_true", help="replace existing keys")
    k.set_defaults(func=run_keygen)

    s = sub.add_parser("sign", help="sign consent documents from a TOML/JSON grants description")
    s.add_argument("--key", type=Path, required=True, help="consent signing key (keygen's consent-signer.key)")
    s.add_argument("--grants", type=Path, required=True, help="grants description (.toml or .json)")
    s.add_argument("--device-id", "--device", dest="device", action="append", default=[], metavar="ID",
                   help="device id (repeatable)")
    s.add_argument("--ver", type=int, help="document version (default: Unix time in ms, always rising)")
    s.add_argument("-o", "--out", type=Path,
                   help="output file (one device) or directory (DEVICE.jws each); default stdout")
    s.set_defaults(func=run_sign)

    pu = _mqtt_parser(sub, "push", summary="publish consent documents retained to their devices' consent topics")
    _broker_options(pu, required=True)
    pu.add_argument("docs", nargs="+", type=Path, metavar="DOC", help="consent document files (compact JWS)")
    pu.set_defaults(func=run_push)

    r = _mqtt_parser(sub, "revoke", summary="the next consent version without some or all grants (and push it)")
    r.add_argument("--key", type=Path, required=True, help="consent signing key")
    r.add_argument("--current", type=Path, required=True, help="the document in force (as last signed)")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--grant", action="append", metavar="ID", help="grant to revoke (repeatable)")
    which.add_argument("--all", action="store_true", help="revoke every grant (\"grants\": [])")
    r.add_argument("--ver", type=int, help="new version (default: max(current + 1, Unix time in ms))")
    r.add_argument("-o", "--out", type=Path, help="write the new document here (default: stdout)")
    _broker_options(r, required=False, key_alias=False)
    r.set_defaults(func=run_revoke)

    li = _mqtt_parser(sub, "listen", summary="receive, decrypt and verify; print JSON lines")
    _broker_options(li, required=False)
    js = li.add_argument_group("NATS JetStream (instead of --broker or -h; TLS options as for MQTT; needs nats-py: "
                               "pip install 'vgw[cloud]')")
    js.add_argument("--nats", metavar="HOST:PORT[,...]",
                    help="NATS client port(s) of the cluster: workers share the durable pull consumer --durable "
                         "on the stream --stream (created if missing), explicit acks; `vgw cloud relay` "
                         "processes fill the stream (docs/fleet.md)")
    js.add_argument("--stream", default="VGW", help="JetStream stream of data and receipts (default VGW)")
    js.add_argument("--durable", default="vgw-workers", help="durable consumer the workers share (default vgw-workers)")
    js.add_argument("--ack-wait", type=float, default=30.0, metavar="S",
                    help="redeliver a batch not acknowledged within S seconds to another worker (default 30)")
    js.add_argument("--replicas", type=int, default=3, help="stream replicas when creating it (default 3)")
    js.add_argument("--batch", type=int, default=100, help="messages per pull (default 100)")
    li.add_argument("--recipient", action="append", type=Path, required=True, metavar="FILE|DIR",
                    help="recipient private key(s): a .key file or a keygen directory (repeatable)")
    li.add_argument("--device-cert", action="append", type=Path, default=[], metavar="FILE|DIR",
                    help="device certificate(s) that verify receipts (repeatable)")
    li.add_argument("--share", metavar="GROUP",
                    help="shared subscription $share/GROUP/<prefix>/+/data/+: workers of a group split the "
                         "batches; per-worker gap detection is then off")
    li.add_argument("--out", type=Path, help="append JSON lines to FILE (default stdout)")
    li.add_argument("--duration", type=float, help="stop after S seconds (default: until SIGINT/SIGTERM)")
    li.add_argument("--count", type=int, help="stop after N batches")
    li.add_argument("--no-status", action="store_true", help="do not subscribe to status topics")
    li.set_defaults(func=run_listen)

    rl = sub.add_parser("relay", help="NATS: store what devices publish in the telemetry stream, acknowledged",
                        description="Take devices' data and receipts with core NATS subscriptions and publish "
                                    "each again into the JetStream stream, retrying until the stream has stored it "
                                    "(nats-server acknowledges an MQTT publish before storing it). Run two or more, "
                                    "on different nodes: the stream keeps one copy (docs/fleet.md).")
    rl.add_argument("--nats", required=True, metavar="HOST:PORT[,...]", help="NATS client port(s) of the cluster")
    rl.add_argument("--ca", "--cafile", dest="ca", type=Path, metavar="CA", help="CA certificate of the cluster")
    rl.add_argument("--cert", type=Path, help="the cloud's client certificate")
    rl.add_argument("--tls-key", "--key", "--client-key", dest="tls_key", type=Path, metavar="KEY",
                    help="its private key")
    rl.add_argument("--prefix", default="vgw", help="topic prefix (default vgw)")
    rl.add_argument("--stream", default="VGW", help="JetStream stream (default VGW, created if missing)")
    rl.add_argument("--replicas", type=int, default=3, help="stream replicas when creating it (default 3)")
    rl.add_argument("--prefer", type=int, metavar="N",
                    help="connect to the N-th --nats server first (0-based): give each relay another node")
    rl.add_argument("--publishers", type=int, default=32, help="stores in flight at once (default 32)")
    rl.add_argument("--max-held", type=int, default=200_000,
                    help="messages held while the stream does not store; beyond, new ones are dropped (default 200000)")
    rl.add_argument("--max-held-mib", type=int, default=512, metavar="MIB",
                    help="bytes held at most, in MiB; beyond, new messages are dropped (default 512)")
    rl.add_argument("--drain", type=float, default=30.0, metavar="S",
                    help="on SIGTERM, keep storing what is held for at most S seconds (default 30)")
    rl.add_argument("--duration", type=float, help="stop after S seconds (default: until SIGINT/SIGTERM)")
    rl.add_argument("--client-id", default=None, help="NATS connection name (default vgw-cloud-relay-<pid>)")
    rl.set_defaults(func=run_relay)

    cloud_enroll.register(sub, _broker_options)

    v = sub.add_parser("verify-receipt", help="verify a receipt file against device certificates",
                       description="Verify a receipt (README \"Receipts\": compact JWS, ES256) under the certificate "
                       "of the device it names. Prints a line that says it is valid, then its claims; exit 0 "
                       "valid, 3 not valid (why on stderr).")
    v.add_argument("--device-cert", action="append", type=Path, required=True, metavar="FILE|DIR")
    v.add_argument("--json", action="store_true",
                   help="print one JSON object: file, valid, and device, typ, claims, token or reason")
    v.add_argument("file", type=Path, help="receipt (compact JWS, or a JSON line from listen)")
    v.set_defaults(func=run_verify_receipt)

    cloud_service.register(sub)


def _mqtt_parser(sub: Any, name: str, *, summary: str) -> argparse.ArgumentParser:
    """A command that talks to an MQTT broker: ``-h`` is the broker host there, as with mosquitto_pub/sub, so
    its help is ``--help`` only."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=summary, add_help=False)
    p.add_argument("--help", action="help", default=argparse.SUPPRESS,
                   help="show this help and exit (-h is the broker host, as with mosquitto_pub/sub)")
    return p


#: MQTT over TLS: IANA's "secure-mqtt" port, mosquitto_pub's default when it is given --cafile.
MQTT_TLS_PORT = 8883


def _broker_options(p: argparse.ArgumentParser, *, required: bool, key_alias: bool = True) -> None:
    """The broker and its mutual TLS, in vgw's spelling and in mosquitto_pub/sub's (``-h HOST -p PORT --cafile
    --cert --key``). ``key_alias``: also take ``--key`` for the TLS key (not where ``--key`` is the consent
    signing key). ``required``: a broker must be given (checked by :func:`_broker_address`)."""
    g = p.add_argument_group("broker (mutual TLS)" + (", required" if required else ""))
    g.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker")
    # -h is the host only where the command's help is --help alone (see _mqtt_parser); elsewhere it stays help.
    host = ("--host",) if "-h" in p._option_string_actions else ("-h", "--host")
    g.add_argument(*host, metavar="HOST", help="MQTT broker host, instead of --broker (mosquitto_pub's -h)")
    g.add_argument("-p", "--port", type=int, metavar="PORT",
                   help=f"its port, with -h/--host (default {MQTT_TLS_PORT}, MQTT over TLS)")
    g.add_argument("--ca", "--cafile", dest="ca", type=Path, metavar="CA", help="CA certificate of the broker")
    g.add_argument("--cert", type=Path, help="the cloud's client certificate")
    keys = ("--tls-key", "--key", "--client-key") if key_alias else ("--tls-key", "--client-key")
    g.add_argument(*keys, dest="tls_key", type=Path, metavar="KEY",
                   help="its private key" + ("" if key_alias else " (here --key is the consent signing key)"))
    g.add_argument("--protocol", choices=("auto", "5", "3.1.1"), default="auto",
                   help="MQTT version (auto: 5, falling back to 3.1.1, e.g. for NATS)")
    g.add_argument("--prefix", default="vgw", help="topic prefix (default vgw)")
    g.add_argument("--client-id", default=None, help="MQTT client id (default vgw-cloud-<command>-<pid>)")


def _broker_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """The broker given as ``--broker HOST:PORT`` or ``-h HOST [-p PORT]``; None when neither was. Raises
    :class:`CloudKitError` for both at once, ``-p`` without ``-h``, or a bad address."""
    from vgw.cloud.cloudkit import CloudKitError
    from vgw.cloud.cloudlink import BrokerOptions

    if args.broker is not None and (args.host is not None or args.port is not None):
        raise CloudKitError(f"give the broker once: --broker {args.broker} or -h HOST [-p PORT], not both")
    if args.broker is not None:
        return BrokerOptions.parse_address(args.broker)
    if args.host is None:
        if args.port is not None:
            raise CloudKitError(f"-p {args.port} needs -h HOST (or give --broker HOST:PORT)")
        return None
    port = MQTT_TLS_PORT if args.port is None else args.port
    if not args.host or not 0 < port < 65536:
        raise CloudKitError(f"-h {args.host!r} -p {port}: expected a host and a port in 1..65535")
    return args.host, port


def _opts(args: argparse.Namespace) -> Any:
    from vgw.cloud.cloudkit import CloudKitError
    from vgw.cloud.cloudlink import BrokerOptions

    address = _broker_address(args)
    if address is None:
        raise CloudKitError("no broker: give --broker HOST:PORT or -h HOST [-p PORT]")
    missing = [n for n in ("ca", "cert", "tls_key") if getattr(args, n) is None]
    if missing:
        raise CloudKitError("the broker needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    host, port = address
    import os

    return BrokerOptions(host=host, port=port, ca_file=args.ca, cert_file=args.cert, key_file=args.tls_key,
                         protocol=args.protocol, prefix=args.prefix,
                         client_id=args.client_id or f"vgw-cloud-{args.cloud_command}-{os.getpid()}")


# ---------------------------------------------------------------- commands


def run_keygen(args: argparse.Namespace) -> int:
    from vgw.cloud.cloudkit import keygen

    for path in keygen(args.dir, args.recipient, signer=not args.no_signer, force=args.force):
        print(path)
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from vgw.cloud.cloudkit import load_grants, load_signing_key, sign_documents

    key = load_signing_key(args.key)
    desc = load_grants(args.grants)
    docs = sign_documents(key, desc, args.device, ver=args.ver)
    if args.out is None:
        for token in docs.values():
            print(token)
    elif len(docs) == 1 and not args.out.is_dir():
        args.out.write_text(next(iter(docs.values())) + "\n")
        print(args.out)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for device, token in docs.items():
            path = args.out / f"{device}.jws"
            path.write_text(token + "\n")
            print(path)
    return 0


def run_push(args: argparse.Namespace) -> int:
    from vgw.cloud.cloudkit import read_document, read_token_file
    from vgw.cloud.cloudlink import CloudLink

    docs = [(read_document(p), p) for p in args.docs]
    link = CloudLink(_opts(args)).connect()
    try:
        for claims, path in docs:
            token = read_token_file(path, what="consent document")
            link.publish(consent_topic(args.prefix, claims["sub"]), token.encode())
            print(f"pushed {version_text(claims['ver'])} to {claims['sub']} "
                  f"({len(claims.get('grants', []))} grant(s))")
    finally:
        link.close()
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from vgw.cloud.cloudkit import load_signing_key, read_document, revoke_document
    from vgw.cloud.cloudlink import CloudLink

    key = load_signing_key(args.key)
    current = read_document(args.current, key)
    token = revoke_document(key, current, None if args.all else args.grant, ver=args.ver)
    claims = jwt.decode(token, options={"verify_signature": False})  # signed just now, by us
    gone = sorted({g["id"] for g in current.get("grants", [])} - {g["id"] for g in claims.get("grants", [])})
    # Like `push`: one line per action on stdout. Only when the document itself is the output (no -o, no
    # --broker) does stdout carry the token, so that `vgw cloud revoke ... > v2.jws` still works.
    what = (f"revocation of {', '.join(gone) or 'no grant'}: {version_text(claims['ver'])} for {claims['sub']} "
            f"({len(claims.get('grants', []))} grant(s) left)")
    if args.out is not None:
        args.out.write_text(token + "\n")
        print(f"wrote {what} to {args.out}")
    elif _broker_address(args) is None:
        print(token)
        print(f"signed {what}", file=sys.stderr)
    if _broker_address(args) is not None:
        link = CloudLink(_opts(args)).connect()
        try:
            link.publish(consent_topic(args.prefix, current["sub"]), token.encode())
        finally:
            link.close()
        print(f"pushed {what}")
    return 0


def _event_sink(out: IO[str], count: int | None) -> tuple[Callable[[dict[str, Any]], None], threading.Event]:
    """One JSON line per event on ``out`` (from any thread); the event returned is set once ``count`` batches
    were written (None: never)."""
    lock = threading.Lock()
    stop = threading.Event()
    batches = 0

    def emit(event: dict[str, Any]) -> None:
        nonlocal batches
        with lock:
            out.write(json.dumps(event, separators=(",", ":")) + "\n")
            out.flush()
            if event["type"] == "batch":
                batches += 1
                if count is not None and batches >= count:
                    stop.set()

    return emit, stop


def run_listen(args: argparse.Namespace) -> int:
    from vgw.cloud.cloudkit import CloudKitError, load_device_certs, load_recipient_keys
    from vgw.cloud.cloudlink import CloudLink, Listener

    recipients = load_recipient_keys(args.recipient)
    keys = load_device_certs(args.device_cert)
    if (_broker_address(args) is None) == (args.nats is None):
        raise CloudKitError("vgw cloud listen: give either --broker HOST:PORT or -h HOST [-p PORT] (MQTT), or "
                            "--nats HOST:PORT[,...]")
    if args.nats is not None:
        return _listen_nats(args, recipients, keys)
    out: IO[str] = open(args.out, "a", buffering=1) if args.out else sys.stdout
    emit, stop = _event_sink(out, args.count)
    listener = Listener(args.prefix, recipients, keys, emit, detect_gaps=not args.share)
    link = CloudLink(_opts(args), on_message=listener.handle)
    previous = _on_signals(stop)
    try:
        link.connect()
        topics = listener.topics(args.share)
        if args.no_status:
            topics = [t for t in topics if not t[0].endswith("/status")]
        granted = link.subscribe(topics)
        failed = [t for (t, _q), g in zip(topics, granted, strict=False) if not g.startswith("Granted")]
        if failed:
            from vgw.base.errors import UplinkError

            raise UplinkError(f"broker refused subscription(s) {failed}: {granted}")
        print(f"vgw cloud listen: subscribed (MQTT {link.protocol}) "
              f"{', '.join(t for t, _ in topics)}", file=sys.stderr, flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while not stop.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            stop.wait(0.2 if remaining is None else min(0.2, remaining))
    finally:
        link.close()
        _restore(previous)
        if args.out:
            out.close()
    print(json.dumps({"summary": listener.summary()}), file=sys.stderr)
    return 0


def _listen_nats(args: argparse.Namespace, recipients: Any, keys: Any) -> int:
    """``listen --nats``: one worker of the durable consumer. A worker sees only part of each stream, so
    gaps are not reported; duplicates (a redelivered batch another worker had handled) are dropped per
    worker and must be de-duplicated downstream on (device, grant, epoch, seq)."""
    from vgw.cloud.cloudkit import CloudKitError
    from vgw.cloud.cloudlink import Listener
    from vgw.cloud.jetstream import JetStreamWorker, NatsOptions, parse_servers, require_nats_py

    require_nats_py()
    # asyncio warns on every TLS close of nats-py's connections ("returning true from eof_received()");
    # harmless, and not something an operator can act on
    from vgw.base.logs import silence_library

    silence_library("asyncio")
    missing = [n for n in ("ca", "cert", "tls_key") if getattr(args, n) is None]
    if missing:
        raise CloudKitError("--nats needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    if args.ack_wait <= 0 or args.replicas < 1 or args.batch < 1:
        raise CloudKitError("--ack-wait must be > 0, --replicas and --batch >= 1")
    import os

    out: IO[str] = open(args.out, "a", buffering=1) if args.out else sys.stdout
    emit, stop = _event_sink(out, args.count)
    listener = Listener(args.prefix, recipients, keys, emit, detect_gaps=False)
    opts = NatsOptions(servers=parse_servers(args.nats), ca_file=args.ca, cert_file=args.cert,
                       key_file=args.tls_key, prefix=args.prefix, stream=args.stream, durable=args.durable,
                       ack_wait_s=args.ack_wait, replicas=args.replicas, batch=args.batch,
                       name=args.client_id or f"vgw-cloud-listen-{os.getpid()}")
    worker = JetStreamWorker(opts, listener.handle, None if args.no_status else listener.handle)
    try:
        _run_until_stopped(worker, stop, args.duration,
                           lambda: f"vgw cloud listen: pulling (NATS JetStream) stream {opts.stream} consumer "
                                   f"{opts.durable} via {worker.connected_url}")
    finally:
        if args.out:
            out.close()
    print(json.dumps({"summary": {**listener.summary(), "handled": worker.handled,
                                  "redelivered": worker.redelivered}}), file=sys.stderr)
    return 0


def run_relay(args: argparse.Namespace) -> int:
    """``relay``: one relay (docs/fleet.md). Exit 0 once everything it received is stored; 1 if its drain time
    ran out with messages still held, or it dropped some (one line on stderr, and the JSON summary)."""
    import os

    from vgw.base.logs import silence_library
    from vgw.cloud.cloudkit import CloudKitError
    from vgw.cloud.jetstream import NatsOptions, parse_servers, require_nats_py
    from vgw.cloud.relay import JetStreamRelay

    require_nats_py()
    silence_library("asyncio")  # nats-py's TLS closes make asyncio warn; nothing an operator can act on
    missing = [n for n in ("ca", "cert", "tls_key") if getattr(args, n) is None]
    if missing:
        raise CloudKitError("vgw cloud relay needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    if args.replicas < 1 or args.publishers < 1 or args.max_held < 1 or args.max_held_mib < 1 or args.drain < 0:
        raise CloudKitError("--replicas, --publishers, --max-held and --max-held-mib must be >= 1, --drain >= 0")
    opts = NatsOptions(servers=parse_servers(args.nats), ca_file=args.ca, cert_file=args.cert,
                       key_file=args.tls_key, prefix=args.prefix, stream=args.stream, replicas=args.replicas,
                       name=args.client_id or f"vgw-cloud-relay-{os.getpid()}")
    relay = JetStreamRelay(opts, prefer=args.prefer, publishers=args.publishers, max_held=args.max_held,
                           max_held_bytes=args.max_held_mib * 2**20, drain_s=args.drain)
    _run_until_stopped(relay, threading.Event(), args.duration,
                       lambda: f"vgw cloud relay: relaying {args.prefix}.*.data.>, {args.prefix}.*.receipt into "
                               f"stream {opts.stream} via {relay.connected_url}")
    c = relay.counts
    print(json.dumps({"summary": dataclasses.asdict(c)}), file=sys.stderr)
    if c.unstored_at_exit or c.dropped or c.rejected:
        print(f"vgw cloud relay: {c.unstored_at_exit} message(s) not stored at exit, {c.dropped} dropped, "
              f"{c.rejected} rejected by the stream", file=sys.stderr)
        return 1
    return 0


def _run_until_stopped(part: Any, stop: threading.Event, duration: float | None, ready_line: Callable[[], str]
                       ) -> None:
    """Run a NATS worker or relay (``part.run(stop, deadline=...)``) until SIGTERM/SIGINT sets ``stop`` or
    ``duration`` seconds pass; print ``ready_line()`` on stderr once ``part.ready`` is set (what scripts and
    the fleet simulator wait for)."""
    previous = _on_signals(stop)

    def announce() -> None:
        if part.ready.wait(60) and not stop.is_set():
            print(ready_line(), file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        part.run(stop, deadline=None if duration is None else time.monotonic() + duration)
    finally:
        _restore(previous)


def run_verify_receipt(args: argparse.Namespace) -> int:
    from vgw_sim.cloud import ReceiptError

    from vgw.base.timefmt import utc_text
    from vgw.cloud.cloudkit import load_device_certs, verify_receipt_file

    keys = load_device_certs(args.device_cert)
    try:
        claims = verify_receipt_file(args.file, keys)
    except ReceiptError as exc:
        if args.json:
            print(json.dumps({"file": str(args.file), "valid": False, "reason": str(exc)}))
        print(f"vgw cloud verify-receipt: {args.file}: not valid: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    if args.json:
        print(json.dumps({"file": str(args.file), "valid": True, "device": claims["sub"], "typ": claims["typ"],
                          "claims": claims, "token": _receipt_token(args.file)}, sort_keys=True))
        return 0
    print(f"{args.file}: valid {claims['typ']} receipt of {claims['sub']}, signed {utc_text(claims['iat'])}")
    for name in sorted(set(claims) - {"typ", "sub", "iat"}):
        value = claims[name]
        print(f"  {name}: {value if isinstance(value, str) else json.dumps(value, sort_keys=True)}")
    return 0


def _receipt_token(path: Path) -> str:
    """The compact JWS of a receipt file that verified (a JSON line from `vgw cloud listen` carries it as token)."""
    from vgw.cloud.cloudkit import read_token_file

    text = read_token_file(path, what="receipt")
    return str(json.loads(text)["token"]) if text.startswith("{") else text


def _on_signals(stop: threading.Event) -> list[Any]:
    if threading.current_thread() is not threading.main_thread():
        return []

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    return [(s, signal.signal(s, handler)) for s in (signal.SIGTERM, signal.SIGINT)]


def _restore(previous: list[Any]) -> None:
    for sig, old in previous:
        signal.signal(sig, old)
