"""The consent cache and the device's monotonic notion of now, in the state directory.

``consent.jws``  the document in force (re-verified on every load, so the agent enforces offline and after
                 reboot, and a tampered cache is worthless).
``clock.json``   ``floor``: the newest ``iat`` accepted and the latest wall-clock time the agent saw. The
                 agent's now is ``max(time.time(), floor)``: a clock rolled back (flat RTC battery, attacker)
                 cannot revive an expired grant or make an old document acceptable again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.errors import StorageError
from agent.fsutil import atomic_write
from agent.timefmt import valid_time

CONSENT_FILE = "consent.jws"
INBOX_FILE = "consent.inbox.jws"  # `vgw consent apply` hands a document to the running agent here
CLOCK_FILE = "clock.json"


class ConsentStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.consent_path = state_dir / CONSENT_FILE
        self.inbox_path = state_dir / INBOX_FILE
        self.clock_path = state_dir / CLOCK_FILE
        self._floor, self._max_ver = self._read_clock()
        self._persisted_floor = self._floor

    # -- the document -------------------------------------------------------------------------------

    def read_token(self) -> str | None:
        try:
            return self.consent_path.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StorageError(f"{self.consent_path}: cannot read cached consent: {exc}") from exc

    def write_token(self, token: str) -> None:
        atomic_write(self.consent_path, token.encode("ascii") + b"\n", mode=0o600)

    # -- the hand-over inbox (only the running agent reads and removes it) ---------------------------

    def write_inbox(self, token: str) -> None:
        atomic_write(self.inbox_path, token.encode("ascii") + b"\n", mode=0o600)

    def read_inbox(self) -> str | None:
        try:
            return self.inbox_path.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return "\x00unreadable"  # still handed to the verifier, which rejects it as malformed

    def clear_inbox(self) -> None:
        try:
            self.inbox_path.unlink()
        except FileNotFoundError:
            pass

    # -- the clock ----------------------------------------------------------------------------------

    def _read_clock(self) -> tuple[float, int]:
        try:
            doc = json.loads(self.clock_path.read_text(encoding="utf-8"))
            floor, max_ver = float(doc.get("floor", 0.0)), int(doc.get("max_ver", 0))
        except FileNotFoundError:
            return 0.0, 0
        except (OSError, ValueError, TypeError, AttributeError, OverflowError):
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
        if ver > self._max_ver:
            self._max_ver = ver
        self.persist()

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

    def persist(self, *, min_step_s: float = 0.0) -> None:
        """Write the floor if it moved by at least ``min_step_s`` since the last write."""
        current = max(self._floor, self._read_floor())  # another vgw process may have raised it
        self._floor = current
        if current - self._persisted_floor < min_step_s and self.clock_path.exists():
            return
        self._max_ver = max(self._max_ver, self._read_clock()[1])
        atomic_write(self.clock_path, json.dumps({"floor": current, "max_ver": self._max_ver}).encode(), mode=0o600)
        self._persisted_floor = current
