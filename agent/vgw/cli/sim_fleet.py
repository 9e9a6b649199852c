"""`vgw sim fleet`: the fleet load simulator (N devices in one process against a real broker).

    vgw sim fleet --devices N --rate HZ --duration S [--broker mosquitto|nats|HOST:PORT] [--churn HZ]
                  [--threads T] [--json]
    vgw sim fleet --make-pki DIR --devices N      # certificates for an external broker (then --pki DIR)
    vgw sim fleet --enroll --devices N ...        # devices enroll through `vgw cloud enroll serve` first
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vgw.base.errors import ConfigError


def register(sim_subparsers: Any) -> None:
    """Add ``fleet`` to ``vgw sim``."""
    p = sim_subparsers.add_parser(
        "fleet", help="fleet load simulator: N mTLS devices speaking the agent's contract (its verifier, v2 "
                      "envelopes, receipt signer), consent churn",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=100, help="simulated devices (default 100)")
    p.add_argument("--rate", type=float, default=1.0, help="batches per second per device (default 1)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--churn", type=float, default=1.0,
                   help="consent changes per second across the fleet, alternately revoke/grant (default 1)")
    p.add_argument("--broker", default="mosquitto",
                   help="mosquitto, nats or nats-cluster (private, on 127.0.0.1; nats-cluster: 3 nodes, the cloud "
                        "side on the durable JetStream consumer), or HOST:PORT (needs --pki)")
    p.add_argument("--pki", type=Path, help="certificates for an external broker (from --make-pki)")
    p.add_argument("--make-pki", type=Path, metavar="DIR", help="only write a CA + N device certificates")
    p.add_argument("--threads", type=int, default=4, help="network threads driving the devices (default 4)")
    p.add_argument("--samples", type=int, default=5, help="samples per batch (default 5)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), help="MQTT version (default: 5; 3.1.1 for nats)")
    p.add_argument("--consumers", type=int, default=1,
                   help="nats-cluster: consumer worker processes sharing the durable consumer (default 1)")
    p.add_argument("--kill-at", type=float, metavar="S",
                   help="nats-cluster: SIGKILL one node S seconds into the run, restart it --down S later")
    p.add_argument("--down", type=float, default=10.0, help="seconds the killed node stays down (default 10)")
    p.add_argument("--kill-role", choices=("follower", "leader"), default="follower",
                   help="which node to kill: one that does not lead the telemetry stream (default), or its leader")
    p.add_argument("--replay-window", type=float, default=None, metavar="S",
                   help="nats-cluster: devices keep PUBACKed batches and receipts S seconds and replay them after a "
                        "failover, like the agent (README \"Replay after failover\"; default: the agent's default "
                        "with several hosts, 30; 0: off)")
    p.add_argument("--connect-timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for every device to connect and apply consent (default 120)")
    p.add_argument("--drain", type=float, default=5.0,
                   help="seconds to wait after the run for the cloud side to catch up (default 5)")
    p.add_argument("--enroll", action="store_true",
                   help="devices start with no certificate and enroll through a real `vgw cloud enroll serve` with a "
                        "claim identity and one-time tokens first (README \"Enrollment\"; private mosquitto only)")
    p.add_argument("--enroll-timeout", type=float, default=300.0, metavar="S",
                   help="seconds the whole fleet may take to enroll (default 300)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vgw_sim.fleet import FleetConfig, FleetSim, format_report, make_pki

    from vgw.contract.replay import DEFAULT_REPLAY_WINDOW_S

    if args.make_pki is not None:
        pki = make_pki(args.make_pki, args.devices)
        print(f"wrote CA {pki.ca.cert}, cloud and {len(pki.devices)} device certificates to {args.make_pki}")
        return 0
    # asyncio warns on every TLS close of nats-py's connections ("returning true from eof_received()");
    # harmless, and not something an operator can act on
    from vgw.base.logs import silence_library

    silence_library("asyncio")
    cfg = FleetConfig(devices=args.devices, rate_hz=args.rate, duration_s=args.duration, churn_hz=args.churn,
                      broker=args.broker, pki_dir=args.pki, threads=args.threads, samples=args.samples,
                      protocol=args.protocol, consumers=args.consumers, kill_at_s=args.kill_at,
                      down_s=args.down, kill_role=args.kill_role, drain_s=args.drain,
                      connect_timeout_s=args.connect_timeout, enroll=args.enroll,
                      enroll_timeout_s=args.enroll_timeout,
                      replay_window_s=(DEFAULT_REPLAY_WINDOW_S if args.broker == "nats-cluster" else 0.0)
                      if args.replay_window is None else args.replay_window)
    try:
        sim = FleetSim(cfg, progress=lambda m: print(f"vgw sim fleet: {m}", file=sys.stderr, flush=True))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        report = sim.run()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    enrolled = report.get("enrollment")
    if enrolled is not None and enrolled["enrolled"] != cfg.devices:
        return 1
    return 0 if report["devices_ready"] == cfg.devices else 1
