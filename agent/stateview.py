"""A read-only look at an agent's state directory, for the commands that report on it (`vgw status`,
`vgw report`): safe while `vgw run` runs, and it changes nothing on disk."""

from __future__ import annotations

from dataclasses import dataclass

from vgw.audit import AuditLog
from vgw.config import Config
from vgw.consent.manager import ConsentManager, load_trust_keys
from vgw.runtime import open_state


@dataclass(frozen=True)
class StateView:
    """What a state directory holds, read once; the outbox is closed again."""

    manager: ConsentManager  # for reading only (its outbox is closed): ``in_force``, ``expired``, ``active_grants``
    audit: AuditLog
    outbox_stats: dict[str, dict[str, int]]  # grant id -> {"rows": n, "bytes": n}
    counters: dict[str, int]
    receipts_queued: int
    used_bytes: int


def read_state(cfg: Config) -> StateView:
    """Load the cached consent of ``cfg``'s device (re-verified, read-only) and read the outbox's figures.

    Raises :class:`~vgw.errors.ConfigError` for an unreadable trust key or device key and
    :class:`~vgw.errors.StorageError` for the storage key or the outbox.
    """
    outbox, audit, store, signer = open_state(cfg)
    try:
        manager = ConsentManager(device=cfg.device.id, store=store, outbox=outbox, audit=audit, signer=signer,
                                 trust_keys=load_trust_keys(cfg.consent.trust_keys))
        manager.load_cached_readonly()
        return StateView(manager=manager, audit=audit, outbox_stats=outbox.stats(), counters=outbox.counters(),
                         receipts_queued=outbox.receipt_count(), used_bytes=outbox.total_bytes())
    finally:
        outbox.close()
