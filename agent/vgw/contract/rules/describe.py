"""What a grant's app receives, in plain words, for the owner (`vgw consent show`, the privacy report).

:func:`describe_grant` turns a grant's scopes, rules and limits into one sentence per scope, e.g. "Speed:
the lowest, highest and average per minute, not the trace" or "Location (position of the car): only from
10 s before to 5 s after the moment speed falls below 5". Pure: data in, text out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vgw.contract.rules.expr import Abs, Arith, BoolExpr, Compare, Logic, Neg, Not, Num, NumExpr, Path, Rising
from vgw.contract.rules.rules import Mode, Rule
from vgw.contract.rules.vss import VSS_SCOPES

SCOPE_PATHS: dict[str, tuple[str, ...]] = {}
for _path, _scope in sorted(VSS_SCOPES.items()):
    SCOPE_PATHS[_scope] = (*SCOPE_PATHS.get(_scope, ()), _path)

SCOPE_LABELS = {
    "read_vehicle_info": "Vehicle make, model and year",
    "read_vin": "Vehicle identification number (VIN)",
    "read_odometer": "Odometer (distance travelled)",
    "read_fuel": "Fuel level",
    "read_battery": "High-voltage battery level",
    "read_charge": "Charging state",
    "read_engine_oil": "Engine oil life",
    "read_tires": "Tyre pressures",
    "read_diagnostics": "Engine and diagnostic data",
    "read_speedometer": "Speed",
    "read_thermometer": "Outside temperature",
    "read_location": "Location (position of the car)",
    "read_compass": "Heading (compass direction)",
    "read_security": "Door lock state",
    "read_climate": "Cabin climate",
}


def duration(seconds: float) -> str:
    """``60`` -> "minute", ``120`` -> "2 minutes", ``0.5`` -> "0.5 s"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return unit if n == 1 else f"{n} {unit}s"
    return f"{seconds:g} s"


def _span(seconds: float) -> str:
    d = duration(seconds)
    return f"1 {d}" if " " not in d else d


def path_words(path: str) -> str:
    """``Vehicle.Powertrain.FuelSystem.RelativeLevel`` -> "fuel system relative level"."""
    parts = path.split(".")[1:]
    words = parts[-2:] if parts[-1] in {"Latitude", "Longitude", "Temperature", "Pressure", "Current"} else parts[-1:]
    if path == "Vehicle.Speed":
        return "speed"
    return " ".join(re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", w).lower() for w in words)


def number_text(value: float) -> str:
    """A threshold as the rule acts on it: every digit written (52.505947, not a rounded 52.5059), no ".0"."""
    return f"{value:.15g}"


_CMP_WORDS = {">": "is above", "<": "is below", ">=": "is at least", "<=": "is at most", "==": "is", "!=": "is not"}


def condition_words(node: BoolExpr | NumExpr) -> str:
    """A condition read aloud: ``rising(Vehicle.Speed < 5)`` -> "the moment speed falls below 5"."""
    if isinstance(node, Num):
        # A constant with no value (folded from a division by zero) makes any comparison with it false.
        return "no value" if math.isnan(node.value) else number_text(node.value)
    if isinstance(node, Path):
        return path_words(node.path)
    if isinstance(node, Neg):
        return f"minus {condition_words(node.operand)}"
    if isinstance(node, Abs):
        return f"the size of {condition_words(node.operand)}"
    if isinstance(node, Arith):
        op = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}[node.op]
        return f"({condition_words(node.left)} {op} {condition_words(node.right)})"
    if isinstance(node, Compare):
        return f"{condition_words(node.left)} {_CMP_WORDS[node.op]} {condition_words(node.right)}"
    if isinstance(node, Logic):
        return f"{condition_words(node.left)} {node.op} {condition_words(node.right)}"
    if isinstance(node, Not):
        return f"not ({condition_words(node.operand)})"
    assert isinstance(node, Rising)
    inner = node.operand
    if isinstance(inner, Compare) and inner.op in ("<", "<="):
        return f"the moment {condition_words(inner.left)} falls below {condition_words(inner.right)}"
    if isinstance(inner, Compare) and inner.op in (">", ">="):
        return f"the moment {condition_words(inner.left)} rises above {condition_words(inner.right)}"
    return f"the moment {condition_words(inner)} starts to hold"


def rule_words(rule: Rule) -> str:
    """What one rule lets through, without the data's name: "only when it changes by more than 1"."""
    if rule.mode is Mode.ON_CHANGE:
        change = f"by more than {rule.deadband:g}" if rule.deadband else "at all"
        return (f"only when it changes {change}, and at least once per {duration(rule.heartbeat_s)} while the car "
                "sends it")
    if rule.mode is Mode.PERIODIC:
        return f"one reading per {duration(rule.period_s)}, not the trace"
    if rule.mode is Mode.AGGREGATE:
        return (f"the lowest, highest and average (and the count and last value) per {duration(rule.window_s)}, "
                "not the trace")
    assert rule.when is not None
    when = condition_words(rule.when.root)
    moment = when if when.startswith("the moment") else f"the moment {when}"
    window = f"from {_span(rule.pre_s)} before to {_span(rule.post_s)} after {moment}"
    if not rule.pre_s and not rule.post_s:
        window = f"at {moment}"
    pause = f"; then nothing for at least {_span(rule.min_interval_s)}" if rule.min_interval_s else ""
    return f"only {window}{pause}; the earlier readings stay in the car's memory for at most {_span(rule.pre_s)}" \
        if rule.pre_s else f"only {window}{pause}"


def limit_words(limits: Mapping[str, Any]) -> str:
    parts = []
    hz = limits.get("max_hz")
    if hz:
        rate = float(hz)
        parts.append(f"at most one reading every {1 / rate:g} s" if rate < 1 else f"at most {rate:g} per second")
    if limits.get("precision_m"):
        parts.append(f"position rounded to {float(limits['precision_m']):g} m")
    return "; ".join(parts)


def describe_grant(scopes: Sequence[str], rules: Sequence[Rule],
                   limits: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One plain sentence per scope (and per path with its own rule) saying what the app receives."""
    by_scope = {r.scope: r for r in rules if r.scope is not None}
    out: list[str] = []
    for scope in scopes:
        label = SCOPE_LABELS.get(scope, scope)
        rule = by_scope.get(scope)
        lim = limit_words(limits.get(scope, {}))
        suffix = f" ({lim})" if lim else ""
        path_rules = [r for r in rules if r.path is not None and VSS_SCOPES.get(r.path) == scope]
        # A path rule overrides the scope's rule for its path (README "Collection rules"): the scope's line speaks
        # only of the other paths, and goes when the path rules decide every path the scope has.
        others = set(SCOPE_PATHS.get(scope, ())) - {r.path for r in path_rules}
        if not path_rules:
            out.append(f"{label}: {rule_words(rule) if rule is not None else 'every reading'}{suffix}")
        elif others:
            how = rule_words(rule) if rule is not None else "every reading"
            out.append(f"{label}, other readings: {how}{suffix}")
        for r in path_rules:
            assert r.path is not None
            out.append(f"{label}, {path_words(r.path)}: {rule_words(r)}{suffix}")
    return out
