"""`vgw bench` phase 6 (and `vgw bench --rules` alone): the costliest collection-rule document the agent accepts,
against the same consent without rules, on the demo vehicle's drive replayed in real time.

The document is built from the budgets (docs/guarantees.md "Budgets"), not picked by hand: trigger rules whose
condition reads the five paths of the demo vehicle that change most often (together more than the 100
evaluations per second a rule is budgeted for) and is padded to the length limit with the costliest node
(a division, which cannot fold), never true, so every history stays full; each grant holds a 60 s history of
both 100 Hz signals; grants and rules are added until the next one would pass a budget. What it costs
(CPU per decoded sample, share of a core, peak RSS) is compared with the same grants without rules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vgw.collect.budget import rule_held, rule_work
from vgw.collect.limits import MAX_CHARS, MAX_HELD_SAMPLES, MAX_PRE_S, MAX_WORK
from vgw.collect.rules import parse_rules
from vgw.collect.vss import VSS_SCOPES
from vgw.tools.bench.child import _run_child
from vgw.tools.bench.report import Progress
from vgw.tools.bench.trace import frame_source, write_trace

RPM = "Vehicle.Powertrain.CombustionEngine.Speed"
COOLANT = "Vehicle.Powertrain.CombustionEngine.EngineCoolant.Temperature"
# The demo vehicle's paths that change most often: engine speed ~53 changes/s, speed ~30, latitude, longitude and
# battery current ~6 each (its drive, measured from the simulator).
WATCHED = ("Vehicle.CurrentLocation.Latitude", "Vehicle.CurrentLocation.Longitude", "Vehicle.Speed",
           "Vehicle.Powertrain.TractionBattery.CurrentCurrent", RPM)
HISTORY = (RPM, COOLANT)  # the demo vehicle's two 100 Hz signals (EngineStatus, GenMsgCycleTime 10 ms)
SCOPES = ["read_battery", "read_diagnostics", "read_location", "read_speedometer"]


def worst_case_condition() -> str:
    """Never true (the sum is far above the bound) and as costly as the length limit allows."""
    head, tail = "+".join(WATCHED), "<-99999"
    return head + "/2" * ((MAX_CHARS - len(head) - len(tail)) // 2) + tail


def worst_case_collect() -> list[list[dict[str, Any]]]:
    """The ``collect`` list of each grant of the worst-case document: as many grants as the memory budget
    fills with full histories of :data:`HISTORY`, then rules on every other target while the work budget lasts."""
    when = worst_case_condition()
    history_rule = parse_rules([{"path": RPM, "mode": "trigger", "when": when, "pre_s": MAX_PRE_S}], SCOPES)[0]
    grants = max(1, MAX_HELD_SAMPLES // (len(HISTORY) * rule_held(history_rule)))
    targets: list[dict[str, Any]] = [{"path": p, "pre_s": MAX_PRE_S} for p in HISTORY]
    targets += [{"scope": s} for s in SCOPES]
    targets += [{"path": p} for p, s in sorted(VSS_SCOPES.items()) if s in SCOPES and p not in HISTORY]
    out: list[list[dict[str, Any]]] = [[] for _ in range(grants)]
    work, held = 0.0, 0
    for target in targets:  # layer by layer: every grant's first target, then every grant's second, ...
        for collect in out:
            raw = {**target, "mode": "trigger", "when": when}
            rule = parse_rules([raw], SCOPES)[0]
            if work + rule_work(rule) > MAX_WORK or held + rule_held(rule) > MAX_HELD_SAMPLES:
                return out
            work, held = work + rule_work(rule), held + rule_held(rule)
            collect.append(raw)
    return out


def bench_rules(sign: Callable[[list[dict[str, Any]]], str], make_config: Callable[[str, Path, str], Path],
                root: Path, seconds: float, seed: int, progress: Progress) -> dict[str, Any]:
    """Replay ``seconds`` of the demo drive in real time twice: the worst-case document, then the same grants
    without rules. ``sign(grants)`` makes a consent document of grant specs (``id``, ``scopes``, ``collect``);
    ``make_config(name, trace, token)`` writes an agent config with ``token`` in force."""
    from vgw.collect.budget import document_usage
    from vgw.simulators.paths import default_dbc

    collect = worst_case_collect()
    usage = document_usage([parse_rules(c, SCOPES) for c in collect])
    trace = root / "rules.log"
    frames = int(seconds * 213) + 1  # the demo vehicle sends 213 frames/s
    n, span = write_trace(trace, frame_source(default_dbc(), demo=True, seed=seed, start=1.7e9), frames)
    result: dict[str, Any] = {
        "seconds": round(span, 1),
        "frames": n,
        "document": {"grants": len(collect), "rules": sum(len(c) for c in collect),
                     "work_nodes_per_s": round(usage.work), "work_budget": MAX_WORK,
                     "held_samples": usage.held, "held_budget": MAX_HELD_SAMPLES,
                     "condition_chars": len(worst_case_condition())},
    }
    runs: dict[str, dict[str, Any]] = {}
    for label, with_rules in (("worst_case", True), ("no_rules", False)):
        progress.phase(f"rules: {label.replace('_', ' ')}")
        token = sign([{"id": f"g-{i}", "scopes": SCOPES, **({"collect": c} if with_rules else {})}
                      for i, c in enumerate(collect)])
        if with_rules:
            result["document"]["bytes"] = len(token)
        runs[label] = _run_child(make_config(f"rules-{label}", trace, token), n, progress, timeout=seconds + 180)
    base, worst = runs["no_rules"], runs["worst_case"]
    decoded = base["counters"].get("samples") or 1  # what the grants took without rules: every decoded sample
    for label, child in runs.items():
        ingest = child["ingest_s"]
        result[label] = {
            "cpu_pct_one_core": round(100.0 * child["cpu_ingest_s"] / ingest, 2) if ingest else None,
            "cpu_us_per_sample": round(1e6 * child["cpu_ingest_s"] / decoded, 2),
            "peak_rss_mb": round(child["maxrss_mb"], 1),
            "samples_sent": child["counters"].get("samples"),
            "exit_code": child["exit_code"],
        }
    result["cpu_ratio"] = round(worst["cpu_ingest_s"] / base["cpu_ingest_s"], 2) if base["cpu_ingest_s"] else None
    result["rss_ratio"] = round(worst["maxrss_mb"] / base["maxrss_mb"], 2) if base["maxrss_mb"] else None
    return result


def format_rules(r: dict[str, Any]) -> str:
    """The rules phase as table lines."""
    d, w, b = r["document"], r["worst_case"], r["no_rules"]
    return "\n".join([
        f"collection rules: the costliest document accepted ({d['grants']} grants, {d['rules']} trigger rules, "
        f"{d['bytes']:,} bytes), demo drive in real time, {r['seconds']} s",
        f"  {'budgets used: condition work':<42}{d['work_nodes_per_s']:>14,} of {d['work_budget']:,} nodes/s",
        f"  {'budgets used: pre-trigger history':<42}{d['held_samples']:>14,} of {d['held_budget']:,} samples",
        f"  {'CPU per decoded sample: rules / none':<42}{w['cpu_us_per_sample']:>11} us / {b['cpu_us_per_sample']} us"
        f"   x{r['cpu_ratio']}  ({w['cpu_pct_one_core']}% / {b['cpu_pct_one_core']}% of a core)",
        f"  {'peak RSS: rules / none':<42}{w['peak_rss_mb']:>11} MB / {b['peak_rss_mb']} MB   x{r['rss_ratio']}",
    ])


def rules_targets(r: dict[str, Any]) -> dict[str, bool]:
    """Within 2x of the agent without rules, in CPU and in peak RSS (docs/guarantees.md "Budgets")."""
    return {"rules_cpu_le_2x_no_rules": r["cpu_ratio"] is not None and r["cpu_ratio"] <= 2.0,
            "rules_rss_le_2x_no_rules": r["rss_ratio"] is not None and r["rss_ratio"] <= 2.0}

