"""`vgw bench` phase 6 (and `vgw bench --rules` alone): the costliest collection-rule documents the agent accepts,
against the same consent without rules, on the demo vehicle's drive replayed in real time.

The documents are built from the budgets (docs/guarantees.md "Budgets"), not picked by hand. Every rule is a
trigger whose condition reads the four paths of the demo vehicle that change most often (together about 90 of
the 100 evaluations per second a rule is budgeted for), padded to the length limit with the costliest node (a
division, which cannot fold), and never true. Two documents, because the two budgets pull apart (a history
holds back what it keeps, so the agent sends less):

- *work*: rules on paths the demo vehicle never sends, so every sample still goes out as without rules, added
  until the next would pass the work budget: the cost of the conditions on top of everything else;
- *memory*: in each grant a 60 s history of both 100 Hz signals (as many grants as that fills the memory
  budget), then rules as above until the work budget is full too.

Each runs as 16 grants of the same three scopes; the third run is those grants without rules. Reported per
run: CPU per decoded sample (agent CPU during the replay / samples the grants take without rules), share of a
core, peak RSS.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vgw.contract.rules.budget import rule_held, rule_work
from vgw.contract.rules.limits import MAX_CHARS, MAX_HELD_SAMPLES, MAX_PRE_S, MAX_WORK
from vgw.contract.rules.rules import parse_rules
from vgw.contract.rules.vss import VSS_SCOPES
from vgw.tools.bench.child import _run_child
from vgw.tools.bench.report import Progress
from vgw.tools.bench.trace import frame_source, write_trace

RPM = "Vehicle.Powertrain.CombustionEngine.Speed"
COOLANT = "Vehicle.Powertrain.CombustionEngine.EngineCoolant.Temperature"
# The demo vehicle's paths that change most often, location aside (a condition on a scope the privacy defaults
# limit would read finer data than the app may receive): engine speed ~53 changes/s, speed ~30, battery current
# ~6 and charge ~0.5 (its drive, measured from the simulator): about 90 evaluations per second of each rule.
WATCHED = ("Vehicle.Speed", "Vehicle.Powertrain.TractionBattery.CurrentCurrent",
           "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current", RPM)
HISTORY = (RPM, COOLANT)  # the demo vehicle's two 100 Hz signals (EngineStatus, GenMsgCycleTime 10 ms)
SCOPES = ["read_battery", "read_diagnostics", "read_speedometer"]


def worst_case_condition() -> str:
    """Never true (the sum is far above the bound) and as costly as the length limit allows."""
    head, tail = "+".join(WATCHED), "<-99999"
    return head + "/2" * ((MAX_CHARS - len(head) - len(tail)) // 2) + tail


def _unsent_paths() -> list[str]:
    """Paths of :data:`SCOPES` (vgw.contract.rules.vss) that the demo vehicle's signal map never produces."""
    from vgw_sim.paths import default_dbc, default_signal_map

    from vgw.pipeline.catalogue import load_catalogue

    sent = {spec.path for spec in load_catalogue([default_dbc()], default_signal_map()).specs}
    return [p for p, s in sorted(VSS_SCOPES.items()) if s in SCOPES and p not in sent]


def worst_case_collect(kind: str) -> list[list[dict[str, Any]]]:
    """The ``collect`` list of each grant of the worst-case document of ``kind`` (``work`` or ``memory``)."""
    when = worst_case_condition()
    history_rule = parse_rules([{"path": RPM, "mode": "trigger", "when": when, "pre_s": MAX_PRE_S}], SCOPES)[0]
    grants = max(1, MAX_HELD_SAMPLES // (len(HISTORY) * rule_held(history_rule)))
    targets: list[dict[str, Any]] = [{"path": p, "pre_s": MAX_PRE_S} for p in HISTORY] if kind == "memory" else []
    targets += [{"path": p} for p in _unsent_paths()]
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


RUNS = (("worst_work", "work"), ("worst_memory", "memory"), ("no_rules", None))


def bench_rules(sign: Callable[[list[dict[str, Any]]], str], make_config: Callable[[str, Path, str], Path],
                root: Path, seconds: float, seed: int, progress: Progress) -> dict[str, Any]:
    """Replay ``seconds`` of the demo drive in real time three times: each worst-case document, then the same
    grants without rules. ``sign(grants)`` makes a consent document of grant specs (``id``, ``scopes``,
    ``collect``); ``make_config(name, trace, token)`` writes an agent config with ``token`` in force."""
    from vgw_sim.paths import default_dbc

    from vgw.contract.rules.budget import document_usage

    trace = root / "rules.log"
    frames = int(seconds * 213) + 1  # the demo vehicle sends 213 frames/s
    n, span = write_trace(trace, frame_source(default_dbc(), demo=True, seed=seed, start=1.7e9), frames)
    result: dict[str, Any] = {"seconds": round(span, 1), "frames": n, "documents": {}}
    collects = {kind: worst_case_collect(kind) for kind in ("work", "memory")}
    grants = len(collects["work"])
    runs: dict[str, dict[str, Any]] = {}
    for label, kind in RUNS:
        progress.phase(f"rules: {label.replace('_', ' ')}")
        collect = collects[kind] if kind is not None else [[] for _ in range(grants)]
        token = sign([{"id": f"g-{i}", "scopes": SCOPES, **({"collect": c} if c else {})}
                      for i, c in enumerate(collect)])
        if kind is not None:
            usage = document_usage([parse_rules(c, SCOPES) for c in collect])
            result["documents"][kind] = {
                "grants": len(collect), "rules": sum(len(c) for c in collect), "bytes": len(token),
                "work_nodes_per_s": round(usage.work), "work_budget": MAX_WORK,
                "held_samples": usage.held, "held_budget": MAX_HELD_SAMPLES,
                "condition_chars": len(worst_case_condition())}
        runs[label] = _run_child(make_config(f"rules-{label}", trace, token), n, progress, timeout=seconds + 180)
    base = runs["no_rules"]
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
        if label != "no_rules":
            result[label]["cpu_ratio"] = round(child["cpu_ingest_s"] / base["cpu_ingest_s"], 2) \
                if base["cpu_ingest_s"] else None
            result[label]["rss_ratio"] = round(child["maxrss_mb"] / base["maxrss_mb"], 2) if base["maxrss_mb"] else None
    return result


def format_rules(r: dict[str, Any]) -> str:
    """The rules phase as table lines."""
    b = r["no_rules"]
    lines = [f"collection rules: the costliest documents accepted, demo drive in real time, {r['seconds']} s "
             f"(no rules: {b['cpu_us_per_sample']} us per decoded sample, {b['cpu_pct_one_core']}% of a core, "
             f"RSS {b['peak_rss_mb']} MB)"]
    for label, kind in RUNS[:2]:
        d, w = r["documents"][kind], r[label]
        lines.append(f"  {kind + ' budget full':<20}{d['grants']} grants, {d['rules']} rules, {d['bytes']:,} bytes; "
                     f"{d['work_nodes_per_s']:,}/{d['work_budget']:,} nodes/s, "
                     f"{d['held_samples']:,}/{d['held_budget']:,} held samples")
        lines.append(f"  {'':<20}CPU {w['cpu_us_per_sample']} us per decoded sample x{w['cpu_ratio']} "
                     f"({w['cpu_pct_one_core']}% of a core), peak RSS {w['peak_rss_mb']} MB x{w['rss_ratio']}")
    return "\n".join(lines)


def rules_targets(r: dict[str, Any]) -> dict[str, bool]:
    """Within 2x of the agent without rules, in CPU and in peak RSS, for both documents (docs/guarantees.md
    "Budgets")."""
    worst = [r[label] for label, _ in RUNS[:2]]
    return {"rules_cpu_le_2x_no_rules": all(w["cpu_ratio"] is not None and w["cpu_ratio"] <= 2.0 for w in worst),
            "rules_rss_le_2x_no_rules": all(w["rss_ratio"] is not None and w["rss_ratio"] <= 2.0 for w in worst)}
