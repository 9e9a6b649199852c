"""`vgw bench`: the pipeline benchmark, measured with the real components against a private mosquitto.

The headline is the whole process as a user times it: `vgw run` replaying a trace from exec to its last
PUBACK and exit, against a naive process (python-can's LogReader + cantools, JSON over MQTT with paho), on the
demo DBC and on `--dbc`, traces written by python-can's Logger and by candump -L, a typical consent (3 signals)
and every signal, alternating rounds (docs/performance.md). The stages follow as detail: decoding alone, the
full path in one process, CPU and frame-to-PUBACK latency on a saturated bus, revocation, collection rules."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="measure the data path (frames/s, latency, RSS, CPU, revocation)",
                       description=__doc__)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    p.add_argument("--frames", type=int, default=300_000, metavar="N", help="frames in the trace (default 300000)")
    p.add_argument("--dbc", type=Path, metavar="FILE",
                   help="vehicle description (DBC, ARXML, KCD or SYM) to generate the trace from, every signal "
                        "mapped: the headline runs it next to the demo vehicle, the stages instead of it")
    p.add_argument("--consent", choices=("typical", "all"), default="typical",
                   help="typical: the demo's two apps (a few scopes); all: every scope (default typical)")
    p.add_argument("--rounds", type=int, default=3, metavar="N",
                   help="alternating rounds of the headline; the table gives the medians (default 3)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--headline", action="store_true", help="only the headline: the whole process vs the naive one")
    only.add_argument("--stages", action="store_true", help="only the stages (decode, full path, realtime, "
                      "revocation, rules), as detail of one DBC and one --consent")
    p.add_argument("--rt-fps", type=float, default=4000.0, metavar="FPS",
                   help="frames/s of the realtime phase (default 4000: a saturated 500 kbit/s bus)")
    p.add_argument("--rt-seconds", type=float, default=5.0, metavar="S", help="length of each realtime phase")
    p.add_argument("--revoke-rows", type=int, default=100_000, metavar="N",
                   help="buffered outbox rows when the grant is revoked (default 100000)")
    p.add_argument("--low-latency-s", type=float, default=0.05, metavar="S",
                   help="[batch] max_interval_s of the second realtime run (default 0.05)")
    p.add_argument("--drive-cycle", action="store_true",
                   help="only the drive-cycle measure: bytes sent per hour per grant under each collection mode "
                        "(README \"Collection rules\") against streaming every sample, on the demo drive")
    p.add_argument("--drive-seconds", type=float, default=1800.0, metavar="S",
                   help="simulated seconds of driving for --drive-cycle (default 1800)")
    p.add_argument("--rules", action="store_true",
                   help="only the collection-rules measure: the costliest rule document the agent accepts (its "
                        "budgets, docs/guarantees.md \"Budgets\") against the same grants without rules, on the "
                        "demo drive in real time: CPU per sample, share of a core, peak RSS")
    p.add_argument("--rules-seconds", type=float, default=75.0, metavar="S",
                   help="seconds of the demo drive each rules run replays (default 75: a 60 s history fills; "
                        "0 leaves the measure out of a full run)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from vgw.base.errors import VgwError
    from vgw.tools.bench import BenchOptions, format_table, run_bench
    from vgw.tools.bench.headline import attach_stage_p99, format_headline
    from vgw.tools.bench.run import run_headline_bench

    if args.drive_cycle:
        from vgw.tools.bench.drive import drive_cycle, format_drive

        if not 0 < args.drive_seconds <= 86_400:
            raise VgwError(f"--drive-seconds {args.drive_seconds}: must be > 0 and <= 86400")
        drive = drive_cycle(args.drive_seconds)
        print(json.dumps(drive, indent=2) if args.json else format_drive(drive), end="\n" if args.json else "")
        return 0
    if not 0 <= args.rules_seconds <= 3600:
        raise VgwError(f"--rules-seconds {args.rules_seconds}: must be between 0 and 3600")
    if args.rules:
        from vgw.tools.bench.rules import format_rules
        from vgw.tools.bench.run import run_rules_bench

        if args.dbc is not None:
            raise VgwError("--rules runs on the demo vehicle: leave out --dbc")
        if not args.rules_seconds:
            raise VgwError("--rules-seconds 0: the rules measure needs a drive to replay")
        rules = run_rules_bench(BenchOptions(rules_seconds=args.rules_seconds))
        if args.json:
            print(json.dumps(rules, indent=2))
        else:
            print(format_rules(rules["rules"]))
            print("targets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in rules["targets"].items()))
        return 0
    if args.rt_fps <= 0 or args.rt_seconds <= 0:
        raise VgwError("--rt-fps and --rt-seconds must be > 0")
    if not 0.01 <= args.low_latency_s <= 10:
        raise VgwError(f"--low-latency-s {args.low_latency_s}: must be between 0.01 and 10")
    if args.revoke_rows < 1:
        raise VgwError(f"--revoke-rows {args.revoke_rows}: must be >= 1")
    opts = BenchOptions(frames=args.frames, dbc=args.dbc, consent=args.consent, rt_fps=args.rt_fps,
                        rt_seconds=args.rt_seconds, revoke_rows=args.revoke_rows,
                        low_latency_interval_s=args.low_latency_s, rules_seconds=args.rules_seconds,
                        rounds=args.rounds)
    result: dict[str, Any] = {}
    if not args.stages:
        result = run_headline_bench(opts)
        if not args.json:
            print(format_headline(result["headline"]), flush=True)
    if not args.headline:
        stages = run_bench(opts)
        if "headline" in result:
            attach_stage_p99(result["headline"], stages)
        result = {**stages, **result}
        if not args.json:
            print(("\nstages (detail)\n" if not args.stages else "") + format_table(stages))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0

