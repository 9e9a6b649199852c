"""The rule engine of one grant: decoded samples in, in frame-time order; the samples to send out.

:class:`RuleEngine` applies a grant's collection rules (README "Collection rules") before its limits. It is pure and
stateful: :meth:`RuleEngine.feed` takes one sample ``(path, scope, t, value)`` of the grant and returns the
samples it lets through now, as ``(path, t, value)``; :meth:`RuleEngine.flush` closes every open periodic and
aggregate window (end of a trace, shutdown); :meth:`RuleEngine.clear` forgets everything it holds
(revocation, new terms). Every time is frame time (the samples' ``t``), never the wall clock, so a trace
replayed at any rate gives the same result as the drive it recorded.

The engine's clock is the latest ``t`` it was fed, by any path of the grant: a periodic or aggregate window
closes as soon as any sample of the grant passes its end, not only a sample of the same path.

A trigger's condition is evaluated when one of its paths takes a new value (the same value again changes
nothing a condition could see), at most :data:`~vgw.contract.rules.limits.RATE_HZ` times per second of frame time on
average: a change that comes while its rule is over that rate is judged at the first sample of the grant after
the rule may evaluate again, with the values of that moment. Its pre-trigger history holds at most the samples
the verifier counted for it (:func:`vgw.contract.rules.budget.rule_held`); beyond that the oldest go first
(``held_dropped``). So the work and memory of every engine stay within what the verifier budgeted
(docs/guarantees.md "Budgets"), whatever the bus sends; ``evaluations`` and ``work`` count what was spent.

A path with no rule (neither its own nor its scope's) passes unchanged. The engine only ever sees the
grant's own samples (the router feeds it nothing else), so a condition can read no value outside the grant,
and nothing it returns is a path the grant was not fed.

Owned by the pipeline; every call is made with the runtime's pipeline lock held.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vgw.contract.rules.budget import rule_held
from vgw.contract.rules.expr import Evaluator
from vgw.contract.rules.limits import BURST_S, EVAL_COST, RATE_HZ
from vgw.contract.rules.rules import Mode, Rule

Out = tuple[str, float, Any]  # (path, t, value)

_BURST = BURST_S * RATE_HZ  # evaluations a rule may spend at once


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(slots=True)
class _Sent:
    value: Any
    t: float


@dataclass(slots=True)
class _Window:
    """One path's open periodic or aggregate window ``[k * length, (k + 1) * length)``."""

    k: int
    end: float
    n: int = 0
    low: float = 0.0
    high: float = 0.0
    total: float = 0.0
    last: Any = None
    last_t: float = 0.0


@dataclass(slots=True)
class _Trigger:
    rule: Rule
    evaluator: Evaluator
    cost: int  # nodes one evaluation costs (vgw.contract.rules.budget)
    history: deque[tuple[float, str, Any]]  # bounded by the rule's share of the memory budget
    was_true: bool = False
    start: float = -math.inf  # the open window [start, end]; end < start: none open
    end: float = -math.inf
    quiet_until: float = -math.inf  # no new trigger before this (min_interval_s after a window ends)
    # A token bucket: evaluations the rule may spend, refilled at RATE_HZ up to _BURST when it runs out (the first
    # refill, at the first evaluation, fills it).
    tokens: float = 0.0
    refill_t: float = -math.inf  # the engine clock of the last refill
    pending: bool = False  # a change waits for a token

    @staticmethod
    def of(rule: Rule) -> _Trigger:
        assert rule.when is not None
        return _Trigger(rule, Evaluator(rule.when), EVAL_COST + rule.when.cost, deque(maxlen=rule_held(rule)))


class RuleEngine:
    """Applies one grant's rules; see the module docstring."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        self._by_path = {r.path: r for r in self.rules if r.path is not None}
        self._by_scope = {r.scope: r for r in self.rules if r.scope is not None}
        self._triggers = {id(r): _Trigger.of(r) for r in self.rules if r.mode is Mode.TRIGGER and r.when is not None}
        self._watched: dict[str, list[_Trigger]] = {}
        for trig in self._triggers.values():
            assert trig.rule.when is not None
            for p in trig.rule.when.paths:
                self._watched.setdefault(p, []).append(trig)
        self._rule_cache: dict[tuple[str, str], Rule | None] = {}
        self._scopes: dict[str, str] = {}  # the scope each path was fed under (no values: kept across clear())
        self._values: dict[str, float] = {}  # latest numeric value of each path a condition reads
        self._sent: dict[str, _Sent] = {}  # on_change: last value sent per path
        self._windows: dict[str, tuple[Rule, _Window]] = {}  # periodic/aggregate: the open window per path
        self._next_close = math.inf  # the earliest end of an open window
        self._pending: list[_Trigger] = []  # triggers with a change waiting for a token
        self._pending_due = math.inf  # the earliest clock at which one of them has a token again
        self.clock = -math.inf
        self.evaluations = 0  # conditions evaluated
        self.work = 0  # nodes they cost (vgw.contract.rules.budget)
        self.held_dropped = 0  # history samples dropped for the rule's share of the memory budget

    # -- public -------------------------------------------------------------------------------------

    def feed(self, path: str, scope: str, t: float, value: Any) -> list[Out]:
        """One sample of the grant; returns what to send now, oldest first."""
        out: list[Out] = []
        if t > self.clock:
            self.clock = t
            if t >= self._next_close:
                self._close(out, t)
            if t >= self._pending_due:
                self._run_pending(t, out)
        watchers = self._watched.get(path)
        if watchers is not None:
            self._watch(path, t, value, watchers, out)
        key = (path, scope)
        try:
            rule = self._rule_cache[key]
        except KeyError:
            # A path rule overrides its scope's rule (README "Collection rules").
            rule = self._rule_cache[key] = self._by_path.get(path) or self._by_scope.get(scope)
            self._scopes[path] = scope
        if rule is None:
            out.append((path, t, value))
        elif rule.mode is Mode.ON_CHANGE:
            self._on_change(rule, path, t, value, out)
        elif rule.mode is Mode.TRIGGER:
            self._trigger(self._triggers[id(rule)], path, t, value, out)
        else:
            self._window(rule, path, t, value, out)
        return out

    def flush(self) -> list[Out]:
        """Close every open periodic and aggregate window now (partial windows included)."""
        out: list[Out] = []
        self._close(out, math.inf)
        return out

    def clear(self) -> None:
        """Forget every value, window and history held (revocation: nothing of the grant stays in memory)."""
        self._values.clear()
        self._sent.clear()
        self._windows.clear()
        self._next_close = math.inf
        for trig in self._triggers.values():
            trig.history.clear()
            trig.evaluator.reset()
            trig.was_true = trig.pending = False
            trig.start = trig.end = trig.quiet_until = -math.inf
        self._pending.clear()
        self._pending_due = math.inf

    def scope_of(self, path: str) -> str:
        """The scope ``path`` was fed under (every path the engine returns was fed to it)."""
        return self._scopes[path]

    def window_index(self, path: str, t: float) -> int | None:
        """The index of the periodic or aggregate window a sample at ``t`` of ``path`` belongs to (an aggregate's
        ``t`` is its window's end); None when another mode, or none, decides the path."""
        scope = self._scopes.get(path)
        rule = self._by_path.get(path) or (self._by_scope.get(scope) if scope is not None else None)
        if rule is None or rule.mode is Mode.ON_CHANGE or rule.mode is Mode.TRIGGER:
            return None
        if rule.mode is Mode.PERIODIC:
            return math.floor(t / rule.period_s)
        return math.ceil(t / rule.window_s - 1e-9) - 1

    def held(self) -> int:
        """How many samples the engine holds in memory (trigger histories and open windows)."""
        return sum(len(t.history) for t in self._triggers.values()) + len(self._windows)

    # -- modes --------------------------------------------------------------------------------------

    def _on_change(self, rule: Rule, path: str, t: float, value: Any, out: list[Out]) -> None:
        last = self._sent.get(path)
        if last is not None and t - last.t < rule.heartbeat_s:
            if is_number(value) and is_number(last.value):
                if abs(value - last.value) <= rule.deadband:
                    return
            elif value == last.value:
                return
        self._sent[path] = _Sent(value, t)
        out.append((path, t, value))

    def _window(self, rule: Rule, path: str, t: float, value: Any, out: list[Out]) -> None:
        aggregate = rule.mode is Mode.AGGREGATE
        if aggregate and not is_number(value):
            return  # README "Collection rules": the summary is over numeric samples; no raw sample of the path is sent
        length = rule.window_s if aggregate else rule.period_s
        k = math.floor(t / length)
        held = self._windows.get(path)
        if held is not None and held[1].k != k:
            if k < held[1].k:
                return  # a sample older than the open window (sources interleaved): its window has closed
            self._emit_window(path, *held, out)
            held = None
        if held is None:
            window = _Window(k=k, end=(k + 1) * length)
            self._windows[path] = (rule, window)
            self._next_close = min(self._next_close, window.end)
        else:
            window = held[1]
        if aggregate:
            v = float(value)
            if window.n == 0:
                window.low = window.high = v
            else:
                window.low, window.high = min(window.low, v), max(window.high, v)
            window.total += v
            window.n += 1
        window.last, window.last_t = value, t

    def _close(self, out: list[Out], now: float) -> None:
        closing = [(p, rule, w) for p, (rule, w) in self._windows.items() if w.end <= now]
        closing.sort(key=lambda item: item[2].end)
        for path, rule, window in closing:
            del self._windows[path]
            self._emit_window(path, rule, window, out)
        self._next_close = min((w.end for _, w in self._windows.values()), default=math.inf)

    @staticmethod
    def _emit_window(path: str, rule: Rule, window: _Window, out: list[Out]) -> None:
        if rule.mode is Mode.PERIODIC:
            out.append((path, window.last_t, window.last))
        elif window.n:
            out.append((path, window.end, {"n": window.n, "min": window.low, "max": window.high,
                                           "mean": window.total / window.n, "last": window.last}))

    def _watch(self, path: str, t: float, value: Any, watchers: list[_Trigger], out: list[Out]) -> None:
        if is_number(value):
            new: float | None = float(value)
        elif isinstance(value, bool):
            new = 1.0 if value else 0.0
        else:
            new = None  # a text value is no value for a comparison
        values = self._values
        if values.get(path) == new:
            return  # the same value again: no condition can see a difference, none is evaluated
        if new is None:
            del values[path]
        else:
            values[path] = new
        for trig in watchers:
            if trig.tokens < 1.0 and not self._refill(trig):
                continue
            trig.tokens -= 1.0
            self._evaluate(trig, t, out)

    def _refill(self, trig: _Trigger) -> bool:
        """Add the tokens earned since the last refill; False (and the trigger waits) if still none."""
        clock = self.clock
        trig.tokens = min(_BURST, trig.tokens + (clock - trig.refill_t) * RATE_HZ)
        trig.refill_t = clock
        if trig.tokens >= 1.0:
            return True
        if not trig.pending:
            trig.pending = True
            self._pending.append(trig)
            self._pending_due = min(self._pending_due, clock + (1.0 - trig.tokens) / RATE_HZ)
        return False

    def _run_pending(self, t: float, out: list[Out]) -> None:
        """Judge the changes that waited for their rule's rate, now that the clock has reached a token."""
        waiting, self._pending, self._pending_due = self._pending, [], math.inf
        for trig in waiting:
            if not trig.pending:
                continue  # judged meanwhile, by a change that found a token
            trig.pending = False
            if self._refill(trig):
                trig.tokens -= 1.0
                self._evaluate(trig, t, out)

    def _evaluate(self, trig: _Trigger, t: float, out: list[Out]) -> None:
        trig.pending = False
        self.evaluations += 1
        self.work += trig.cost
        now_true = trig.evaluator(self._values)
        rose = now_true and not trig.was_true
        trig.was_true = now_true
        # A trigger fires when the condition becomes true, outside an open window and its quiet time.
        if not rose or trig.start <= t <= trig.end or t < trig.quiet_until:
            return
        rule = trig.rule
        trig.start, trig.end = t - rule.pre_s, t + rule.post_s
        trig.quiet_until = trig.end + rule.min_interval_s
        for ht, hp, hv in trig.history:
            if ht >= trig.start:
                out.append((hp, ht, hv))
        trig.history.clear()  # released or too old: memory-only history never outlives its use

    def _trigger(self, trig: _Trigger, path: str, t: float, value: Any, out: list[Out]) -> None:
        if trig.start <= t <= trig.end:
            out.append((path, t, value))
            return
        # Even with pre_s = 0 the samples of this very instant are held: a frame read just before the one
        # that fires the trigger lies inside its window [t - 0, t + post_s].
        history = trig.history
        horizon = t - trig.rule.pre_s
        while history and history[0][0] < horizon:
            history.popleft()
        if len(history) == history.maxlen:
            self.held_dropped += 1  # over the rule's share of the memory budget: the oldest goes
        history.append((t, path, value))
