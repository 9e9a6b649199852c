"""Run the consent service: cheroot's threaded WSGI server (HTTPS when ``tls_cert``/``tls_key`` are set) in
front of :func:`vgw.cloud.service.web.create_app`, with the :class:`~vgw.cloud.service.documents.ConsentDesk`
worker beside it, until stopped. Also the offline commands' helpers: register an app or an owner.

Errors: :class:`~vgw.base.errors.ConfigError` for a bad file, key, certificate or option, naming it.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import threading
from pathlib import Path
from typing import Any

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from vgw.base.errors import ConfigError
from vgw.cloud.cloudkit import load_signing_key
from vgw.cloud.consent_authority import recipient_public_key
from vgw.cloud.service.config import ServiceConfig
from vgw.cloud.service.documents import ConsentDesk
from vgw.cloud.service.passwords import hash_password
from vgw.cloud.service.store import App, Owner, Store, digest
from vgw.cloud.service.web import create_app

__all__ = ["ConsentService", "add_app", "add_owner", "open_store"]

log = logging.getLogger(__name__)


def open_store(cfg: ServiceConfig) -> Store:
    """The database of ``database``: a postgresql:// URL (needs psycopg) or a SQLite file."""
    postgres = cfg.database.startswith(("postgresql://", "postgres://"))
    try:
        return Store.open_postgres(cfg.database) if postgres else Store.open_sqlite(Path(cfg.database))
    except ImportError as exc:
        raise ConfigError(f"{cfg.path}: [service] database: PostgreSQL needs psycopg (pip install 'psycopg[binary]')"
                          ) from exc
    except Exception as exc:  # sqlite3.Error, psycopg.Error, OSError: name the database, never its password
        where = "the PostgreSQL database" if postgres else cfg.database
        raise ConfigError(f"{cfg.path}: [service] database {where}: {type(exc).__name__}: {exc}") from exc


def _read_recipient(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        recipient = {"kem": data["kem"], "pk": data["pk"]}
        recipient_public_key(recipient)
    except OSError as exc:
        raise ConfigError(f"--recipient {path}: cannot read: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--recipient {path}: not a recipient public key (`vgw cloud keygen`'s .pub.json): "
                          f"{exc}") from exc
    return recipient


def add_app(cfg: ServiceConfig, *, client_id: str, name: str, redirect_uri: str, recipient: Path,
            purpose: str | None) -> dict[str, str]:
    """Register an app; returns ``{"client_id", "client_secret"}`` (the secret is shown once, stored hashed)."""
    from urllib.parse import urlsplit

    if not client_id or any(c.isspace() for c in client_id) or len(client_id) > 128:
        raise ConfigError(f"--id {client_id!r}: 1 to 128 characters without spaces")
    parts = urlsplit(redirect_uri)
    # RFC 6749 §3.1.2: absolute, no fragment; RFC 9700 §2.6: https, or http only to a loopback address
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.fragment or (
            parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1")):
        raise ConfigError(f"--redirect-uri {redirect_uri!r}: an absolute https URL (http only on loopback), "
                          "without fragment")
    key = _read_recipient(recipient)
    secret = secrets.token_urlsafe(32)
    store = open_store(cfg)
    try:
        store.add_app(App(client_id, name, purpose or name, redirect_uri, digest(secret), key))
    except ValueError as exc:
        raise ConfigError(f"--id {client_id!r}: {exc}") from exc
    finally:
        store.close()
    return {"client_id": client_id, "client_secret": secret}


def add_owner(cfg: ServiceConfig, *, owner_id: str, device: str, password: str) -> None:
    """Register (or re-register, with a new password) the owner of ``device``."""
    if not owner_id or len(owner_id) > 128:
        raise ConfigError(f"--id {owner_id!r}: 1 to 128 characters")
    if not device or any(c in device for c in "/+#") or len(device) > 128:
        raise ConfigError(f"--device {device!r}: a device id (no / + #)")
    try:
        hashed = hash_password(password)
    except ValueError as exc:
        raise ConfigError(f"password on stdin: {exc}") from exc
    store = open_store(cfg)
    try:
        store.put_owner(Owner(owner_id, device, hashed))
    finally:
        store.close()


class ConsentService:
    """One running service. Thread: the caller's thread runs :meth:`serve`; :meth:`stop` may come from any."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        key = load_signing_key(cfg.signing_key)
        self.store = open_store(cfg)
        self.desk = ConsentDesk(cfg, self.store, key)
        self.app = create_app(cfg, self.store, self.desk)
        self._server = wsgi.Server((cfg.host, cfg.port), self.app, numthreads=8, server_name="vgw-consent")
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            try:
                self._server.ssl_adapter = BuiltinSSLAdapter(str(cfg.tls_cert), str(cfg.tls_key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{cfg.path}: [service] tls_cert/tls_key: {exc}") from exc
        self._stopped = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        bound: Any = self._server.bind_addr
        return str(bound[0]), int(bound[1])

    def serve(self, ready: threading.Event | None = None) -> None:
        """Listen and answer until :meth:`stop`."""
        self.desk.start()
        try:
            self._server.prepare()
        except OSError as exc:
            self.desk.stop()
            raise ConfigError(f"{self.cfg.path}: [service] listen {self.cfg.host}:{self.cfg.port}: {exc}") from exc
        if ready is not None:
            ready.set()
        try:
            self._server.serve()
        finally:
            self.desk.stop()
            self.store.close()
            self._stopped.set()

    def stop(self) -> None:
        self._server.stop()
