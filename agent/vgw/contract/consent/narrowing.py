"""What a new consent document withdraws from a grant that stays in force (README "Narrowing applies to stored data").

Pure: two :class:`Grant` values in, a :class:`Narrowing` out; no I/O. The outbox uses the result to delete
the stored batches that hold withdrawn data, since a sealed batch cannot be re-filtered on the device.

Rule: no sample of a scope that is not in force at publish time leaves the car. A stored batch is withdrawn
when its grant
  * dropped one of the batch's scopes (``scope-removed``);
  * tightened a limit of one of the batch's scopes: a lower ``max_hz``, a coarser ``precision_m``, or a limit
    where there was none (``limit-tightened``);
  * changed its recipient key, controller, purpose or any other term this agent cannot compare: every batch
    (``recipient-changed`` / ``terms-changed``; fail closed, as README "Consent document" does for unknown keys);
  * shortened ``retention_s``: the batches older than the new retention (``retention-shortened``);
  * changed the collection rules of one of the batch's scopes in any way: tighter, looser, another mode, a rule
    added or removed (``rules-changed``; docs/privacy.md, "Narrowing and collection rules"). "Looser" cannot be
    told across modes (a summary per minute against a trigger window), so every change counts; a scope whose
    rules did not change keeps its stored batches.
Loosening (a higher ``max_hz``, a new scope, a longer retention) withdraws nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass

from vgw.contract.consent.model import Grant
from vgw.contract.rules.vss import VSS_SCOPES

# Fields compared one by one below; any other field that differs is a change this module cannot judge.
_KNOWN_FIELDS = frozenset({"id", "scopes", "limits", "recipient", "retention_s"})
# Compared per scope by narrowing(); terms_digest() counts the rules as the document states them.
_RULES_FIELD = "collect"


class NarrowingKind(enum.StrEnum):
    SCOPE_REMOVED = "scope-removed"
    LIMIT_TIGHTENED = "limit-tightened"
    RECIPIENT_CHANGED = "recipient-changed"
    RETENTION_SHORTENED = "retention-shortened"
    TERMS_CHANGED = "terms-changed"
    RULES_CHANGED = "rules-changed"


@dataclass(frozen=True, slots=True)
class Narrowing:
    """What a grant that stays in force lost. ``withdraw_all``: every stored batch of it goes."""

    kinds: frozenset[NarrowingKind] = frozenset()
    scopes: frozenset[str] = frozenset()  # scopes whose stored samples are withdrawn
    withdraw_all: bool = False
    retention_s: int | None = None  # the new, shorter retention (batches older than it go)

    def __bool__(self) -> bool:
        return bool(self.kinds)


def terms_digest(grant: Grant) -> str:
    """A stable digest of everything in ``grant`` that decides what may be sent and to whom.

    Each outbox row carries the digest of the terms its samples were collected under; a row is published
    only while its digest is the one in force (a publish-time check, see :meth:`vgw.state.outbox.Outbox.pending`).
    """
    other = {f.name: repr(getattr(grant, f.name)) for f in dataclasses.fields(grant)
             if f.name not in _KNOWN_FIELDS | {_RULES_FIELD}}
    # The rules as the document states them (defaults filled in), in a fixed order: not the parsed form, whose
    # repr prints a condition's path set in hash order (another digest in every process) and its whole tree
    # (milliseconds per batch). A grant without rules keeps the digest earlier versions stamped its rows with.
    other[_RULES_FIELD] = json.dumps(sorted(json.dumps(r.to_json(), sort_keys=True) for r in grant.collect)) \
        if grant.collect else repr(())
    terms = {
        "scopes": sorted(grant.scopes),
        "limits": {s: [grant.limits_for(s).max_hz, grant.limits_for(s).precision_m] for s in sorted(grant.scopes)},
        "recipient": [grant.recipient.kem, grant.recipient.pk.hex()],
        "retention_s": grant.retention_s,
        "other": other,
    }
    return hashlib.sha256(json.dumps(terms, sort_keys=True).encode()).hexdigest()[:32]


def narrowing(old: Grant, new: Grant) -> Narrowing:
    """What ``new`` (same grant id, newer document) withdraws compared with ``old``."""
    kinds: set[NarrowingKind] = set()
    scopes: set[str] = set()
    withdraw_all = False

    removed = set(old.scopes) - set(new.scopes)
    if removed:
        kinds.add(NarrowingKind.SCOPE_REMOVED)
        scopes |= removed
    for scope in set(old.scopes) & set(new.scopes):
        if _tighter(old, new, scope):
            kinds.add(NarrowingKind.LIMIT_TIGHTENED)
            scopes.add(scope)
    if old.recipient != new.recipient:
        # Sealed to a key the grant no longer names: the new recipient could not open them anyway, and the
        # old one is no longer entitled to them.
        kinds.add(NarrowingKind.RECIPIENT_CHANGED)
        withdraw_all = True
    old_rules, new_rules = _rules_by_scope(old), _rules_by_scope(new)
    changed_rules = {scope for scope in (old_rules.keys() | new_rules.keys()) & set(new.scopes)
                     if old_rules.get(scope) != new_rules.get(scope)}
    if changed_rules:
        kinds.add(NarrowingKind.RULES_CHANGED)
        scopes |= changed_rules
    others = {f.name for f in dataclasses.fields(old) if f.name not in _KNOWN_FIELDS | {_RULES_FIELD}}
    if any(getattr(old, name) != getattr(new, name, None) for name in others):
        # Another controller or purpose (GDPR Art. 5(1)(b): collected for one purpose, not sent for another),
        # or a term this agent cannot compare: fail closed.
        kinds.add(NarrowingKind.TERMS_CHANGED)
        withdraw_all = True
    retention = None
    if new.retention_s is not None and (old.retention_s is None or new.retention_s < old.retention_s):
        kinds.add(NarrowingKind.RETENTION_SHORTENED)
        retention = new.retention_s
    return Narrowing(frozenset(kinds), frozenset(scopes), withdraw_all, retention)


def _tighter(old: Grant, new: Grant, scope: str) -> bool:
    a, b = old.limits_for(scope), new.limits_for(scope)
    if b.max_hz is not None and (a.max_hz is None or b.max_hz < a.max_hz):
        return True
    return b.precision_m is not None and (a.precision_m is None or b.precision_m > a.precision_m)


def _rules_by_scope(grant: Grant) -> dict[str, list[str]]:
    """Each scope's collection rules (a rule naming a VSS path counts for that path's scope), canonical JSON
    with defaults filled in, sorted: the order of the rules in the document means nothing."""
    out: dict[str, list[str]] = {}
    for rule in grant.collect:
        scope = rule.scope if rule.path is None else VSS_SCOPES.get(rule.path, rule.path)
        out.setdefault(str(scope), []).append(json.dumps(rule.to_json(), sort_keys=True))
    return {scope: sorted(rules) for scope, rules in out.items()}
