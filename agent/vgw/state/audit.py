"""The hash-chained audit log: append-only JSON lines in the state directory.

Each entry holds ``prev`` (the hash of the entry before it, 64 zeros for the first) and ``hash``
(SHA-256 over the entry's canonical JSON without ``hash``). Editing, removing or reordering any entry
breaks the chain from that point, which :func:`verify` reports. Entries hold events, grant ids, scopes,
versions, counts and reasons, never personal data (no VIN, location or signal value).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgw.base.errors import StorageError
from vgw.base.fsutil import MAX_AUDIT_BYTES, open_state_file, read_small_file, read_state_file

GENESIS = "0" * 64
AUDIT_FILE = "audit.log"


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad: int | None = None  # 1-based line number of the first broken link
    reason: str = ""


class AuditLog:
    """Appends entries; safe across threads and across processes (O_APPEND + flock-free tail read).

    ``file``: read a copy given on the command line instead of the state directory's log (any readable regular
    file, links followed, the same size cap); such a log is only read.
    """

    def __init__(self, state_dir: Path, *, file: Path | None = None) -> None:
        self.path = file if file is not None else state_dir / AUDIT_FILE
        self._copy = file is not None
        self._lock = threading.Lock()

    def _last_hash(self) -> tuple[int, str]:
        try:
            with os.fdopen(open_state_file(self.path, what="audit log"), "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                if size == 0:
                    return 0, GENESIS
                # Read backwards until the start of the last complete line, however long it is.
                end = size
                fh.seek(end - 1)
                if fh.read(1) == b"\n":
                    end -= 1
                start, chunk = end, b""
                while start > 0 and b"\n" not in chunk:
                    step = min(start, 65536)
                    start -= step
                    fh.seek(start)
                    chunk = fh.read(step) + chunk
                fh.seek(start)
                tail = fh.read(end - start)
            last = json.loads(tail.rsplit(b"\n", 1)[-1])
            return int(last["n"]), str(last["hash"])
        except FileNotFoundError:
            return 0, GENESIS
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise StorageError(f"{self.path}: last audit entry unreadable; run `vgw audit verify`") from exc

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        import fcntl

        with self._lock:
            try:
                # Never through a planted link; created 0600 before its first byte (docs/guarantees.md).
                fd = open_state_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what="audit log")
            except FileNotFoundError as exc:  # the state directory went away
                raise StorageError(f"{self.path}: cannot open audit log: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # another vgw process (consent apply) may append too
                n, prev = self._last_hash()
                entry: dict[str, Any] = {"n": n + 1, "t": round(time.time(), 3), "event": event, **fields,
                                         "prev": prev}
                entry["hash"] = _digest(entry)
                os.write(fd, (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode())
                os.fsync(fd)
            except OSError as exc:
                raise StorageError(f"{self.path}: cannot append to audit log: {exc.strerror}") from exc
            finally:
                os.close(fd)
            return entry

    def _lines(self) -> list[str] | None:
        """The log's lines (None: no log yet). A damaged byte becomes U+FFFD, so its line fails the hash check
        instead of the whole read. Raises StorageError when the file cannot be read or is refused (a link, a
        FIFO, a device, another user's, over ``MAX_AUDIT_BYTES``)."""
        try:
            if self._copy:
                raw = read_small_file(self.path, what="audit log", max_bytes=MAX_AUDIT_BYTES)
            else:
                raw = read_state_file(self.path, what="audit log", max_bytes=MAX_AUDIT_BYTES)
        except FileNotFoundError:
            return None
        return raw.decode("utf-8", "replace").splitlines()

    def entries(self) -> list[dict[str, Any]]:
        lines = self._lines() or []
        out = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            out.append(entry if isinstance(entry, dict) else {"event": "unreadable"})
        return out

    def verify(self) -> VerifyResult:
        lines = self._lines()
        if lines is None:
            return VerifyResult(ok=True, entries=0)
        prev = GENESIS
        for i, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                return VerifyResult(False, len(lines), i, "not JSON")
            if not isinstance(entry, dict) or entry.get("prev") != prev:
                return VerifyResult(False, len(lines), i, "does not link to the entry before it")
            if entry.get("n") != i:
                return VerifyResult(False, len(lines), i, f"entry number {entry.get('n')!r}, expected {i}")
            if entry.get("hash") != _digest(entry):
                return VerifyResult(False, len(lines), i, "content does not match its hash")
            prev = entry["hash"]
        return VerifyResult(ok=True, entries=len(lines))
