"""Every limit on collection rules (README "Collection rules"), in one place: sizes a document may use, and
the budgets of work and memory its rules may cause in one agent (docs/guarantees.md, "Budgets").

Sizes are judged while a document is read (:mod:`vgw.contract.rules.expr`, :mod:`vgw.contract.rules.rules`);
budgets once its rules are read, over every grant of the document together (:mod:`vgw.contract.rules.budget`),
and again at run time by the engine (:mod:`vgw.pipeline.rule_engine`), which never lets a rule work or hold more
than the verifier counted for it.

Work is counted in *nodes*: one evaluation of a condition costs :data:`EVAL_COST` plus the nodes of its
tree after constant folding. A rule is budgeted for :data:`RATE_HZ` evaluations per second and for
:data:`RATE_HZ` samples per second of each path it holds back; the engine enforces both (a faster signal's
changes are judged at the budgeted rate, a faster signal's history is cut to its share), so the budgets hold
whatever a vehicle's bus sends. The verifier needs no vehicle to apply them: a document is judged the same
way on every car, in `vgw status` and in `vgw cloud sign`.
"""

from __future__ import annotations

# -- sizes -------------------------------------------------------------------------------------------------

MAX_CHARS = 256  # characters of one condition (README "Collection rules"), refused before any token is read
MAX_DEPTH = 16  # nesting of one condition: parentheses, function calls and prefix operators
MAX_RULES = 64  # rules of one grant: at most one per scope (15) and per path
MAX_PRE_S = 60.0  # pre-trigger history of one rule, in seconds (README "Collection rules")
MAX_DURATION_S = 86_400.0  # heartbeat, period, window, post-trigger window and pause: at most a day
MAX_DEADBAND = 1e9

# -- budgets, per agent (every grant of the document in force together) -------------------------------------

# The rate a rule is budgeted for: 100 Hz, the fastest cycle time (GenMsgCycleTime 10 ms) of the demo vehicle
# and of common powertrain messages. A condition is evaluated at most this often on average (BURST_S seconds
# of evaluations may come at once); a trigger holds at most this many samples per second of pre_s per path.
RATE_HZ = 100.0
BURST_S = 1.0
# Work is counted in nodes of a folded condition; one evaluation also costs as much as EVAL_COST nodes (the call,
# the rate check, the trigger's bookkeeping). Measured on the development machine (docs/performance.md,
# "Collection rules at their budgets"): a node costs 11-16 ns, an evaluation's fixed part about 300 ns.
EVAL_COST = 24
# Nodes evaluated per second by every rule of the agent together. The costliest document within it adds about
# 1 % of a core there; with the fixed cost of having rules at all (each sample of a grant with rules goes through
# its engine instead of the generated column writers) the agent stays at x1.4-1.5 its CPU without rules
# (`vgw bench --rules`; the target is <= 2x). At 1,000,000 it measured x1.8-1.95: too close to the target.
MAX_WORK = 500_000
# Samples held by every trigger rule's pre-trigger history together: about 70 bytes each, so about 13 MB of RSS
# when every history is full (`vgw bench --rules`).
MAX_HELD_SAMPLES = 200_000
