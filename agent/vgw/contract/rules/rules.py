"""Collection rules of a grant (README "Collection rules") as immutable data, and their strict validation.

:func:`parse_rules` turns a grant's ``collect`` list (already JSON-decoded) into a tuple of :class:`Rule`, or
raises :class:`RuleError` whose ``reason`` (a :class:`RuleReason`) names the broken rule. Pure: no I/O. The
consent verifier calls it and rejects the whole document on any error; so does `vgw cloud sign` before it
signs.

Choices the contract leaves open (docs/privacy.md, "Collection rules"): ``deadband``, ``pre_s``,
``post_s`` and ``min_interval_s`` default to 0 (the least data); every duration is at most one day; a path
must be one this agent knows the scope of (:mod:`vgw.contract.rules.vss`).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vgw.base.errors import VgwError
from vgw.contract.rules.expr import PATH_RE, Condition, ConditionError, parse_condition
from vgw.contract.rules.limits import MAX_DEADBAND, MAX_DURATION_S, MAX_PRE_S, MAX_RULES
from vgw.contract.rules.vss import VSS_SCOPES

DEFAULT_HEARTBEAT_S = 60.0


class Mode(StrEnum):
    ON_CHANGE = "on_change"
    PERIODIC = "periodic"
    TRIGGER = "trigger"
    AGGREGATE = "aggregate"


class RuleReason(StrEnum):
    """Why a ``collect`` list was refused; the value is the ``reason`` of the consent rejection."""

    SHAPE = "collect-shape"  # not a list of objects, too many rules
    KEY = "collect-key"  # a key the agent does not know (for that mode)
    MODE = "collect-mode"  # unknown or missing mode
    PARAM = "collect-param"  # missing or out-of-range parameter
    TARGET = "collect-target"  # scope/path missing, both given, or outside the grant
    DUPLICATE = "collect-duplicate"  # two rules for one scope or path
    CONDITION = "collect-condition"  # condition does not parse, too long, too deep, or reads outside the grant
    CPU = "collect-cpu"  # the document's conditions would evaluate more nodes per second than the agent's budget
    MEMORY = "collect-memory"  # its pre-trigger histories could hold more samples than the agent's budget


class RuleError(VgwError):
    """A collection rule broke README "Collection rules". ``reason`` says which rule; the message names the field."""

    def __init__(self, reason: RuleReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_MODES = {m.value: m for m in Mode}
# Keys each mode takes besides "mode" and one of "scope"/"path": anything else is refused (fail closed).
_MODE_KEYS: dict[Mode, frozenset[str]] = {
    Mode.ON_CHANGE: frozenset({"deadband", "heartbeat_s"}),
    Mode.PERIODIC: frozenset({"period_s"}),
    Mode.TRIGGER: frozenset({"when", "pre_s", "post_s", "min_interval_s"}),
    Mode.AGGREGATE: frozenset({"window_s"}),
}


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule. Exactly one of ``scope``/``path`` is set; only the parameters of ``mode`` matter."""

    mode: Mode
    scope: str | None = None
    path: str | None = None
    deadband: float = 0.0
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    period_s: float = 0.0
    window_s: float = 0.0
    when: Condition | None = None
    pre_s: float = 0.0
    post_s: float = 0.0
    min_interval_s: float = 0.0

    @property
    def target(self) -> str:
        return self.path if self.path is not None else str(self.scope)

    def to_json(self) -> dict[str, Any]:
        """The rule as in the document (for `vgw consent show --json`), defaults filled in."""
        out: dict[str, Any] = {"path": self.path} if self.path is not None else {"scope": self.scope}
        out["mode"] = self.mode.value
        if self.mode is Mode.ON_CHANGE:
            out.update(deadband=self.deadband, heartbeat_s=self.heartbeat_s)
        elif self.mode is Mode.PERIODIC:
            out["period_s"] = self.period_s
        elif self.mode is Mode.AGGREGATE:
            out["window_s"] = self.window_s
        else:
            assert self.when is not None
            out.update(when=self.when.text, pre_s=self.pre_s, post_s=self.post_s, min_interval_s=self.min_interval_s)
        return out


def parse_rules(raw: Any, scopes: Collection[str], limited: Collection[str] = ()) -> tuple[Rule, ...]:
    """Validate a grant's ``collect`` list against the grant's ``scopes``. Raises :class:`RuleError`.

    ``limited``: the scopes the grant limits (its ``limits`` or the privacy defaults); no condition may read one.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RuleError(RuleReason.SHAPE, "collect must be a list of rules")
    # Count before looking inside: a huge list must cost nothing.
    if len(raw) > MAX_RULES:
        raise RuleError(RuleReason.SHAPE, f"collect has {len(raw)} rules, more than {MAX_RULES}")
    rules: list[Rule] = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(raw):
        rule = _rule(item, i, scopes, limited)
        # One rule per scope and per path: two would leave it open which one the agent enforces.
        key = ("path", rule.path) if rule.path is not None else ("scope", str(rule.scope))
        if key in seen:
            raise RuleError(RuleReason.DUPLICATE, f"collect rule #{i}: a second rule for {key[0]} {key[1]!r}")
        seen.add(key)
        rules.append(rule)
    return tuple(rules)


def _rule(item: Any, i: int, scopes: Collection[str], limited: Collection[str]) -> Rule:
    where = f"collect rule #{i}"
    if not isinstance(item, dict):
        raise RuleError(RuleReason.SHAPE, f"{where} is not an object")
    mode_name = item.get("mode")
    mode = _MODES.get(mode_name) if isinstance(mode_name, str) else None
    if mode is None:
        raise RuleError(RuleReason.MODE, f"{where}: mode {mode_name!r} is not one of {', '.join(_MODES)}")
    unknown = set(item) - {"mode", "scope", "path"} - _MODE_KEYS[mode]
    if unknown:
        # An older agent must never ignore a restriction it cannot enforce (README "Consent document", fail closed).
        raise RuleError(RuleReason.KEY, f"{where}: unknown key(s) {sorted(unknown)} for mode {mode.value!r}")
    scope, path = _target(item, where, scopes)
    where = f"{where} ({path or scope})"
    if mode is Mode.ON_CHANGE:
        return Rule(mode, scope, path,
                    deadband=_number(item, "deadband", where, default=0.0, low=0.0, high=MAX_DEADBAND),
                    heartbeat_s=_number(item, "heartbeat_s", where, default=DEFAULT_HEARTBEAT_S, low=0.0,
                                        high=MAX_DURATION_S, low_open=True))
    if mode is Mode.PERIODIC:
        return Rule(mode, scope, path, period_s=_number(item, "period_s", where, default=None, low=0.0,
                                                        high=MAX_DURATION_S, low_open=True))
    if mode is Mode.AGGREGATE:
        return Rule(mode, scope, path, window_s=_number(item, "window_s", where, default=None, low=0.0,
                                                        high=MAX_DURATION_S, low_open=True))
    return Rule(mode, scope, path, when=_condition(item.get("when"), where, scopes, limited),
                # The pre-trigger history is memory: its bound is the memory bound (README "Collection rules").
                pre_s=_number(item, "pre_s", where, default=0.0, low=0.0, high=MAX_PRE_S),
                post_s=_number(item, "post_s", where, default=0.0, low=0.0, high=MAX_DURATION_S),
                min_interval_s=_number(item, "min_interval_s", where, default=0.0, low=0.0, high=MAX_DURATION_S))


def _target(item: dict[str, Any], where: str, scopes: Collection[str]) -> tuple[str | None, str | None]:
    scope, path = item.get("scope"), item.get("path")
    if (scope is None) == (path is None):
        raise RuleError(RuleReason.TARGET, f"{where}: name exactly one of 'scope' or 'path'")
    if scope is not None:
        # A rule for a scope the grant does not hold would be a rule about data the app was never given.
        if not isinstance(scope, str) or scope not in scopes:
            raise RuleError(RuleReason.TARGET, f"{where}: scope {scope!r} is not a scope of this grant")
        return scope, None
    _check_path(path, f"{where}: path", scopes, RuleReason.TARGET)
    return None, path


def _check_path(path: Any, where: str, scopes: Collection[str], reason: RuleReason) -> None:
    if not isinstance(path, str) or not PATH_RE.fullmatch(path):
        raise RuleError(reason, f"{where} {path!r} is not a VSS path")
    owner = VSS_SCOPES.get(path)
    if owner is None:
        raise RuleError(reason, f"{where} {path!r} is not a path this agent knows the scope of")
    # Blocks a grant from watching (or collecting) a signal another grant's consent covers.
    if owner not in scopes:
        raise RuleError(reason, f"{where} {path!r} belongs to scope {owner!r}, which this grant does not hold")


def _condition(text: Any, where: str, scopes: Collection[str], limited: Collection[str]) -> Condition:
    if text is None:
        raise RuleError(RuleReason.PARAM, f"{where}: mode 'trigger' needs 'when'")
    try:
        condition = parse_condition(text)
    except ConditionError as exc:
        raise RuleError(RuleReason.CONDITION, f"{where}: {exc}") from None
    # Nothing outside a grant's consent is evaluated for it: every path must be one of its scopes.
    for path in sorted(condition.paths):
        _check_path(path, f"{where}: condition path", scopes, RuleReason.CONDITION)
        # A condition is evaluated on every decoded value, at full resolution and frame rate: the moment it
        # turns true would tell the app a position finer than precision_m, or a timing finer than max_hz (the
        # first released sample comes milliseconds after the car crosses the threshold). Fail closed.
        owner = VSS_SCOPES[path]
        if owner in limited:
            raise RuleError(RuleReason.CONDITION,
                            f"{where}: condition path {path!r} belongs to scope {owner!r}, which this grant limits "
                            "(max_hz, precision_m or the privacy defaults): a condition would read it unlimited")
    return condition


def _number(item: dict[str, Any], key: str, where: str, *, default: float | None, low: float, high: float,
            low_open: bool = False) -> float:
    value = item.get(key)
    if value is None:
        if default is None:
            raise RuleError(RuleReason.PARAM, f"{where}: missing {key!r}")
        return default
    # bool is an int in Python; NaN and infinities compare oddly: exact numeric types, finite values only.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RuleError(RuleReason.PARAM, f"{where}: {key} must be a number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise RuleError(RuleReason.PARAM, f"{where}: {key} must be {bound} and <= {high:g}, got {value!r}")
    return float(value)
