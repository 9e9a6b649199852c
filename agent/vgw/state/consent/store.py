"""The consent cache and the device's monotonic notion of now, in the state directory.

``consent.jws``  the document in force (re-verified on every load, so the agent enforces offline and after
                 reboot, and a tampered cache is worthless).
``clock.json``   ``floor``: the newest ``iat`` accepted and the latest wall-clock time the agent saw. The
                 agent's now is ``max(time.time(), floor)``: a clock rolled back (flat RTC battery, attacker)
                 cannot revive an expired grant or make an old document acceptable again.
``consent.pending``  space reserved when the agent starts (vgw.base.fsutil.ReservedRecord): the document applied in
                 memory whose disk part waits (vgw.state.consent.pending), rewritten in place, so even a full disk
                 keeps it across a restart.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vgw.base.errors import StorageError
from vgw.base.fsutil import MAX_STATE_BYTES, ReservedRecord, atomic_write, read_state_file
from vgw.base.timefmt import valid_time

CONSENT_FILE = "consent.jws"
INBOX_FILE = "consent.inbox.jws"  # `vgw consent apply` hands a document to the running agent here
CLOCK_FILE = "clock.json"
PENDING_ERASURES_FILE = "erasures.pending.json"  # erasures done in SQL but not yet verified gone from the files
PENDING_APPLY_FILE = "consent.pending"  # a document applied in memory whose disk part waits (vgw.state.consent.pending)
PENDING_APPLY_SLOT_BYTES = 128 * 1024  # a document (at most 64 KiB) and the progress of its disk part


@dataclass(frozen=True, slots=True)
class PendingErasure:
    """An erasure whose receipt waits until no copy of the grant is found in the outbox's files (no personal
    data: grant id, version, reason, count)."""

    grant: str
    ver: int
    reason: str
    batches_deleted: int
    since: float | None = None  # when it became pending (None: recorded by an earlier version)
    # reason "narrowed" (the grant stays in force): the claims its receipt adds (README "Receipts")
    narrowing: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    samples_deleted: int = 0

    @property
    def key(self) -> tuple[str, str, int]:
        """One pending erasure per grant, reason and version: a narrowing and a later revocation of the same
        grant each keep their own receipt."""
        return (self.grant, self.reason, self.ver)


class ConsentStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.consent_path = state_dir / CONSENT_FILE
        self.inbox_path = state_dir / INBOX_FILE
        self.clock_path = state_dir / CLOCK_FILE
        self.pending_path = state_dir / PENDING_ERASURES_FILE
        self.pending_apply = ReservedRecord(state_dir / PENDING_APPLY_FILE, slot_bytes=PENDING_APPLY_SLOT_BYTES)
        self._floor, self._max_ver = self._read_clock()

    # -- the document -------------------------------------------------------------------------------

    def read_token(self) -> str | None:
        try:
            return _read_state(self.consent_path, "cached consent").decode("ascii").strip() or None
        except FileNotFoundError:
            return None
        except StorageError:
            raise
        except (OSError, UnicodeDecodeError) as exc:
            raise StorageError(f"{self.consent_path}: cannot read cached consent: {exc}") from exc

    def write_token(self, token: str) -> None:
        atomic_write(self.consent_path, token.encode("ascii") + b"\n", mode=0o600)

    # -- the hand-over inbox (only the running agent reads and removes it) ---------------------------

    def write_inbox(self, token: str) -> None:
        atomic_write(self.inbox_path, token.encode("ascii") + b"\n", mode=0o600)

    def read_inbox(self) -> str | None:
        try:
            return _read_state(self.inbox_path, "consent inbox").decode("ascii").strip() or None
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, StorageError):
            return "\x00unreadable"  # still handed to the verifier, which rejects it as malformed

    def clear_inbox(self) -> None:
        try:
            self.inbox_path.unlink()
        except FileNotFoundError:
            pass

    # -- a document whose disk part waits (written in place: a full disk cannot stop it) ----------------

    def read_pending_apply(self) -> bytes | None:
        """The pending document's record (vgw.state.consent.pending), or None. Reads only."""
        return self.pending_apply.read()

    def write_pending_apply(self, record: bytes) -> None:
        self.pending_apply.write(record)

    def clear_pending_apply(self) -> None:
        if self.pending_apply.path.exists():
            self.pending_apply.write(b"")

    # -- erasures waiting for their receipt ---------------------------------------------------------

    def pending_erasures(self) -> list[PendingErasure]:
        """The pending erasures, oldest first. Raises StorageError if the file cannot be read: a pending
        erasure must never be forgotten silently."""
        try:
            doc = json.loads(_read_state(self.pending_path, "pending erasures"))
            return [PendingErasure(str(e["grant"]), int(e["ver"]), str(e["reason"]), int(e["batches_deleted"]),
                                   since=None if e.get("since") is None else float(e["since"]),
                                   narrowing=tuple(str(k) for k in e.get("narrowing", ())),
                                   scopes=tuple(str(k) for k in e.get("scopes", ())),
                                   samples_deleted=int(e.get("samples_deleted", 0)))
                    for e in doc]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError, KeyError) as exc:
            raise StorageError(f"{self.pending_path}: unreadable pending erasures: {exc}") from exc

    def add_pending_erasure(self, entry: PendingErasure) -> None:
        items = [p for p in self.pending_erasures() if p.key != entry.key]
        items.append(entry)
        self._write_pending(items)

    def remove_pending_erasure(self, entry: PendingErasure) -> None:
        items = self.pending_erasures()
        left = [p for p in items if p.key != entry.key]
        if len(left) != len(items):
            self._write_pending(left)

    def _write_pending(self, items: list[PendingErasure]) -> None:
        if not items:
            try:
                self.pending_path.unlink()
            except FileNotFoundError:
                pass
            return
        atomic_write(self.pending_path, json.dumps([asdict(p) for p in items]).encode(), mode=0o600)

    # -- the clock ----------------------------------------------------------------------------------

    def _read_clock(self) -> tuple[float, int]:
        try:
            doc = json.loads(_read_state(self.clock_path, "clock file"))
            floor, max_ver = float(doc.get("floor", 0.0)), int(doc.get("max_ver", 0))
        except FileNotFoundError:
            return 0.0, 0
        except (OSError, ValueError, TypeError, AttributeError, OverflowError, StorageError):
            return 0.0, 0  # a corrupt clock file only loses rollback protection back to wall time
        # NaN or a time no calendar has is corrupt too: a NaN now never compares, so nothing would expire.
        return (floor if valid_time(floor) else 0.0), max_ver

    def _read_floor(self) -> float:
        return self._read_clock()[0]

    @property
    def max_ver(self) -> int:
        """The highest consent version ever applied here: a cached document below it is a rollback."""
        return max(self._max_ver, self._read_clock()[1])

    def record_version(self, ver: int) -> None:
        self.note_version(ver)
        self.persist()

    def note_version(self, ver: int) -> None:
        """Raise the version floor in memory (a document applied in memory binds before it is on disk)."""
        if ver > self._max_ver:
            self._max_ver = ver

    @property
    def floor(self) -> float:
        return self._floor

    def now(self) -> float:
        """The device's notion of now: wall time, never earlier than anything seen before."""
        wall = time.time()
        if wall > self._floor:
            self._floor = wall
        return self._floor

    def raise_floor(self, t: float, *, persist: bool = True) -> None:
        if t > self._floor:
            self._floor = t
        if persist:
            self.persist()

    def persist(self) -> None:
        """Write the floor and the highest version applied (atomically)."""
        current = max(self._floor, self._read_floor())  # another vgw process may have raised it
        self._floor = current
        self._max_ver = max(self._max_ver, self._read_clock()[1])
        atomic_write(self.clock_path, json.dumps({"floor": current, "max_ver": self._max_ver}).encode(), mode=0o600)


def _read_state(path: Path, what: str) -> bytes:
    """A state file: regular, ours, capped, and never through a symlink (docs/guarantees.md)."""
    return read_state_file(path, what=what, max_bytes=MAX_STATE_BYTES)
