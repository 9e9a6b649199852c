"""A read-only look at an agent's state directory, for the commands that report on it (`vgw status`,
`vgw consent show`, `vgw report`): safe while `vgw run` runs, and it changes nothing on disk.

Nothing is created: no state directory, no storage key (the figures shown need no decryption), no SQLite
schema and no -wal/-shm side files (see :func:`vgw.state.outbox.read_figures`). A state directory that does not
exist yet reads as an empty state with ``exists`` False.
"""

from __future__ import annotations

from dataclasses import dataclass

from vgw.config.settings import Config
from vgw.contract.consent.model import Consent, Grant
from vgw.state.audit import AuditLog
from vgw.state.consent.manager import load_trust_keys, read_cached
from vgw.state.consent.store import ConsentStore
from vgw.state.outbox import OUTBOX_FILE, OutboxFigures, read_figures


@dataclass(frozen=True)
class StateView:
    """What a state directory holds, read once."""

    exists: bool  # False: no state directory yet (nothing was ever applied or run)
    consent: Consent | None  # the cached consent, re-verified; None if there is none or it no longer verifies
    expired: bool
    audit: AuditLog
    outbox: OutboxFigures

    def active_grants(self) -> tuple[Grant, ...]:
        if self.consent is None or self.expired:
            return ()
        return self.consent.grants

    # The outbox's figures, under the names the commands use.
    @property
    def outbox_stats(self) -> dict[str, dict[str, int]]:
        return self.outbox.stats

    @property
    def counters(self) -> dict[str, int]:
        return self.outbox.counters

    @property
    def receipts_queued(self) -> int:
        return self.outbox.receipts_queued

    @property
    def used_bytes(self) -> int:
        return self.outbox.used_bytes


def read_state(cfg: Config) -> StateView:
    """Read ``cfg``'s state directory: the cached consent (re-verified) and the outbox's figures.

    Raises :class:`~vgw.base.errors.ConfigError` for an unreadable trust key and :class:`~vgw.base.errors.StorageError`
    for an unreadable outbox or state file.
    """
    audit = AuditLog(cfg.state_dir)
    trust_keys = load_trust_keys(cfg.consent.trust_keys)
    if not cfg.state_dir.is_dir():
        return StateView(exists=False, consent=None, expired=False, audit=audit,
                         outbox=OutboxFigures({}, {}, 0, 0))
    cached = read_cached(ConsentStore(cfg.state_dir), trust_keys, cfg.device.id)
    return StateView(exists=True, consent=cached.consent, expired=cached.expired, audit=audit,
                     outbox=read_figures(cfg.state_dir / OUTBOX_FILE))
