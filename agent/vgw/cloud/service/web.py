"""The consent service's Flask application: sign-in, the consent page at the authorization endpoint, the
token endpoint, the owner's page with Withdraw, and the RFC 8414 metadata.

Sessions are Flask's signed cookies (key kept in the database): HttpOnly, SameSite=Lax (the app sends the
owner here with a top-level GET, which Lax lets through; a cross-site POST carries no cookie), Secure and
``__Host-`` prefixed over HTTPS. Every form carries a per-session CSRF token (RFC 9700 §4.7 asks for the same
of the authorization endpoint). Sign-in is throttled per user name and per client address. Logs name no
owner and no user name.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections import defaultdict, deque
from typing import Any
from urllib.parse import quote

from authlib.oauth2 import OAuth2Error
from flask import Flask, Response, abort, g, jsonify, redirect, request, session

from vgw.base.errors import ConsentError
from vgw.cloud.service import pages
from vgw.cloud.service.config import ServiceConfig
from vgw.cloud.service.documents import ConsentDesk
from vgw.cloud.service.oauth import AUTH_METHODS, make_authorization_server
from vgw.cloud.service.passwords import dummy_check, verify_password
from vgw.cloud.service.store import GrantRow, Store
from vgw.contract.scopes import SCOPES

__all__ = ["LoginThrottle", "create_app"]

log = logging.getLogger(__name__)


class LoginThrottle:
    """At most ``attempts`` failed sign-ins per ``window_s`` per user name and per client address (RFC 9700
    asks nothing here; OWASP's authentication guidance does: password guessing). Thread: any; one lock."""

    def __init__(self, attempts: int, window_s: float) -> None:
        self.attempts, self.window_s = attempts, window_s
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures[key]
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def blocked(self, *keys: str) -> float:
        """Seconds until sign-in opens again for these keys (0: open)."""
        now = time.monotonic()
        with self._lock:
            queues = [self._recent(k, now) for k in keys]
            waits = [q[0] + self.window_s - now for q in queues if len(q) >= self.attempts]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)
            if len(self._failures) > 100_000:  # bound memory under a spray of names
                self._failures.clear()


def create_app(cfg: ServiceConfig, store: Store, desk: ConsentDesk) -> Flask:
    """The WSGI application of one service."""
    app = Flask("vgw.cloud.service")
    app.config.update(
        SECRET_KEY=store.secret("session-key"),
        SESSION_COOKIE_NAME="__Host-vgw-session" if cfg.https else "vgw-session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=cfg.https,
        PERMANENT_SESSION_LIFETIME=8 * 3600,
        MAX_CONTENT_LENGTH=64 * 1024,
        OAUTH2_TOKEN_EXPIRES_IN={"authorization_code": cfg.token_ttl_s},
    )
    server = make_authorization_server(app, store, code_ttl_s=cfg.code_ttl_s)
    throttle = LoginThrottle(cfg.login_attempts, cfg.login_window_s)

    def csrf() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        return str(session["csrf"])

    def check_csrf() -> None:
        sent = request.form.get("csrf_token", "")
        if not sent or "csrf" not in session or not hmac.compare_digest(sent, str(session["csrf"])):
            abort(400, "the form has expired or did not come from this site: reload the page and try again")

    def owner() -> str | None:
        who = session.get("owner")
        return str(who) if who and store.owner(str(who)) else None

    def html(text: str, status: int = 200) -> Response:
        return Response(text, status=status, mimetype="text/html")

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Frame-Options", "DENY")  # no clickjacking of the Allow button
        resp.headers.setdefault("Content-Security-Policy",
                                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' *; "
                                "frame-ancestors 'none'; base-uri 'none'")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")  # the code must not leak via Referer
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.path != "/.well-known/oauth-authorization-server":
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.errorhandler(400)
    def bad_request(exc: Any) -> Response:
        return html(pages.error_page("This request cannot be handled", getattr(exc, "description", "")), 400)

    @app.route("/.well-known/oauth-authorization-server")
    def metadata() -> Response:
        base = cfg.issuer
        return jsonify({
            "issuer": base,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "scopes_supported": sorted(SCOPES),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
        })

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        next_url = request.values.get("next", "/")
        if not next_url.startswith("/") or next_url.startswith("//") or "\\" in next_url:
            next_url = "/"  # only paths on this site: no open redirect through sign-in
        if request.method == "GET":
            return html(pages.login_page(csrf(), next_url))
        check_csrf()
        username = request.form.get("username", "")
        password = request.form.get("password", "")
        keys = (f"user:{username}", f"addr:{request.remote_addr}")
        wait = throttle.blocked(*keys)
        if wait > 0:
            log.warning("sign-in refused: too many failed attempts")
            return html(pages.login_page(csrf(), next_url, f"Too many failed attempts. Try again in "
                                         f"{max(1, round(wait / 60))} minute(s)."), 429)
        found = store.owner(username)
        if found is None:
            dummy_check(password)  # the same time as a wrong password: no probing for user names
        if found is None or not verify_password(password, found.password):
            throttle.failed(*keys)
            log.info("sign-in failed")
            return html(pages.login_page(csrf(), next_url, "Wrong user name or password."), 401)
        session.clear()  # a fresh session (and CSRF token) after sign-in: no session fixation
        session["owner"] = found.id
        session.permanent = True
        return redirect(next_url, 303)

    @app.post("/logout")
    def logout() -> Any:
        check_csrf()
        session.clear()
        return redirect("/login", 303)

    def consent_grant(who: str) -> Any:
        """Authlib's validation of the authorization request, or the error response: redirected to the app
        only once client and redirect URI are known good (RFC 6749 §4.1.2.1), else shown here."""
        try:
            return server.get_consent_grant(end_user=who)
        except OAuth2Error as error:
            if error.redirect_uri:
                return server.handle_error_response(request, error)
            return html(pages.error_page("This app's request is not valid",
                                         f"{error.error}: {error.description or ''}".strip(": ")), 400)

    @app.route("/authorize", methods=["GET", "POST"])
    def authorize() -> Any:
        who = owner()
        if who is None:
            return redirect("/login?next=" + quote(request.full_path, safe=""), 303)
        grant = consent_grant(who)
        if isinstance(grant, Response):
            return grant
        client = grant.client.app
        scopes = grant.request.scope.split()
        if not scopes:
            return server.handle_error_response(
                request, _error(grant, "invalid_scope", "ask for at least one read scope"))
        found = store.owner(who)
        assert found is not None
        if request.method == "GET":
            return html(pages.consent_page(csrf(), who, client, found.device, scopes))
        check_csrf()
        if request.form.get("decision") != "allow":
            return server.create_authorization_response(grant_user=None, grant=grant)
        gid = "g-" + secrets.token_hex(8)
        row = GrantRow(gid, client.client_id, who, found.device, tuple(scopes), time.time(), None, None, None)
        store.add_grant(row)
        try:
            desk.issue(found.device)
        except ConsentError as exc:
            store.withdraw_grant(gid, time.time())
            log.error("consent for %s not signed: the car's verifier refuses it: %s", found.device, exc)
            return html(pages.error_page("Your car would refuse this permission", str(exc), who, csrf()), 500)
        g.grant_id = gid
        return server.create_authorization_response(grant_user=who, grant=grant)

    @app.post("/token")
    def token() -> Any:
        return server.create_token_response()

    @app.get("/api/grant")
    def api_grant() -> Any:
        """For the app, with its access token (RFC 6750 bearer): its grant, device, scopes and whether the
        owner still allows it. A withdrawn grant's tokens are revoked: 401."""
        auth = request.headers.get("Authorization", "")
        record = store.token(auth[7:]) if auth[:7].lower() == "bearer " else None
        row = store.grant(record["grant_id"]) if record else None
        if record is None or row is None or row.withdrawn_at is not None:
            resp = jsonify({"error": "invalid_token"})
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            return resp
        latest = store.latest_document(row.device)
        return jsonify({"grant_id": row.id, "device": row.device, "scopes": list(row.scopes),
                        "since": row.granted_at, "consent_version": row.ver_granted,
                        "delivered": bool(latest and latest.acked_at and row.ver_granted
                                          and latest.ver >= row.ver_granted)})

    @app.post("/withdraw")
    def withdraw() -> Any:
        who = owner()
        if who is None:
            return redirect("/login", 303)
        check_csrf()
        found = store.owner(who)
        row = store.grant(request.form.get("grant", ""))
        if found is None or row is None or row.device != found.device:
            abort(400, "no such permission for your car")
        if store.withdraw_grant(row.id, time.time()) is not None:
            try:
                desk.issue(found.device)
            except ConsentError as exc:
                log.error("withdrawal for %s not signed: %s", found.device, exc)
        return redirect("/", 303)

    @app.get("/")
    def home() -> Any:
        who = owner()
        if who is None:
            return redirect("/login", 303)
        found = store.owner(who)
        assert found is not None
        device = found.device
        names: dict[str, tuple[str, str]] = {}

        def app_of(client_id: str) -> tuple[str, str]:
            if client_id not in names:
                a = store.app(client_id)
                names[client_id] = (a.name, a.purpose) if a else (client_id, "")
            return names[client_id]

        active, withdrawn = [], []
        for gr in store.grants_of_device(device):
            name, purpose = app_of(gr.client_id)
            item = {"grant": gr, "app_name": name, "purpose": purpose, "labels": pages.labels(gr.scopes),
                    "sentences": pages.scope_sentences(gr.scopes)}
            if gr.withdrawn_at is None:
                active.append(item)
            else:
                item["receipt"] = store.erasure_receipt(device, gr.id)
                withdrawn.append(item)
        history = [{**h, "app_name": app_of(h["client_id"])[0], "labels": pages.labels(h["scopes"]),
                    "event": h["event"].capitalize()} for h in store.history(device)]
        doc = store.latest_document(device)
        # what the car itself said about the newest document (README "Receipts"): applied, or refused and why
        said = {typ: next((r for r in store.receipts(device, typ) if doc and r.get("ver") == doc.ver), None)
                for typ in ("consent-applied", "consent-rejected")}
        return html(pages.owner_page(csrf(), who, device, active=active, withdrawn=withdrawn, history=history,
                                     doc=doc, applied=said["consent-applied"], rejected=said["consent-rejected"]))

    return app


def _error(grant: Any, code: str, description: str) -> OAuth2Error:
    err = OAuth2Error(description=description, redirect_uri=grant.request.payload.redirect_uri
                      or grant.client.get_default_redirect_uri(), state=grant.request.payload.state)
    err.error = code
    return err
