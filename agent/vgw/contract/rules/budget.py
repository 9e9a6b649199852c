"""What the collection rules of a consent document cost one agent, and the check against its budgets.

Pure: rules in, numbers out (docs/guarantees.md "Budgets"; the limits are in :mod:`vgw.contract.rules.limits`).

- **Work**, in nodes per second: a trigger rule's condition is evaluated at most :data:`RATE_HZ` times per
  second (the engine enforces it), each evaluation costing :data:`EVAL_COST` plus the condition's nodes after
  constant folding. Rules of the other modes do a fixed amount of work per sample, as the pipeline does
  without rules; they cost nothing here.
- **Held samples**: a trigger rule holds back at most ``pre_s * RATE_HZ + 1`` samples of each path it
  collects (one path, or every path of its scope: :mod:`vgw.contract.rules.vss`) for its pre-trigger history (the
  engine drops the oldest beyond that). Periodic and aggregate windows hold one value per path: bounded by
  the paths, not by the document.

:class:`Tally` adds a document's grants one by one, so the verifier refuses an over-budget document as soon
as it passes the budget, before reading its remaining grants.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vgw.contract.rules.limits import EVAL_COST, MAX_HELD_SAMPLES, MAX_WORK, RATE_HZ
from vgw.contract.rules.rules import Mode, Rule, RuleError, RuleReason
from vgw.contract.rules.vss import VSS_SCOPES

_PATHS_OF_SCOPE: dict[str, int] = {}
for _scope in VSS_SCOPES.values():
    _PATHS_OF_SCOPE[_scope] = _PATHS_OF_SCOPE.get(_scope, 0) + 1


def rule_work(rule: Rule) -> float:
    """Nodes per second ``rule`` may evaluate at most (0 for a rule without a condition)."""
    if rule.mode is not Mode.TRIGGER or rule.when is None:
        return 0.0
    return RATE_HZ * (EVAL_COST + rule.when.cost)


def rule_held(rule: Rule) -> int:
    """Samples ``rule`` may hold back at most for its pre-trigger history (0 for a rule of another mode)."""
    if rule.mode is not Mode.TRIGGER:
        return 0
    # A closed window of pre_s seconds holds at most pre_s * rate + 1 samples of one path.
    per_path = math.floor(rule.pre_s * RATE_HZ) + 1
    paths = 1 if rule.path is not None else _PATHS_OF_SCOPE.get(str(rule.scope), 1)
    return per_path * paths


@dataclass(frozen=True, slots=True)
class Usage:
    """What a document's rules may cost together: ``work`` in nodes per second, ``held`` in samples."""

    work: float
    held: int


def document_usage(grants: Iterable[Sequence[Rule]]) -> Usage:
    """The usage of every rule of every grant (each item: one grant's rules)."""
    rules = [r for collect in grants for r in collect]
    return Usage(work=sum(rule_work(r) for r in rules), held=sum(rule_held(r) for r in rules))


class Tally:
    """The running usage of one document while its grants are read; :meth:`add` raises past a budget."""

    def __init__(self) -> None:
        self.work = 0.0
        self.held = 0

    def add(self, rules: Sequence[Rule]) -> None:
        """Count one grant's ``rules``. Raises :class:`RuleError` (``collect-cpu``,
        ``collect-memory``) when the document so far is over the agent's budget."""
        usage = document_usage([rules])
        self.work += usage.work
        self.held += usage.held
        # One document can make the agent spend a core on conditions (a CPU bomb within every size limit).
        if self.work > MAX_WORK:
            raise RuleError(RuleReason.CPU, f"collect rules of this grant and those before it need {self.work:,.0f} "
                            f"nodes/s of condition work, over the agent's budget of {MAX_WORK:,} "
                            "(docs/guarantees.md \"Budgets\")")
        # Pre-trigger histories are memory: many grants each holding 60 s would outgrow a Pi.
        if self.held > MAX_HELD_SAMPLES:
            raise RuleError(RuleReason.MEMORY, f"collect rules of this grant and those before it may hold "
                            f"{self.held:,} samples of pre-trigger history, over the agent's budget of "
                            f"{MAX_HELD_SAMPLES:,} (docs/guarantees.md \"Budgets\")")
