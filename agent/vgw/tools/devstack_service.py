"""The owner's consent service in a dev stack (README "Your own dev stack", docs/consent-service.md): its
folder ``DIR/service/`` and the hand-over of the car's consent to it.

``DIR/service/`` holds ``service.toml`` (the stack's broker as the cloud identity, the stack's consent signing
key, ``pki/`` to verify the car's receipts), ``service.sqlite``, ``owner-password`` (the car owner's, user
``owner``) and ``apps.json``: grants.toml's apps registered as OAuth clients (client secret, redirect URI on
loopback where nothing listens, scopes, and the ``state`` and PKCE ``code_verifier`` of the last authorization
URL printed). Every file is 0600.

:mod:`vgw.tools.devstack` decides when: it hands the files' ownership rules in as ``write`` and the broker link
as ``publish``. Raises :class:`~vgw.base.errors.ConfigError` for a service config or database it cannot use.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["OWNER", "ask_urls", "config_path", "hand_over", "latest_version", "service_url"]

OWNER = "owner"  # the car owner's user name on the stack's consent service

Write = Callable[[Path, bytes, int], None]  # write a stack file (path, data, mode), owned by the stack's owner


def config_path(stack_dir: Path) -> Path:
    return stack_dir / "service" / "service.toml"


def service_url(stack_dir: Path) -> str:
    """The service's issuer URL, e.g. ``http://127.0.0.1:PORT``."""
    from vgw.cloud.service.config import load_service_config

    return load_service_config(config_path(stack_dir)).issuer


def latest_version(stack_dir: Path, device: str) -> int | None:
    """The newest version the stack's consent service signed for ``device`` (None: none, or no service)."""
    if not config_path(stack_dir).exists():
        return None
    from vgw.cloud.service.config import load_service_config
    from vgw.cloud.service.server import open_store

    store = open_store(load_service_config(config_path(stack_dir)))
    try:
        latest = store.latest_document(device)
    finally:
        store.close()
    return latest.ver if latest else None


def _lay_out(stack_dir: Path, device: str, broker_port: int, write: Write) -> None:
    from vgw_sim.broker import free_port

    from vgw.cloud.service.config import load_service_config
    from vgw.cloud.service.server import add_owner
    from vgw.tools.service_play import service_config_text

    (stack_dir / "service").mkdir(mode=0o700, exist_ok=True)
    text = service_config_text(port=free_port(), database="service.sqlite",
                               signing_key=Path("../consent/consent-signer.key"), device_certs=Path("../pki"),
                               broker_port=broker_port, ca=Path("../pki/ca.crt"), cert=Path("../pki/cloud.crt"),
                               key=Path("../pki/cloud.key"))
    write(config_path(stack_dir), text.encode(), 0o600)
    password = secrets.token_urlsafe(12)
    write(stack_dir / "service" / "owner-password", (password + "\n").encode(), 0o600)
    add_owner(load_service_config(config_path(stack_dir)), owner_id=OWNER, device=device, password=password)


def _register_apps(stack_dir: Path, store: Any, write: Write) -> None:
    """grants.toml's apps (one per controller, with its grant's recipient key and scopes) become the service's."""
    from vgw_sim.broker import free_port

    from vgw.cloud.cloudkit import load_grants
    from vgw.cloud.service.store import App, digest

    apps_file = stack_dir / "service" / "apps.json"
    apps: dict[str, Any] = json.loads(apps_file.read_text()) if apps_file.exists() else {}
    for g in load_grants(stack_dir / "grants.toml")["grants"]:
        client_id = str(g.get("controller") or g["id"])
        if client_id in apps or store.app(client_id) is not None:
            continue
        secret = secrets.token_urlsafe(32)
        redirect = f"http://127.0.0.1:{free_port()}/callback"  # RFC 9700 section 2.6: http on loopback only
        store.add_app(App(client_id, client_id, str(g.get("purpose") or client_id), redirect, digest(secret),
                          dict(g["recipient"])))
        apps[client_id] = {"client_secret": secret, "redirect_uri": redirect, "scopes": list(g["scopes"])}
    write(apps_file, (json.dumps(apps, indent=2) + "\n").encode(), 0o600)


def ask_urls(stack_dir: Path, write: Write) -> dict[str, str]:
    """Per app of apps.json, a fresh authorization request: the URL the app sends the owner's browser to. Its
    ``state`` and ``code_verifier`` are kept in apps.json, to exchange the code the browser lands with."""
    from vgw.tools.service_play import AppClient

    apps_file = stack_dir / "service" / "apps.json"
    apps: dict[str, Any] = json.loads(apps_file.read_text())
    issuer = service_url(stack_dir)
    urls = {}
    for client_id, app in apps.items():
        client = AppClient(issuer, client_id, app["client_secret"], app["redirect_uri"], list(app["scopes"]))
        urls[client_id] = client.authorize_url()
        app.update(state=client.state, code_verifier=client.verifier)
    write(apps_file, (json.dumps(apps, indent=2) + "\n").encode(), 0o600)
    return urls


def hand_over(stack_dir: Path, device: str, broker_port: int, *, held: list[tuple[int, str]],
              publish: Callable[[str], None], write: Write) -> tuple[int, str]:
    """Give the car's consent to the stack's consent service: lay its folder out (the first time), register
    grants.toml's apps, then have the service sign the car's next document from the grants owners allowed on it
    (none the first time), above every version in ``held`` (what the car may hold, with its token), and
    ``publish`` it. Returns the document's (version, token); it is the service's newest, delivered.

    The service does not run meanwhile (it runs only while it signs), so this is the only writer of its
    database; the same code signs as when it runs (:class:`~vgw.cloud.service.documents.ConsentDesk`), the car's
    verifier included."""
    from vgw.cloud.cloudkit import default_version, load_signing_key
    from vgw.cloud.service.config import load_service_config
    from vgw.cloud.service.documents import ConsentDesk
    from vgw.cloud.service.server import open_store
    from vgw.cloud.service.store import Document

    if not config_path(stack_dir).exists():
        _lay_out(stack_dir, device, broker_port, write)
    cfg = load_service_config(config_path(stack_dir))
    store = open_store(cfg)
    try:
        _register_apps(stack_dir, store, write)
        # The car's version floor (README "Consent document": only a higher version is taken): when a document
        # the car may hold is numbered above the service's clock-based next one, the service's counter continues
        # from it, so its documents are never refused as a rollback.
        latest = store.latest_document(device)
        top = max(held, default=None)
        if top is not None and top[0] >= max(default_version(), latest.ver if latest else 0):
            store.add_document(Document(device, top[0], top[1], time.time(), None, 0, None))
            store.document_pushed(device, top[0], acked=True)
        doc = ConsentDesk(cfg, store, load_signing_key(cfg.signing_key)).issue(device)  # pending: not connected
        publish(doc.token)
        store.document_pushed(device, doc.ver, acked=True)
    finally:
        store.close()
    return doc.ver, doc.token
