"""Helpers for the fault-injection suite (tests/test_faults_*.py): traces, offline consent, waits, a TLS 1.1 server.

Each fault test drives the real agent (in a thread, or as a `vgw run` child process when it must be killed)
against the real mosquitto and the reference cloud peer, injects one fault, and checks what docs/guarantees.md
promises for it.
"""

from __future__ import annotations

import socket
import sqlite3
import ssl
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import vgw.state.outbox.startup as outbox_startup
from vgw.state.outbox import Outbox
from vgw_sim.broker import Mosquitto
from vgw_sim.can_sim import CanSimulator
from vgw_sim.cloud import CloudPeer
from vgw_sim.paths import default_dbc
from vgw_sim.pki import TestPKI
from vgw_sim.vehicle import VehicleModel

from tests.agentkit import Authority, connected_cloud, vgw

DEV = "dev-0001"
TRACE_START = 1_790_000_000.0


def record_trace(tmp: Path, seconds: float = 10.0, seed: int = 7) -> Path:
    """A candump trace of the simulated vehicle (for a source that survives process restarts)."""
    trace = tmp / f"drive-{seed}.log"
    if not trace.exists():
        CanSimulator(default_dbc(), VehicleModel(seed=seed, start_time=TRACE_START)).record(
            trace, seconds, start_time=TRACE_START)
    return trace


def apply_offline(cfg: Path, auth: Authority, grants: dict[str, list[str]], tmp: Path, device: str = DEV) -> str:
    """`vgw consent apply` a new document for ``grants`` (no network needed). Returns the token."""
    token = auth.doc(device, grants)
    doc = tmp / f"consent-v{auth.ver}.jws"
    doc.write_text(token)
    r = vgw("consent", "apply", "--config", str(cfg), str(doc))
    assert r.returncode == 0, r.stderr
    return token


class FaultyOutbox(Outbox):
    """An outbox whose connection fails the way a full or read-only file system does (test kit only).

    SQLITE_FULL comes from ``PRAGMA max_page_count`` (a small tmpfs is not available everywhere, and as root a
    chmod would not stop writes), SQLITE_READONLY from ``PRAGMA query_only``. Both reach the agent through
    the same code path as a real full or read-only file system: the SQLite error at INSERT/COMMIT.
    """

    def fill_disk(self) -> None:
        with self._lock:
            pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
            self._db.execute(f"PRAGMA max_page_count = {pages}")

    def make_read_only(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA query_only = 1")

    def repair(self) -> None:
        """Space and write access come back."""
        with self._lock:
            self._db.execute("PRAGMA max_page_count = 4294967294")
            self._db.execute("PRAGMA query_only = 0")


def use_faulty_outbox(monkeypatch: Any) -> list[FaultyOutbox]:
    """Make every outbox `vgw run` opens in this process a :class:`FaultyOutbox`; returns them as opened."""
    opened: list[FaultyOutbox] = []

    class Recorded(FaultyOutbox):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(outbox_startup, "Outbox", Recorded)
    return opened


def live_status(state_dir: Path, pid: int | None = None) -> dict[str, Any] | None:
    """status.json of the running agent (of process ``pid`` if given), or None."""
    import json

    try:
        st = json.loads((state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    if pid is not None and st.get("pid") != pid:
        return None
    return st if isinstance(st, dict) else None


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` of an outbox file, from a separate connection (as after a crash)."""
    db = sqlite3.connect(path, timeout=10.0)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def file_query(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read from an outbox file by a separate connection, as a forensic reader of the disk
    would (never the agent's own connection: what it sees is what is on disk)."""
    db = sqlite3.connect(path, timeout=10.0)
    try:
        return list(db.execute(sql, params))
    finally:
        db.close()


def file_write(path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    """Change an outbox file behind the agent's back (a separate connection), as damage or tampering would."""
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    try:
        db.execute(sql, params)
    finally:
        db.close()


def outbox_rows(path: Path, grant: str | None = None) -> int:
    db = sqlite3.connect(path, timeout=10.0)
    try:
        if grant is None:
            return int(db.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
        return int(db.execute("SELECT COUNT(*) FROM batches WHERE grant_id = ?", (grant,)).fetchone()[0])
    finally:
        db.close()


@contextmanager
def persistent_world(pki: TestPKI, auth: Authority, *grants: str,
                     client_id: str = "cloud-faults") -> Iterator[tuple[Mosquitto, CloudPeer]]:
    """A broker that keeps sessions across restarts and a cloud peer with a persistent session on it."""
    broker = Mosquitto.from_pki(pki, persistence=True).start()
    try:
        with connected_cloud(broker, pki, persistent=True, client_id=client_id) as cloud:
            for gid in grants:  # before any batch can arrive: no agent runs yet
                cloud.add_recipient(gid, auth.recipient(gid))
            yield broker, cloud
    finally:
        broker.close()


class Tls11Server:
    """A TCP listener on 127.0.0.1 that speaks TLS 1.1 only (``@SECLEVEL=0``) with a valid server certificate.

    Counts handshakes attempted and how many succeeded: a client that pins TLS >= 1.2 must never complete one.
    """

    def __init__(self, pki: TestPKI) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.load_cert_chain(pki.server.cert, pki.server.key)
        self._ctx = ctx
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self.attempts = 0
        self.completed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tls11-server", daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.attempts += 1
            conn.settimeout(2.0)
            try:
                with self._ctx.wrap_socket(conn, server_side=True):
                    self.completed += 1
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()

    def __enter__(self) -> Tls11Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
