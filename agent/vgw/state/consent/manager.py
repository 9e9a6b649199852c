"""Applies verified consent documents and carries out their effects.

The verifier decides; the manager acts: it caches the accepted document, tells the runtime which grants
stopped (so collection stops and in-memory batches go), erases those grants on disk (data key first, then
rows), writes the audit log and queues the signed receipts. It is used by the running agent (documents from
MQTT, from ``vgw consent apply`` via the cache file, and on expiry) and by ``vgw consent apply`` itself when
no agent runs.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from vgw.base.errors import (
    ConfigError,
    ConsentError,
    ConsentReason,
    MalformedError,
    StorageError,
    VersionConflictError,
)
from vgw.base.fsutil import MAX_KEY_BYTES, check_owner, read_small_file
from vgw.contract.consent.model import Consent, Grant, version_text
from vgw.contract.consent.narrowing import NarrowingKind, narrowing, terms_digest
from vgw.contract.consent.verifier import verify_consent
from vgw.contract.receipt_types import ErasureReason, ReceiptType
from vgw.contract.receipts import ReceiptSigner
from vgw.state.audit import AuditLog
from vgw.state.consent.pending import PendingApply, from_record, read_record
from vgw.state.consent.rejections import RejectionLog
from vgw.state.consent.store import ConsentStore, PendingErasure
from vgw.state.outbox import ERASE_WAIT_S, Erasure, GrantTerms, Outbox, Withdrawal

log = logging.getLogger(__name__)

NARROWED = ErasureReason.NARROWED  # the reason of an erasure receipt for stored data a narrowed grant withdrew

# Called with the grant ids that stop, before anything is erased on disk: the runtime stops collecting
# them and drops their in-memory batches.
RevokeHook = Callable[[frozenset[str]], None]


def load_trust_keys(paths: Sequence[Path]) -> list[Ed25519PublicKey]:
    keys: list[Ed25519PublicKey] = []
    for p in paths:
        try:
            data = read_small_file(p, what="consent trust key", max_bytes=MAX_KEY_BYTES, error=ConfigError)
            # A trust key others can replace would let them sign consent: refused like a private key.
            check_owner(p, what="consent trust key", allow_root=True, error=ConfigError)
            key = load_pem_public_key(data)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{p}: cannot load consent trust key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{p}: consent trust keys must be Ed25519 public keys (PEM)")
        keys.append(key)
    return keys


@dataclass(frozen=True)
class CachedConsent:
    """The cached document as re-verified now: ``consent`` is None when there is none or it no longer verifies
    (``problem`` then names why: a :class:`ConsentError` reason, ``malformed`` or ``version-rollback``)."""

    consent: Consent | None
    expired: bool = False
    problem: StrEnum | None = None
    problem_ver: int | None = None


def read_cached(store: ConsentStore, trust_keys: Sequence[Ed25519PublicKey], device: str) -> CachedConsent:
    """Re-verify the cached consent document; reads only (`vgw status` and `consent show` use it too)."""
    token = store.read_token()
    if token is None:
        return CachedConsent(None)
    try:
        # Re-verify signature, subject and claims; the validity window is judged against the clock
        # floor instead (an expired document stays the one in force, as expired).
        consent = verify_consent(token, trust_keys=trust_keys, device=device, now=float(_claim_int(token, "iat")))
    except (ConsentError, ValueError, IndexError, KeyError, TypeError) as exc:
        reason = exc.reason if isinstance(exc, ConsentError) else ConsentReason.MALFORMED
        log.warning("cached consent no longer verifies (%s): nothing is in force", reason)
        return CachedConsent(None, problem=reason)
    if consent.ver < store.max_ver:
        # The cache holds an older version than one applied here before: a rollback of the file.
        log.warning("cached %s is older than v%d applied before: nothing is in force", version_text(consent.ver),
                    store.max_ver)
        return CachedConsent(None, problem=ConsentReason.VERSION_ROLLBACK, problem_ver=consent.ver)
    return CachedConsent(consent, expired=store.now() >= consent.exp)


@dataclass
class ApplyResult:
    # "applied" | "duplicate" | "rejected" | "pending" (applied in memory, its disk part waits: see
    # vgw.state.consent.pending; ``error`` is None then and the manager retries it)
    status: str
    consent: Consent | None
    error: ConsentError | None = None
    revoked: list[Erasure] = field(default_factory=list)
    narrowed: list[Withdrawal] = field(default_factory=list)


class ConsentManager:
    def __init__(
        self,
        *,
        device: str,
        store: ConsentStore,
        outbox: Outbox,
        audit: AuditLog,
        signer: ReceiptSigner,
        trust_keys: Sequence[Ed25519PublicKey],
        on_revoke: RevokeHook | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.device = device
        self.store = store
        self.outbox = outbox
        self.audit = audit
        self.signer = signer
        self.trust_keys = list(trust_keys)
        self.on_revoke = on_revoke
        self.on_change = on_change
        self.in_force: Consent | None = None
        self._rejections = RejectionLog(record=self._record_rejection)
        self.expired = False
        # A verified document applied in memory whose disk part waits (vgw.state.consent.pending), and the newest
        # document that arrived meanwhile (applied in memory too; on disk after the pending one).
        self.pending: PendingApply | None = None
        self.disk_due = False  # settle_disk could not finish (a full or read-only disk): the main loop retries it
        self._unlisted: set[str] = set()  # grants settle_disk still has to erase (see there)
        self._held: tuple[Consent, str, list[tuple[int, frozenset[str]]]] | None = None
        self._previous_grants: tuple[Grant, ...] | None = None  # the grants the pending document replaces
        self._journal_warned: int | None = None  # the version whose unwritable record was logged

    # -- what is in force ---------------------------------------------------------------------------

    def active_grants(self) -> tuple[Grant, ...]:
        """The grants collected and published now. While a document is pending only the grants it keeps
        unchanged (and the document held behind it too): a grant it stops or changes stopped in memory at once."""
        if self.in_force is None or self.expired:
            return ()
        grants = self.in_force.grants
        for consent in self._waiting():
            kept = {g.id: g for g in consent.grants}
            grants = tuple(g for g in grants if kept.get(g.id) == g)
        return grants

    def _waiting(self) -> list[Consent]:
        return ([self.pending.consent] if self.pending else []) + ([self._held[0]] if self._held else [])

    def load_cached_readonly(self) -> None:
        """Load and re-verify the cached document, with no effect on disk (for status and show)."""
        self.in_force, self.expired = self._read_cache(audit=False)

    def load_cached(self) -> None:
        """Load and re-verify the cached document; finish a document left pending; erase anything on disk no
        grant in force covers. Raises StorageError when the disk part cannot be done now (it stays pending, or
        due: :meth:`settle_disk`)."""
        self.in_force, self.expired = self._read_cache(audit=True)
        # Before a document left pending is taken up: its disk part replaces the outbox's list of active grants,
        # the only record of which grants were in force before the cache failed (see settle_disk).
        self._note_unlisted()
        if self._resume_pending() is not None and self.pending is not None:
            self.disk_due = True
            return  # its disk part waits for space: the rest (settle_disk) runs once it is done
        self.settle_disk()

    def settle_disk(self) -> None:
        """Bring the outbox in line with the grants in force: rows under other terms judged, grants on disk that no
        grant in force covers erased (with their receipts), erasures left pending finished, the clock floor raised.

        Idempotent. Raises StorageError when the disk cannot take it now; it then stays due (:attr:`disk_due`) and
        the main loop calls it again, so an erasure a full disk refused at start is not forgotten."""
        self.disk_due = True
        grants = self.active_grants()
        active = {g.id for g in grants}
        self._note_unlisted()
        self._withhold(self._held_stops())
        # Rows stamped with other terms than those in force (stored by an earlier version, or a crash between
        # a narrowing and the cache write) are judged now, before the uplink can publish anything.
        for withdrawal in self.outbox.apply_terms(_terms(grants, previous=()),
                                                  ver=self.in_force.ver if self.in_force else None):
            self._withdrawn(withdrawal, ver=self.in_force.ver if self.in_force else 0)
        # A crash mid-erasure, an expiry while off, or a cache that no longer verifies: finish the job.
        self._finish_begun(active)
        self._erase_unlisted(keep=active, also=self.outbox.orphan_grants(active))
        self._withhold(self._held_stops())
        self.finish_pending_erasures()
        if self.in_force is not None:
            self.store.raise_floor(self.in_force.iat)
        self.disk_due = False

    def _note_unlisted(self) -> None:
        """Remember the grants the outbox was last told to store that are not in force now (a cache that no longer
        verifies, an expiry while off): none of their rows is published from now on (the outbox's own list of
        active grants changes only when the disk takes it), and each ends in an erasure receipt even if it left no
        key or row, so the cloud hears of every grant that stopped. Remembered until erased
        (:meth:`_erase_unlisted`)."""
        active = {g.id for g in self.active_grants()}
        try:
            listed = self.outbox.active_grants()
        except (StorageError, sqlite3.Error):  # unreadable now: settle_disk, retried until done, reads it again
            listed = set()
        self._unlisted = (self._unlisted | listed) - active

    def _finish_begun(self, active: set[str]) -> None:
        """Erasures a process began and never receipted (killed between deleting and queueing the receipt: the
        outbox's ledger, vgw.state.outbox.erasure): finished now, the receipt counting every batch they deleted."""
        waiting = {p.grant for p in self.store.pending_erasures() if p.reason != NARROWED}
        for begun in self.outbox.erasures_begun():
            gid = begun.grant_id
            if gid in waiting:  # its receipt waits in the pending erasures already (finish_pending_erasures)
                self.outbox.end_erasure(gid)
                continue
            reason = begun.reason or ("expired" if self.expired else "not-in-force")
            if gid in active:
                # Granted again since: its new key and rows are not what was erased; only the receipt is owed.
                done = Erasure(gid, begun.batches_deleted,
                               key_destroyed=self.outbox.finish_erasure(gid, wait_s=ERASE_WAIT_S))
                self._erase(gid, reason=reason, ver=begun.ver, done=done)
            else:
                self._erase(gid, reason=reason, ver=begun.ver)
            self._unlisted.discard(gid)

    def _erase_unlisted(self, *, keep: set[str] | frozenset[str], also: set[str] | frozenset[str] = frozenset()
                        ) -> None:
        """Erase (with receipts) the remembered grants not in force that ``keep`` does not grant, and ``also``."""
        for gid in sorted((self._unlisted - set(keep)) | set(also)):
            self._erase(gid, reason=ErasureReason.EXPIRED if self.expired else ErasureReason.NOT_IN_FORCE)
            self._unlisted.discard(gid)

    def _withhold(self, grant_ids: frozenset[str]) -> None:
        """Stop publishing and storing ``grant_ids`` (memory only), and every grant the outbox still lists as active
        that is not active here: its list changes only when the disk takes it, so after a damaged cache, or while a
        document waits for the disk, it may name grants nothing in force grants any more."""
        active = {g.id for g in self.active_grants()}
        try:
            listed = self.outbox.active_grants()
        except Exception:
            listed = set()
        self.outbox.withhold(frozenset(grant_ids) | frozenset((self._unlisted | listed) - active))

    def _resume_pending(self) -> ApplyResult | None:
        """A document a previous run left pending (its record survived in the reserved file): take it up again,
        memory part first, so the cached older document never puts a grant it stopped back in force."""
        try:
            raw = self.store.read_pending_apply()
        except StorageError as exc:
            log.error("pending consent record unreadable (%s): ignored", exc)
            return None
        if raw is None:
            return None
        try:
            doc = read_record(raw)
            # Re-verified like the cache (signature, subject, claims; validity judged at its iat): the record is
            # ours, but a file is never trusted for what a signature can prove.
            consent = verify_consent(doc["token"], trust_keys=self.trust_keys, device=self.device,
                                     now=float(_claim_int(doc["token"], "iat")))
            p = from_record(doc, consent)
        except (ConsentError, ValueError, TypeError, KeyError, IndexError) as exc:
            log.error("pending consent record does not verify (%s): ignored", type(exc).__name__)
            self._audit("consent-pending-invalid")
            return None
        if self.in_force is not None and self.in_force.ver > consent.ver:
            try:  # a newer document is in force already: the record was left behind
                self.store.clear_pending_apply()
            except StorageError:
                pass
            return None
        self.pending = p
        self.store.note_version(consent.ver)
        self._withhold(p.stopped)
        log.warning("%s was pending when the agent stopped: grant(s) %s stay stopped; finishing it",
                    version_text(consent.ver), ", ".join(sorted(p.stopped)) or "none")
        return self._finish(p)

    def _read_cache(self, *, audit: bool) -> tuple[Consent | None, bool]:
        cached = read_cached(self.store, self.trust_keys, self.device)
        if cached.problem is not None and audit:
            extra = {"ver": cached.problem_ver} if cached.problem_ver is not None else {}
            self._audit("consent-cache-invalid", reason=cached.problem, **extra)
        return cached.consent, cached.expired

    # -- applying a new document --------------------------------------------------------------------

    def verify(self, token: str | bytes) -> Consent:
        """Verify against the consent in force at the device's now, without applying. Raises ConsentError."""
        now = self.store.now()
        try:
            consent = verify_consent(token, trust_keys=self.trust_keys, device=self.device, now=now,
                                     in_force=self.in_force, floor_ver=self.store.max_ver)
        except ConsentError:
            raise
        except Exception as exc:
            # Any other failure inside a parser is still a malformed document: reject it whole, keep the
            # consent in force (a crash here would be a remote denial of service).
            raise MalformedError(f"consent rejected: unreadable document ({type(exc).__name__})") from exc
        # A document applied in memory binds like the one in force: the same version with other content, or an
        # older one, is refused (the pending one's version is in the floor already).
        for waiting in self._waiting():
            if consent.ver == waiting.ver and consent.digest != waiting.digest:
                raise VersionConflictError(f"consent v{consent.ver} rejected: same version as the one being "
                                           "applied with different content", consent.ver)
        return consent

    def apply(self, token: str | bytes, *, source: str, skipped: Sequence[tuple[int, frozenset[str]]] = ()
              ) -> ApplyResult:
        """Verify ``token``; on success make it the consent in force and revoke the grants it drops.

        ``skipped``: (ver, grant ids) of verified versions that a newer one superseded before they could be
        applied (vgw.state.consent.intake). A grant in force that one of them, between the version in force and
        this one, withdrew was revoked meanwhile even if this version grants it again: it is erased (receipt
        with that version) and starts afresh, so a burst never loses a revocation.

        Memory first, then disk (docs/guarantees.md "Revocation wins every race"): the grants it stops end at
        once; if the disk part fails (a full or read-only disk) the document is *pending*, not consumed: it
        stays stopped in memory, its record survives a restart, and :meth:`retry_pending` finishes it.
        """
        try:
            consent = self.verify(token)
        except ConsentError as exc:
            self.reject(exc, source=source, token=token)
            return ApplyResult("rejected", self.in_force, error=exc)
        if consent is self.in_force:
            return ApplyResult("duplicate", consent)
        p = self.pending
        if p is not None and consent.digest == p.consent.digest:
            return self._finish(p)  # the pending document again (a retained re-delivery): try its disk part
        if p is not None:
            # A newer document while one is pending: that one's disk part first; if it still cannot be done, the
            # newer one is held, stopped in memory too, and applied right after.
            if self._finish(p).status == "pending":
                self._hold(consent, source, skipped)
                return ApplyResult("pending", consent)
            return self.apply(token, source=source, skipped=skipped)

        old = self.in_force
        old_grants = self.active_grants()
        old_active = {g.id for g in old_grants}
        new_ids = consent.grant_ids
        skipped_revoked: dict[str, int] = {}  # grant -> the skipped version that revoked it
        for ver, ids in sorted(skipped):
            if (old is None or ver > old.ver) and ver < consent.ver:
                for gid in (old_active & new_ids) - ids:
                    skipped_revoked.setdefault(gid, ver)
        revoked = frozenset(old_active - new_ids) | frozenset(skipped_revoked)
        p = PendingApply(consent=consent, source=source, since=self.store.now(),
                         previous_ver=old.ver if old else None, previous_digest=old.digest if old else None,
                         revoked=revoked, regrant=skipped_revoked,
                         stopped=revoked | self._stopped_by(consent))
        self._previous_grants = old_grants
        # 1. Memory: stop collecting the revoked grants at once (their in-memory batches go), stop publishing and
        #    storing every grant it stops or changes, and let its version bind. None of this can fail.
        self.pending = p
        self.store.note_version(consent.ver)
        if revoked and self.on_revoke is not None:
            self.on_revoke(revoked)
        self._withhold(p.stopped)
        # 2. Its record, in place in reserved space, before anything on disk changes: a restart takes it up.
        self._journal(p)
        # 3. Disk (vgw.state.consent.pending): terms, erasures, cache, receipts.
        return self._finish(p)

    def _stopped_by(self, consent: Consent) -> frozenset[str]:
        """Grants collected now that ``consent`` revokes or changes."""
        kept = {g.id: g for g in consent.grants}
        return frozenset(g.id for g in self.active_grants() if kept.get(g.id) != g)

    def _hold(self, consent: Consent, source: str, skipped: Sequence[tuple[int, frozenset[str]]]) -> None:
        """Keep ``consent`` behind the pending document: stopped in memory now, applied once that one is done.
        A document held before it is superseded (its revocations are carried as a skipped version's)."""
        held = self._held
        carried = list(skipped) + ([(held[0].ver, held[0].grant_ids), *held[2]] if held else [])
        before = {g.id for g in self.active_grants()}
        self._held = (consent, source, carried)
        stopped = frozenset(before - {g.id for g in self.active_grants()})
        if stopped and self.on_revoke is not None:
            self.on_revoke(stopped)
        self._withhold((self.pending.stopped if self.pending else frozenset()) | stopped | self._held_stops())

    def _journal(self, p: PendingApply) -> None:
        """Write the pending document's record (in place: works on a full disk once the space is reserved)."""
        if not self.store.pending_apply.path.exists():
            return  # no room was reserved (said once, when the agent started)
        try:
            self.store.write_pending_apply(p.to_json())
        except StorageError as exc:
            if self._journal_warned == p.consent.ver:
                return  # said once per document (a read-only disk would say it every retry)
            self._journal_warned = p.consent.ver
            log.warning("pending %s not recorded (%s): a restart before it is applied would not know it",
                        version_text(p.consent.ver), exc)

    def retry_pending(self) -> ApplyResult | None:
        """Try the pending document's disk part again (then the one held behind it). None: nothing pending."""
        return self._finish(self.pending) if self.pending is not None else None

    def _finish(self, p: PendingApply) -> ApplyResult:
        """The disk part of ``p``; once done, the document held behind it is applied (its result is returned)."""
        result = self._finish_one(p)
        if result.status != "pending" and self._held is not None:
            consent, source, skipped = self._held
            self._held = None
            return self.apply(consent.token, source=source, skipped=skipped)
        return result

    def _finish_one(self, p: PendingApply) -> ApplyResult:
        """The disk part of ``p``, resumed where it stopped. A StorageError leaves it pending (logged once)."""
        try:
            result = self._disk_part(p)
        except StorageError as exc:
            first = p.error is None
            p.error = str(exc).splitlines()[0][:300]
            self._journal(p)  # the steps done so far: a restart resumes after them
            if first:
                log.error("%s applied in memory only: grant(s) %s stopped; not yet on disk (%s); retried "
                          "until it is", version_text(p.consent.ver), ", ".join(sorted(p.stopped)) or "none", p.error)
                self._audit("consent-pending", ver=p.consent.ver, grants_stopped=sorted(p.stopped))
                if self.on_change is not None:
                    self.on_change()
            return ApplyResult("pending", p.consent)
        if p.error is not None:
            log.warning("%s now applied on disk too", version_text(p.consent.ver))
        return result

    def _disk_part(self, p: PendingApply) -> ApplyResult:
        consent = p.consent
        # 0. Grants that stopped when the cache failed (nothing was in force) and that this document does not grant:
        #    erased with their receipts before its terms replace the outbox's list of active grants, the last
        #    record of them. Left for later, a document held behind this one could grant one again first, and its
        #    stop would never be receipted.
        self._erase_unlisted(keep=consent.grant_ids)
        # a. The new terms, and the deletion of what they withdraw from stored batches: one outbox transaction
        #    (README "Narrowing applies to stored data").
        if p.narrowed is None:
            previous = self._previous_grants
            if previous is None:  # taken up after a restart: the cache still holds the document it replaces
                in_force = self.in_force
                previous = in_force.grants if in_force is not None and in_force.digest == p.previous_digest else ()
            p.narrowed = [_withdrawal_record(w) for w in self.outbox.apply_terms(
                _terms(consent.grants, previous=previous), ver=consent.ver)]
            if p.narrowed:  # what was withdrawn must still be receipted after a restart
                self._journal(p)
        # b. Wipe what was revoked (key first, then rows) before anything else can fail.
        for gid in sorted(p.revoked):
            if gid not in p.wiped:
                e = self.outbox.erase_grant(gid, reason=ErasureReason.REVOKED, ver=p.regrant.get(gid, consent.ver))
                p.wiped[gid] = (e.batches_deleted, e.key_destroyed)
                self._journal(p)
        if p.regrant and not p.regranted:  # erasure deactivated them; this version grants them anew
            self.outbox.apply_terms(_terms(consent.grants, previous=consent.grants), ver=consent.ver)
            p.regranted = True
        # c. Cache the document (atomic), raise the clock floor to its iat and store its version.
        if not p.cached:
            self.store.write_token(consent.token)
            self.store.raise_floor(consent.iat)
            self.store.record_version(consent.ver)
            p.cached = True
            self._journal(p)
        if self.in_force is not consent:
            self.in_force = consent
            self.expired = False
            self._withhold(self._held_stops())
            if self.on_change is not None:
                self.on_change()
        # d. Audit and receipts, each once; an erasure's only now that memory, rows and key are gone.
        if "applied" not in p.recorded:
            entry = self._audit("consent-applied", ver=consent.ver, source=p.source,
                                grants=[{"id": g.id, "scopes": list(g.scopes), "controller": g.controller,
                                         "purpose": g.purpose, "retention_s": g.retention_s}
                                        for g in consent.grants],
                                iat=consent.iat, exp=consent.exp, previous=p.previous_ver)
            self.outbox.queue_receipt(self._sign(ReceiptType.CONSENT_APPLIED, entry, ver=consent.ver))
            p.recorded.add("applied")
            log.info("%s applied from %s: %d grant(s)", version_text(consent.ver), p.source, len(consent.grants))
        erasures = []
        for gid in sorted(p.revoked):
            batches, destroyed = p.wiped[gid]
            done = Erasure(gid, batches, destroyed)
            if f"erasure:{gid}" not in p.recorded:
                self._erase(gid, reason=ErasureReason.REVOKED, ver=p.regrant.get(gid, consent.ver), done=done)
                p.recorded.add(f"erasure:{gid}")
            erasures.append(done)
        narrowed = [_withdrawal(d) for d in p.narrowed or []]
        for w in narrowed:
            if f"narrowed:{w.grant_id}" not in p.recorded:
                self._withdrawn(w, ver=consent.ver)
                p.recorded.add(f"narrowed:{w.grant_id}")
        try:
            self.store.clear_pending_apply()
        except StorageError as exc:  # all is done; a left record is finished again at the next start (no-op)
            log.warning("pending consent record not cleared: %s", exc)
        self.pending = None
        self._previous_grants = None
        return ApplyResult("applied", consent, revoked=erasures, narrowed=narrowed)

    def _held_stops(self) -> frozenset[str]:
        """What the document held behind the pending one keeps stopped once the pending one is in force."""
        if self._held is None:
            return frozenset()
        kept = {g.id: g for g in self._held[0].grants}
        return frozenset(g.id for g in (self.in_force.grants if self.in_force else ()) if kept.get(g.id) != g)

    def reject(self, exc: ConsentError, *, source: str, token: str | bytes | None = None, count: int = 1) -> None:
        """Record ``count`` rejected documents of one reason: audit entry and ``consent-rejected`` receipt, the
        same document again counted only, a flood coalesced (vgw.state.consent.rejections)."""
        self._rejections.reject(exc, source=source, token=token, count=count)

    def flush_rejections(self, *, force: bool = False) -> None:
        """Write the summed entry and receipt of every reason whose coalescing interval is over (or all)."""
        self._rejections.flush(force=force)

    @property
    def repeated_rejections(self) -> int:
        return self._rejections.repeated

    @property
    def coalesced_rejections(self) -> int:
        return self._rejections.coalesced

    def _record_rejection(self, exc: ConsentError, ver: int | None, source: str, count: int) -> None:
        claims: dict[str, object] = {"reason": exc.reason, "detail": str(exc)[:300]}
        fields: dict[str, object] = {"source": source, "reason": exc.reason, "ver": ver, "detail": str(exc)[:300]}
        if ver is not None:
            claims["ver"] = ver
        if count > 1:  # one entry standing for several documents (the last one's ver and detail)
            claims["count"] = fields["count"] = count
        entry = self._audit("consent-rejected", **fields)
        self.outbox.queue_receipt(self._sign(ReceiptType.CONSENT_REJECTED, entry, **claims))

    def _sign(self, typ: ReceiptType, entry: dict[str, object], **claims: object) -> str:
        return self.signer.sign(typ, audit=_audit_anchor(entry), **claims)

    # -- expiry -------------------------------------------------------------------------------------

    def check_expiry(self) -> list[Erasure]:
        """Stop every grant when the document in force expires (as if revoked). Returns the erasures."""
        if self.in_force is None or self.expired or self.pending is not None:
            return []  # a pending document is judged once it is in force
        if self.store.now() < self.in_force.exp:
            return []
        self.expired = True
        # Persist the time that made it expire before anything else: after a crash and a clock rolled
        # back, the floor still says "expired" and the grant cannot come back to life.
        self.store.persist()
        ids = frozenset(g.id for g in self.in_force.grants)
        if ids and self.on_revoke is not None:
            self.on_revoke(ids)
        self.outbox.set_active_grants(set())
        self._audit("consent-expired", ver=self.in_force.ver, exp=self.in_force.exp)
        log.info("%s expired: every grant stops", version_text(self.in_force.ver))
        if self.on_change is not None:
            self.on_change()
        return [self._erase(gid, reason=ErasureReason.EXPIRED, ver=self.in_force.ver) for gid in sorted(ids)]

    # -- erasure ------------------------------------------------------------------------------------

    def erase(self, grant_id: str, *, reason: str, ver: int | None = None) -> Erasure:
        """Erase a grant for ``reason`` (e.g. ``uninstall``) exactly as a revocation does: the outbox's one erasure
        routine, the audit entries, and the signed receipt built from what it found (or a pending erasure)."""
        return self._erase(grant_id, reason=reason, ver=ver)

    def _erase(self, grant_id: str, *, reason: str, ver: int | None = None, done: Erasure | None = None) -> Erasure:
        if ver is None:
            ver = self.in_force.ver if self.in_force else 0
        # The data go first: a failing audit log must never leave a revoked grant's key or rows behind.
        erasure = done if done is not None else self.outbox.erase_grant(grant_id, reason=reason, ver=ver)
        self._audit("grant-stopped", grant=grant_id, reason=reason, ver=ver)
        if not erasure.key_destroyed:
            # Key and rows are deleted, but a copy is still in the outbox's files (another process holds a read
            # snapshot, so the WAL cannot be checkpointed). No receipt may say the data are gone yet
            # (README "Receipts"): the erasure is recorded as pending (on disk, so a restart finishes it too) and its
            # receipt is sent by finish_pending_erasures once no copy is found.
            self._audit("erasure-pending", grant=grant_id, batches_deleted=erasure.batches_deleted, reason=reason,
                        why="outbox-busy")
            self.store.add_pending_erasure(PendingErasure(grant_id, ver, reason, erasure.batches_deleted,
                                                          since=self.store.now()))
            try:  # the pending erasure carries it from here (its count included)
                self.outbox.end_erasure(grant_id)
            except StorageError as exc:  # left in the ledger: the next start sees it pending and drops it there
                log.warning("erasure of grant %s stays in the outbox's ledger: %s", grant_id, exc)
            return erasure
        self._receipt_erasure(grant_id, ver=ver, reason=reason, batches_deleted=erasure.batches_deleted, ends=True)
        return erasure

    def _receipt_erasure(self, grant_id: str, *, ver: int, reason: str, batches_deleted: int,
                         ends: bool = False) -> None:
        """Audit and queue the erasure receipt; ``ends``: it also takes the erasure out of the outbox's ledger of
        erasures begun (in the same transaction)."""
        self._audit("key-destroyed", grant=grant_id)
        entry = self._audit("erasure-done", grant=grant_id, batches_deleted=batches_deleted, reason=reason)
        # Only now, with memory, rows and key gone and no copy found in any file, is the receipt signed and
        # queued (README "Receipts").
        self.outbox.queue_receipt(self._sign(ReceiptType.ERASURE, entry, grant=grant_id, ver=ver,
                                             batches_deleted=batches_deleted, key_destroyed=True,
                                             reason=reason), ends_erasure=grant_id if ends else None)
        log.info("grant %s %s: %d batch(es) deleted, data key destroyed", grant_id, reason, batches_deleted)

    def finish_pending_erasures(self, *, wait_s: float = 0.0) -> list[Erasure]:
        """Retry the erasures not yet verified; send the receipt of each that is now verified. Returns those."""
        done = []
        for p in self.store.pending_erasures():
            gid = p.grant
            if not self.outbox.finish_erasure(gid, wait_s=wait_s):
                continue
            if p.reason == NARROWED:
                self._audit("key-destroyed", grant=gid, reason=NARROWED)
                self._receipt_narrowed(gid, ver=p.ver, kinds=list(p.narrowing), scopes=list(p.scopes),
                                       batches_deleted=p.batches_deleted, samples_deleted=p.samples_deleted)
            else:
                self._receipt_erasure(gid, ver=p.ver, reason=p.reason, batches_deleted=p.batches_deleted)
            self.store.remove_pending_erasure(p)
            done.append(Erasure(gid, p.batches_deleted, key_destroyed=True))
        return done

    def _withdrawn(self, w: Withdrawal, *, ver: int) -> None:
        """Audit and receipt stored batches a narrowed grant withdrew (README "Narrowing applies to stored data" and
        "Receipts").

        The receipt is an ``erasure`` with the claims of README "Receipts" (``batches_deleted``; ``key_destroyed``:
        the data key that sealed them was replaced and no copy of it or of a deleted batch is found in the
        outbox's files; until then the receipt waits, as an erasure's does) plus ``reason`` = ``narrowed``,
        ``narrowing`` (the kinds), ``scopes`` (the scopes withdrawn, names only) and ``samples_deleted``
        (still-permitted samples of mixed batches
        included). The grant itself stays in force.
        """
        kinds = sorted(str(k) for k in w.kinds)
        entry = self._audit("grant-narrowed", grant=w.grant_id, ver=ver, narrowing=kinds, scopes=sorted(w.scopes),
                            batches_deleted=w.batches_deleted, samples_deleted=w.samples_deleted,
                            key_destroyed=w.key_destroyed)
        log.info("grant %s narrowed (%s): %d stored batch(es) with withdrawn data deleted", w.grant_id,
                 ", ".join(kinds), w.batches_deleted)
        if w.pending:
            # Key replaced and rows deleted, but a copy is still in the outbox's files: as for a revocation, no
            # receipt until the raw bytes are clean (finish_pending_erasures), never a false key_destroyed.
            self._audit("erasure-pending", grant=w.grant_id, batches_deleted=w.batches_deleted, reason=NARROWED,
                        why="outbox-busy")
            self.store.add_pending_erasure(PendingErasure(
                w.grant_id, ver, NARROWED, w.batches_deleted, since=self.store.now(), narrowing=tuple(kinds),
                scopes=tuple(sorted(w.scopes)), samples_deleted=w.samples_deleted))
            return
        self._receipt_narrowed(w.grant_id, ver=ver, kinds=kinds, scopes=sorted(w.scopes),
                               batches_deleted=w.batches_deleted, samples_deleted=w.samples_deleted,
                               key_destroyed=w.key_destroyed, entry=entry)

    def _receipt_narrowed(self, grant_id: str, *, ver: int, kinds: list[str], scopes: list[str], batches_deleted: int,
                          samples_deleted: int, key_destroyed: bool = True,
                          entry: dict[str, object] | None = None) -> None:
        if entry is None:
            entry = self._audit("erasure-done", grant=grant_id, batches_deleted=batches_deleted, reason=NARROWED)
        self.outbox.queue_receipt(self._sign(ReceiptType.ERASURE, entry, grant=grant_id, ver=ver,
                                             batches_deleted=batches_deleted, key_destroyed=key_destroyed,
                                             reason=NARROWED, narrowing=kinds, scopes=scopes,
                                             samples_deleted=samples_deleted))

    def _audit(self, event: str, **fields: object) -> dict[str, object]:
        """Append to the audit log; a failing log is reported but never stops an erasure or a decision."""
        try:
            return self.audit.append(event, **fields)
        except StorageError as exc:
            log.error("audit entry %s not written: %s", event, exc)
            return {"n": None, "hash": None}


def _withdrawal_record(w: Withdrawal) -> dict[str, object]:
    """A withdrawal as the pending record keeps it (vgw.state.consent.pending: ids, kinds, counts)."""
    return {"grant": w.grant_id, "kinds": sorted(str(k) for k in w.kinds), "scopes": sorted(w.scopes),
            "batches_deleted": w.batches_deleted, "samples_deleted": w.samples_deleted,
            "key_destroyed": w.key_destroyed, "pending": w.pending}


def _withdrawal(d: dict[str, Any]) -> Withdrawal:
    return Withdrawal(str(d["grant"]), frozenset(NarrowingKind(k) for k in d["kinds"]),
                      frozenset(str(x) for x in d["scopes"]), int(d["batches_deleted"]), int(d["samples_deleted"]),
                      bool(d["key_destroyed"]), bool(d.get("pending", False)))


def _terms(grants: Sequence[Grant], *, previous: Sequence[Grant]) -> dict[str, GrantTerms]:
    """The outbox's view of ``grants``, each with what it withdraws compared with ``previous``."""
    before = {g.id: g for g in previous}
    out: dict[str, GrantTerms] = {}
    for g in grants:
        old = before.get(g.id)
        if old is None or old == g:
            out[g.id] = GrantTerms(terms_digest(g), frozenset(g.scopes))
        else:
            out[g.id] = GrantTerms(terms_digest(g), frozenset(g.scopes), narrowing(old, g), terms_digest(old))
    return out


def _audit_anchor(entry: dict[str, object]) -> dict[str, object]:
    """The audit head a receipt carries: the cloud holds a signed copy of the chain's position and hash, so
    cutting entries off the end of the log on the device (which a hash chain alone cannot reveal) shows."""
    return {"n": entry.get("n"), "hash": entry.get("hash")}


def _claim_int(token: str, name: str) -> int:
    import base64
    import json

    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    value = claims[name]
    if type(value) is not int:
        raise ValueError(name)
    return value
