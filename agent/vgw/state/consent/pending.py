"""A consent document applied in memory whose disk part is not done yet (docs/guarantees.md "Revocation wins
every race").

A verified document is consumed only once it is applied in memory and on disk. The memory part (collection and
publishing of every grant it stops or changes end at once) cannot fail; the disk part (new terms in the outbox,
the revoked grants' keys and rows erased, the cache written, the receipts queued) can, on a full or read-only
disk. Until it is done the document is *pending*: :class:`PendingApply` says what is done so far, so a retry
never erases, counts or receipts twice, and its JSON form is what survives a restart (written in place into
space reserved beforehand, vgw.base.fsutil.ReservedRecord, so a full disk does not stop it). Pure data: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vgw.contract.consent.model import Consent


@dataclass
class PendingApply:
    """One pending document and the progress of its disk part (no personal data: ids, versions, counts)."""

    consent: Consent
    source: str
    since: float
    previous_ver: int | None  # the version in force before it
    previous_digest: str | None
    revoked: frozenset[str]  # grants it revokes (a skipped version's revocations included)
    regrant: dict[str, int]  # grant -> the skipped version that revoked it (granted again by ``consent``)
    stopped: frozenset[str]  # grants whose publishing (and, for ``revoked``, collection) stopped in memory
    error: str | None = None  # why the disk part failed last (one line)
    # progress of the disk part
    narrowed: list[dict[str, Any]] | None = None  # the outbox's withdrawals once the new terms are stored
    wiped: dict[str, tuple[int, bool]] = field(default_factory=dict)  # grant -> (batches deleted, key destroyed)
    regranted: bool = False
    cached: bool = False  # consent.jws holds the document and the version floor is stored
    recorded: set[str] = field(default_factory=set)  # audit entries and receipts already queued

    def summary(self) -> dict[str, Any]:
        """What `vgw status` shows (``consent_pending``)."""
        return {"ver": self.consent.ver, "grants_stopped": sorted(self.stopped), "since": self.since,
                "error": self.error}

    def to_json(self) -> bytes:
        return json.dumps({
            "token": self.consent.token, "source": self.source, "since": self.since,
            "previous_ver": self.previous_ver, "previous_digest": self.previous_digest,
            "revoked": sorted(self.revoked), "regrant": self.regrant, "stopped": sorted(self.stopped),
            "error": self.error, "narrowed": self.narrowed, "wiped": {g: list(v) for g, v in self.wiped.items()},
            "regranted": self.regranted, "cached": self.cached, "recorded": sorted(self.recorded),
        }, sort_keys=True).encode()


def read_record(data: bytes) -> dict[str, Any]:
    """The JSON form of a pending document, shape-checked (the token itself is verified by the caller).
    Raises ValueError."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("token"), str):
        raise ValueError("not a pending consent record")
    for key, kind in (("revoked", list), ("stopped", list), ("regrant", dict), ("wiped", dict), ("recorded", list)):
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"pending consent record: {key} is not a {kind.__name__}")
    return doc


def from_record(doc: dict[str, Any], consent: Consent) -> PendingApply:
    """Rebuild the pending document from :func:`read_record`'s output and its verified ``consent``."""
    since = doc.get("since")
    return PendingApply(
        consent=consent, source=str(doc.get("source", "restart")),
        since=float(since) if isinstance(since, int | float) else 0.0,
        previous_ver=doc["previous_ver"] if isinstance(doc.get("previous_ver"), int) else None,
        previous_digest=doc["previous_digest"] if isinstance(doc.get("previous_digest"), str) else None,
        revoked=frozenset(str(g) for g in doc["revoked"]),
        regrant={str(g): int(v) for g, v in doc["regrant"].items()},
        stopped=frozenset(str(g) for g in doc["stopped"]),
        error=str(doc["error"]) if doc.get("error") is not None else None,
        narrowed=list(doc["narrowed"]) if isinstance(doc.get("narrowed"), list) else None,
        wiped={str(g): (int(v[0]), bool(v[1])) for g, v in doc["wiped"].items()},
        regranted=bool(doc.get("regranted")), cached=bool(doc.get("cached")),
        recorded={str(r) for r in doc["recorded"]},
    )
