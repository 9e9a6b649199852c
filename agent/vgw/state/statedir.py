"""The state directory's lock and parts, shared by `vgw run` and the CLI commands that read or hand over state.

No thread of its own: :class:`AgentLock` is taken once by the agent's constructor (main thread) and released
at shutdown; :func:`open_state` runs before any daemon thread starts.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from vgw.base.errors import StorageError
from vgw.base.fsutil import ensure_private_dir, open_state_file, read_state_file
from vgw.config.settings import Config
from vgw.contract.receipts import ReceiptSigner
from vgw.state.audit import AuditLog
from vgw.state.consent.store import ConsentStore
from vgw.state.credentials import device_credentials
from vgw.state.keys import load_or_create_storage_key
from vgw.state.outbox import Outbox, open_checked

STATUS_FILE = "status.json"
LOCK_FILE = "agent.lock"
OUTBOX_FILE = "outbox.sqlite"


def read_status_file(state_dir: Path) -> dict[str, Any]:
    """The status file the running (or last) agent wrote, as a JSON object: {} when there is none, or it is
    damaged (not UTF-8, not JSON, not an object). A file the agent never writes (a link, a FIFO, a device,
    another user's, over ``MAX_STATE_BYTES``) raises StorageError, as every state file does."""
    try:
        raw = json.loads(read_state_file(state_dir / STATUS_FILE, what="status file").decode("utf-8"))
    except (FileNotFoundError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}
    return raw if isinstance(raw, dict) else {}


class AgentLock:
    """An exclusive flock on the state dir: one `vgw run` per state dir; `vgw consent apply` checks it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        try:
            # Never through a link (one planted here must never make us truncate its target), never a FIFO or
            # device (ftruncate fails on one; docs/guarantees.md).
            fd = open_state_file(self.path, os.O_RDWR | os.O_CREAT, what="agent lock")
        except FileNotFoundError as exc:
            raise StorageError(f"{self.path}: cannot open the agent lock: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"{self.path}: cannot write the agent lock: {exc.strerror}") from exc
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def held_by_other(state_dir: Path) -> bool:
        """True while a `vgw run` holds the lock; reads only (a shared flock on a read-only descriptor)."""
        try:
            fd = open_state_file(state_dir / LOCK_FILE, what="agent lock")
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def open_state(cfg: Config, *, check: bool = False) -> tuple[Outbox, AuditLog, ConsentStore, ReceiptSigner]:
    """Open the state directory's parts (shared by `vgw run` and the CLI commands).

    ``check`` (`vgw run` only): integrity-check the outbox first and quarantine a corrupt one (audited).
    """
    ensure_private_dir(cfg.state_dir)
    storage_key = load_or_create_storage_key(cfg.device.storage_key)
    audit = AuditLog(cfg.state_dir)
    if check:
        outbox, quarantined = open_checked(cfg.state_dir / OUTBOX_FILE, storage_key, cfg.device.id)
        if quarantined is not None:
            audit.append("outbox-quarantined", file=quarantined.file.name, reason=quarantined.reason[:200],
                         seqs_recovered=len(quarantined.seqs_recovered))
    else:
        outbox = Outbox(cfg.state_dir / OUTBOX_FILE, storage_key, cfg.device.id)
    store = ConsentStore(cfg.state_dir)
    # The key in use: the renewed one once the agent has renewed its certificate (vgw.state.credentials).
    _cert, key_file = device_credentials(cfg.mqtt.cert_file, cfg.mqtt.key_file, cfg.state_dir)
    signer = ReceiptSigner.from_file(cfg.device.id, key_file)
    return outbox, audit, store, signer
