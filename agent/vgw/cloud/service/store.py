"""The consent service's database: owners, apps, grants, signed documents, codes, tokens, receipts, history.

One :class:`Store` over a DB-API connection: SQLite (:meth:`Store.open_sqlite`, the default) or PostgreSQL
(:meth:`Store.open_postgres`, psycopg 3). The SQL is plain (no upserts, no engine-specific functions; types
both engines read alike: TEXT, BIGINT, FLOAT8) with ``?`` placeholders that :meth:`Store._q` rewrites to
``%s`` for psycopg (docs/consent-service.md, "PostgreSQL"). Secrets are never stored: client secrets,
authorization codes and access tokens as SHA-256 digests (they are long random strings), passwords as scrypt
hashes.

Thread: any. One lock guards the connection (SQLite in WAL mode; a request and the push worker share it).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["App", "Document", "GrantRow", "Owner", "Store", "digest"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS owners (id TEXT PRIMARY KEY, device TEXT NOT NULL, password TEXT NOT NULL,
    created FLOAT8 NOT NULL);
CREATE TABLE IF NOT EXISTS apps (client_id TEXT PRIMARY KEY, name TEXT NOT NULL, purpose TEXT NOT NULL,
    redirect_uri TEXT NOT NULL, secret_digest TEXT NOT NULL, recipient TEXT NOT NULL, created FLOAT8 NOT NULL);
CREATE TABLE IF NOT EXISTS grants (id TEXT PRIMARY KEY, client_id TEXT NOT NULL, owner TEXT NOT NULL,
    device TEXT NOT NULL, scopes TEXT NOT NULL, granted_at FLOAT8 NOT NULL, withdrawn_at FLOAT8,
    ver_granted BIGINT, ver_withdrawn BIGINT);
CREATE TABLE IF NOT EXISTS documents (device TEXT NOT NULL, ver BIGINT NOT NULL, token TEXT NOT NULL,
    signed_at FLOAT8 NOT NULL, acked_at FLOAT8, attempts INTEGER NOT NULL, last_error TEXT,
    PRIMARY KEY (device, ver));
CREATE TABLE IF NOT EXISTS codes (digest TEXT PRIMARY KEY, client_id TEXT NOT NULL, redirect_uri TEXT NOT NULL,
    scope TEXT NOT NULL, challenge TEXT NOT NULL, method TEXT NOT NULL, owner TEXT NOT NULL,
    grant_id TEXT NOT NULL, issued FLOAT8 NOT NULL, expires FLOAT8 NOT NULL, used INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (digest TEXT PRIMARY KEY, client_id TEXT NOT NULL, grant_id TEXT NOT NULL,
    code_digest TEXT NOT NULL, scope TEXT NOT NULL, issued FLOAT8 NOT NULL, expires FLOAT8 NOT NULL,
    revoked INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (digest TEXT PRIMARY KEY, device TEXT NOT NULL, typ TEXT NOT NULL,
    grant_id TEXT, ver BIGINT, claims TEXT NOT NULL, token TEXT NOT NULL, received_at FLOAT8 NOT NULL);
CREATE TABLE IF NOT EXISTS history (seq {serial}, owner TEXT NOT NULL, device TEXT NOT NULL,
    client_id TEXT NOT NULL, grant_id TEXT NOT NULL, event TEXT NOT NULL, scopes TEXT NOT NULL, at FLOAT8 NOT NULL);
"""


def digest(secret: str) -> str:
    """SHA-256 of a long random secret (client secret, code, token), hex: what the database keeps."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Owner:
    id: str
    device: str
    password: str


@dataclass(frozen=True)
class App:
    client_id: str
    name: str
    purpose: str
    redirect_uri: str
    secret_digest: str
    recipient: dict[str, str]


@dataclass(frozen=True)
class GrantRow:
    id: str
    client_id: str
    owner: str
    device: str
    scopes: tuple[str, ...]
    granted_at: float
    withdrawn_at: float | None
    ver_granted: int | None
    ver_withdrawn: int | None


@dataclass(frozen=True)
class Document:
    device: str
    ver: int
    token: str
    signed_at: float
    acked_at: float | None
    attempts: int
    last_error: str | None


class Store:
    """The database. Methods raise ``sqlite3.Error`` (or the driver's errors) only for a broken database."""

    def __init__(self, conn: Any, *, paramstyle: str = "qmark") -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self._format = paramstyle != "qmark"

    @classmethod
    def open_sqlite(cls, path: Path) -> Store:
        """Open (creating, mode 0600) the SQLite database at ``path`` and its schema."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        store = cls(conn)
        store.create_schema()
        return store

    @classmethod
    def open_postgres(cls, dsn: str) -> Store:
        """Connect to PostgreSQL (psycopg 3, an optional dependency) at ``dsn`` and create the schema."""
        import psycopg  # only a PostgreSQL deployment needs it

        store = cls(psycopg.connect(dsn, autocommit=True), paramstyle="format")
        store.create_schema()
        return store

    def create_schema(self) -> None:
        # the one column type that differs: an auto-numbered key (SQLite's row id; PostgreSQL's sequence)
        serial = "BIGSERIAL PRIMARY KEY" if self._format else "INTEGER PRIMARY KEY"
        with self._lock:
            for stmt in SCHEMA.replace("{serial}", serial).split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._format else sql

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._conn.execute(self._q(sql), tuple(args))

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._exec(sql, args).fetchall())

    def _one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit (and the lock held for it)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # ------------------------------------------------------------ meta

    def secret(self, name: str) -> bytes:
        """A random 32-byte secret kept in the database (made on first use): the session cookie's key."""
        with self.transaction():
            row = self._one("SELECT value FROM meta WHERE key = ?", (name,))
            if row is None:
                value = os.urandom(32).hex()
                self._exec("INSERT INTO meta (key, value) VALUES (?, ?)", (name, value))
                return bytes.fromhex(value)
        return bytes.fromhex(str(row[0]))

    # ------------------------------------------------------------ owners and apps

    def put_owner(self, owner: Owner) -> None:
        with self.transaction():
            self._exec("DELETE FROM owners WHERE id = ?", (owner.id,))
            self._exec("INSERT INTO owners (id, device, password, created) VALUES (?, ?, ?, ?)",
                       (owner.id, owner.device, owner.password, time.time()))

    def owner(self, owner_id: str) -> Owner | None:
        row = self._one("SELECT id, device, password FROM owners WHERE id = ?", (owner_id,))
        return Owner(*row) if row else None

    def add_app(self, app: App) -> None:
        """Register an app. Raises ``ValueError`` if its client id is taken."""
        with self.transaction():
            if self._one("SELECT 1 FROM apps WHERE client_id = ?", (app.client_id,)):
                raise ValueError(f"app {app.client_id!r} is already registered")
            self._exec("INSERT INTO apps (client_id, name, purpose, redirect_uri, secret_digest, recipient, created)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (app.client_id, app.name, app.purpose, app.redirect_uri, app.secret_digest,
                        json.dumps(app.recipient), time.time()))

    def app(self, client_id: str) -> App | None:
        row = self._one("SELECT client_id, name, purpose, redirect_uri, secret_digest, recipient FROM apps "
                        "WHERE client_id = ?", (client_id,))
        return App(row[0], row[1], row[2], row[3], row[4], json.loads(row[5])) if row else None

    # ------------------------------------------------------------ grants and history

    def _grant(self, row: tuple[Any, ...]) -> GrantRow:
        return GrantRow(row[0], row[1], row[2], row[3], tuple(json.loads(row[4])), *row[5:])

    def add_grant(self, g: GrantRow) -> None:
        with self.transaction():
            self._exec("INSERT INTO grants (id, client_id, owner, device, scopes, granted_at, withdrawn_at, "
                       "ver_granted, ver_withdrawn) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (g.id, g.client_id, g.owner, g.device, json.dumps(list(g.scopes)), g.granted_at, None,
                        None, None))
            self._history(g.owner, g.device, g.client_id, g.id, "allowed", g.scopes, g.granted_at)

    def grant(self, grant_id: str) -> GrantRow | None:
        row = self._one("SELECT id, client_id, owner, device, scopes, granted_at, withdrawn_at, ver_granted, "
                        "ver_withdrawn FROM grants WHERE id = ?", (grant_id,))
        return self._grant(row) if row else None

    def active_grants(self, device: str) -> list[GrantRow]:
        return [self._grant(r) for r in self._all(
            "SELECT id, client_id, owner, device, scopes, granted_at, withdrawn_at, ver_granted, ver_withdrawn "
            "FROM grants WHERE device = ? AND withdrawn_at IS NULL "
            "ORDER BY granted_at, id", (device,))]

    def grants_of_device(self, device: str) -> list[GrantRow]:
        return [self._grant(r) for r in self._all(
            "SELECT id, client_id, owner, device, scopes, granted_at, withdrawn_at, ver_granted, ver_withdrawn "
            "FROM grants WHERE device = ? ORDER BY granted_at DESC, id", (device,))]

    def set_grant_version(self, grant_id: str, ver: int, *, withdrawn: bool) -> None:
        with self._lock:
            if withdrawn:
                self._exec("UPDATE grants SET ver_withdrawn = ? WHERE id = ? AND ver_withdrawn IS NULL",
                           (ver, grant_id))
            else:
                self._exec("UPDATE grants SET ver_granted = ? WHERE id = ? AND ver_granted IS NULL", (ver, grant_id))

    def withdraw_grant(self, grant_id: str, at: float) -> GrantRow | None:
        """Mark the grant withdrawn and revoke its tokens; None if it was not active."""
        with self.transaction():
            row = self._one("SELECT id, client_id, owner, device, scopes, granted_at, withdrawn_at, ver_granted, "
                            "ver_withdrawn FROM grants WHERE id = ? AND withdrawn_at IS NULL", (grant_id,))
            if row is None:
                return None
            g = self._grant(row)
            self._exec("UPDATE grants SET withdrawn_at = ? WHERE id = ?", (at, grant_id))
            self._exec("UPDATE tokens SET revoked = 1 WHERE grant_id = ?", (grant_id,))
            self._history(g.owner, g.device, g.client_id, g.id, "withdrawn", g.scopes, at)
            return g

    def _history(self, owner: str, device: str, client_id: str, grant_id: str, event: str,
                 scopes: Sequence[str], at: float) -> None:
        self._exec("INSERT INTO history (owner, device, client_id, grant_id, event, scopes, at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (owner, device, client_id, grant_id, event,
                                                    json.dumps(list(scopes)), at))

    def history(self, device: str) -> list[dict[str, Any]]:
        return [{"client_id": r[0], "grant_id": r[1], "event": r[2], "scopes": json.loads(r[3]), "at": r[4]}
                for r in self._all("SELECT client_id, grant_id, event, scopes, at FROM history WHERE device = ? "
                                   "ORDER BY seq DESC", (device,))]

    # ------------------------------------------------------------ documents

    def latest_document(self, device: str) -> Document | None:
        row = self._one("SELECT device, ver, token, signed_at, acked_at, attempts, last_error "
                        "FROM documents WHERE device = ? ORDER BY ver DESC LIMIT 1", (device,))
        return Document(*row) if row else None

    def add_document(self, doc: Document) -> None:
        """Record a signed document. Raises ``ValueError`` unless its version is above every earlier one of
        the device (versions always rise: the car refuses anything else, README "Consent document")."""
        with self.transaction():
            row = self._one("SELECT MAX(ver) FROM documents WHERE device = ?", (doc.device,))
            if row and row[0] is not None and doc.ver <= int(row[0]):
                raise ValueError(f"consent v{doc.ver} for {doc.device}: not above v{row[0]}")
            self._exec("INSERT INTO documents (device, ver, token, signed_at, acked_at, attempts, last_error)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (doc.device, doc.ver, doc.token, doc.signed_at, None, 0, None))

    def document_pushed(self, device: str, ver: int, *, acked: bool, error: str | None = None) -> None:
        with self._lock:
            self._exec("UPDATE documents SET attempts = attempts + 1, acked_at = ?, last_error = ? "
                       "WHERE device = ? AND ver = ?", (time.time() if acked else None, error, device, ver))

    def unacked_latest(self) -> list[Document]:
        """Per device, its newest document if the broker has not acknowledged it yet."""
        rows = self._all("SELECT device, ver, token, signed_at, acked_at, attempts, last_error "
                         "FROM documents d WHERE acked_at IS NULL AND ver = "
                         "(SELECT MAX(ver) FROM documents e WHERE e.device = d.device)")
        return [Document(*r) for r in rows]

    def devices_with_documents(self) -> list[str]:
        return [str(r[0]) for r in self._all("SELECT DISTINCT device FROM documents ORDER BY device")]

    # ------------------------------------------------------------ codes and tokens

    def add_code(self, code: str, *, client_id: str, redirect_uri: str, scope: str, challenge: str, method: str,
                 owner: str, grant_id: str, ttl_s: float) -> None:
        now = time.time()
        with self._lock:
            self._exec("INSERT INTO codes (digest, client_id, redirect_uri, scope, challenge, method, owner, "
                       "grant_id, issued, expires, used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                       (digest(code), client_id, redirect_uri, scope, challenge, method, owner, grant_id, now,
                        now + ttl_s))

    def code(self, code: str) -> dict[str, Any] | None:
        row = self._one("SELECT digest, client_id, redirect_uri, scope, challenge, method, owner, grant_id, "
                        "issued, expires, used FROM codes WHERE digest = ?", (digest(code),))
        if row is None:
            return None
        keys = ("digest", "client_id", "redirect_uri", "scope", "challenge", "method", "owner", "grant_id",
                "issued", "expires", "used")
        return dict(zip(keys, row, strict=True))

    def use_code(self, code_digest: str) -> bool:
        """Mark a code used; False if it already was (a second exchange: RFC 6749 §4.1.2)."""
        with self._lock:
            cur = self._exec("UPDATE codes SET used = 1 WHERE digest = ? AND used = 0", (code_digest,))
            return bool(cur.rowcount == 1)

    def revoke_tokens_of_code(self, code_digest: str) -> int:
        with self._lock:
            cur = self._exec("UPDATE tokens SET revoked = 1 WHERE code_digest = ?", (code_digest,))
            return int(cur.rowcount)

    def add_token(self, token: str, *, client_id: str, grant_id: str, code_digest: str, scope: str,
                  ttl_s: float) -> None:
        now = time.time()
        with self._lock:
            self._exec("INSERT INTO tokens (digest, client_id, grant_id, code_digest, scope, issued, expires, "
                       "revoked) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                       (digest(token), client_id, grant_id, code_digest, scope, now, now + ttl_s))

    def token(self, token: str) -> dict[str, Any] | None:
        """A live (unexpired, unrevoked) access token's record, else None."""
        row = self._one("SELECT client_id, grant_id, scope, expires, revoked FROM tokens WHERE digest = ?",
                        (digest(token),))
        if row is None or row[4] or row[3] < time.time():
            return None
        return {"client_id": row[0], "grant_id": row[1], "scope": row[2]}

    # ------------------------------------------------------------ receipts

    def add_receipt(self, device: str, claims: dict[str, Any], token: str) -> bool:
        """Record a verified receipt; False if it was recorded before (QoS 1 re-delivery)."""
        key = digest(token)
        with self.transaction():
            if self._one("SELECT 1 FROM receipts WHERE digest = ?", (key,)):
                return False
            grant_id = claims.get("grant") if isinstance(claims.get("grant"), str) else None
            ver = claims.get("ver") if isinstance(claims.get("ver"), int) else None
            self._exec("INSERT INTO receipts (digest, device, typ, grant_id, ver, claims, token, received_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (key, device, str(claims.get("typ")), grant_id, ver, json.dumps(claims), token, time.time()))
            return True

    def erasure_receipt(self, device: str, grant_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT claims, received_at FROM receipts WHERE device = ? AND typ = 'erasure' AND "
                        "grant_id = ? ORDER BY received_at LIMIT 1", (device, grant_id))
        return {**json.loads(row[0]), "received_at": row[1]} if row else None

    def receipts(self, device: str, typ: str) -> list[dict[str, Any]]:
        return [{**json.loads(r[0]), "received_at": r[1]} for r in self._all(
            "SELECT claims, received_at FROM receipts WHERE device = ? AND typ = ? ORDER BY received_at",
            (device, typ))]
