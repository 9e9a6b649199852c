"""The owner's consent service (docs/consent-service.md) as the demo and the dev stack use it: its config file
written for a local broker, its apps and owner registered, and its two kinds of users played over HTTP the way
a browser and an OAuth client do, with the standard library only (urllib, a cookie jar, no redirects
followed):

- :class:`OwnerBrowser`: signs in, opens a consent page and presses Allow (the forms' CSRF tokens included),
  presses Withdraw on the owner's page, reads that page;
- :class:`AppClient`: an app's side of the authorization code grant with PKCE ``S256`` (RFC 6749 section 4.1,
  RFC 7636): the authorization URL with ``state`` and a code challenge, the code exchanged at the token
  endpoint with the client secret (HTTP Basic, RFC 6749 section 2.3.1), its grant looked up with the token.

:func:`service_missing` says whether the ``service`` extra is installed, without importing Flask for everyone.
Errors: :class:`~vgw.base.errors.VgwError` when the service answers something other than the flow expects (the
message names the step and the HTTP status).
"""

from __future__ import annotations

import base64
import hashlib
import http.cookiejar
import json
import re
import secrets
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from vgw.base.errors import VgwError

__all__ = ["AppClient", "LocalService", "OwnerBrowser", "Reply", "pkce_pair", "service_config_text", "service_missing"]

HTTP_TIMEOUT_S = 30.0  # sign-in hashes the password with scrypt: a slow machine takes a moment
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def service_missing() -> str | None:
    """None when the consent service can run here, else the missing module of its extra (``vgw[service]``)."""
    try:
        import vgw.cloud.service.server  # noqa: F401 - Flask, Authlib and cheroot, imported only here
    except ImportError as exc:
        return exc.name or "flask"
    return None


def service_config_text(*, port: int, database: str, signing_key: Path, device_certs: Path, broker_port: int,
                        ca: Path, cert: Path, key: Path, ttl_s: int = 86400) -> str:
    """A ``vgw cloud serve`` config (docs/consent-service.md, "Configuration") for a service on
    ``http://127.0.0.1:PORT`` that pushes to the broker on ``127.0.0.1:BROKER_PORT`` as the cloud identity."""
    return f"""# The owner's consent service (docs/consent-service.md); relative paths are relative to this file.
[service]
listen = "127.0.0.1:{port}"
issuer = "http://127.0.0.1:{port}"
database = "{database}"
signing_key = "{signing_key}"      # the consent signing key the car trusts
device_certs = "{device_certs}"    # <device>.crt verifies the car's receipts
ttl_s = {ttl_s}

[broker]
host = "localhost"
port = {broker_port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
"""


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: status, headers, body text."""

    status: int
    headers: Message
    text: str

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None  # a redirect is an answer to read (the code travels in it), not a page to fetch


def _opener(jar: http.cookiejar.CookieJar | None = None) -> urllib.request.OpenerDirector:
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect(), urllib.request.ProxyHandler({})]  # loopback
    if jar is not None:
        handlers.append(urllib.request.HTTPCookieProcessor(jar))
    return urllib.request.build_opener(*handlers)


def _send(opener: urllib.request.OpenerDirector, url: str, form: dict[str, str] | None = None,
          headers: dict[str, str] | None = None) -> Reply:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r}: not an http(s) URL")
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data, headers=headers or {},  # noqa: S310 - http(s) only, checked above
                                 method="POST" if form is not None else "GET")
    try:
        with opener.open(req, timeout=HTTP_TIMEOUT_S) as resp:
            return Reply(resp.status, resp.headers, resp.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:  # 3xx (not followed) and 4xx/5xx: an answer all the same
        with exc:
            return Reply(exc.code, exc.headers, exc.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError) as exc:
        raise VgwError(f"consent service {url.split('?')[0]}: {getattr(exc, 'reason', exc)}") from exc


def _expect(reply: Reply, status: int, step: str) -> Reply:
    if reply.status != status:
        raise VgwError(f"consent service: {step} answered HTTP {reply.status}, expected {status}")
    return reply


def _csrf(page: Reply, step: str) -> str:
    found = _CSRF.search(page.text)
    if not found:
        raise VgwError(f"consent service: {step}: the page has no form token")
    return found.group(1)


@dataclass
class OwnerBrowser:
    """The car's owner in a browser: a cookie jar, each form posted with the CSRF token of its page."""

    issuer: str
    jar: http.cookiejar.CookieJar = field(default_factory=http.cookiejar.CookieJar)

    def __post_init__(self) -> None:
        self._http = _opener(self.jar)

    def sign_in(self, username: str, password: str) -> None:
        """Sign in (the service answers 303 to the owner's page). Raises VgwError."""
        page = _expect(_send(self._http, f"{self.issuer}/login"), 200, "the sign-in page")
        _expect(_send(self._http, f"{self.issuer}/login", {"username": username, "password": password,
                                                           "csrf_token": _csrf(page, "sign-in")}), 303, "sign-in")

    def decide(self, authorize_url: str, decision: str = "allow") -> str:
        """Open the consent page at ``authorize_url``, press Allow (or Deny); return where the service sends
        the browser back to the app (its redirect URI with ``code`` and ``state``). Raises VgwError."""
        page = _expect(_send(self._http, authorize_url), 200, "the consent page")
        answer = _expect(_send(self._http, authorize_url, {"decision": decision,
                                                           "csrf_token": _csrf(page, "consent page")}),
                         302, f"pressing {decision.capitalize()}")
        return answer.location

    def page(self) -> str:
        """The owner's page (apps with access, withdrawn ones with the car's receipts, history)."""
        return _expect(_send(self._http, f"{self.issuer}/"), 200, "the owner's page").text

    def withdraw(self, grant_id: str) -> None:
        """Press Withdraw for ``grant_id`` on the owner's page. Raises VgwError."""
        page = _expect(_send(self._http, f"{self.issuer}/"), 200, "the owner's page")
        _expect(_send(self._http, f"{self.issuer}/withdraw", {"grant": grant_id,
                                                               "csrf_token": _csrf(page, "owner's page")}),
                303, "pressing Withdraw")


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge) of RFC 7636 section 4.1-4.2."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


@dataclass
class AppClient:
    """An app registered with the service (`vgw cloud app add`): its side of the authorization code grant."""

    issuer: str
    client_id: str
    client_secret: str
    redirect_uri: str
    scopes: list[str]
    state: str = ""
    verifier: str = ""

    def __post_init__(self) -> None:
        self._http = _opener()

    def authorize_url(self) -> str:
        """A fresh authorization request (new ``state`` and PKCE verifier) as the URL the owner's browser opens."""
        self.verifier, challenge = pkce_pair()
        self.state = secrets.token_urlsafe(16)
        query = urllib.parse.urlencode({"response_type": "code", "client_id": self.client_id,
                                        "redirect_uri": self.redirect_uri, "scope": " ".join(self.scopes),
                                        "state": self.state, "code_challenge": challenge,
                                        "code_challenge_method": "S256"}, quote_via=urllib.parse.quote)
        return f"{self.issuer}/authorize?{query}"

    def exchange(self, callback: str) -> dict[str, Any]:
        """Turn the redirect the owner's browser came back with into a token answer (``access_token``,
        ``grant_id``, ``device``). Raises VgwError for a refusal or a ``state`` that is not this request's."""
        if not callback.startswith(self.redirect_uri + "?"):
            raise VgwError(f"consent service sent the owner to {callback.split('?')[0]!r}, not to the app")
        answer = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(callback).query))
        if answer.get("state") != self.state:  # RFC 6749 section 10.12: not the answer to our request
            raise VgwError("consent service: the answer's state is not the app's request's")
        if "code" not in answer:
            raise VgwError(f"consent service refused the app: {answer.get('error', 'no code')}")
        basic = base64.b64encode(f"{urllib.parse.quote_plus(self.client_id)}:"
                                 f"{urllib.parse.quote_plus(self.client_secret)}".encode()).decode()
        reply = _expect(_send(self._http, f"{self.issuer}/token",
                              {"grant_type": "authorization_code", "code": answer["code"],
                               "redirect_uri": self.redirect_uri, "code_verifier": self.verifier},
                              {"Authorization": f"Basic {basic}", "Accept": "application/json"}),
                        200, "the token endpoint")
        token: dict[str, Any] = json.loads(reply.text)
        return token

    def grant_status(self, access_token: str) -> int:
        """HTTP status of ``GET /api/grant`` with the token: 200 while the owner allows, 401 once withdrawn."""
        return _send(self._http, f"{self.issuer}/api/grant", headers={"Authorization": f"Bearer {access_token}"}
                     ).status


class LocalService:
    """``vgw cloud serve --config CONFIG`` in this process, on a thread of its own (the demo's service).

    Thread: :meth:`start` and :meth:`stop` belong to the caller; the service's thread runs cheroot, whose
    worker threads answer requests, and the service's push worker (docs/consent-service.md, "Delivery").
    """

    def __init__(self, config: Path) -> None:
        from vgw.cloud.service.config import load_service_config
        from vgw.cloud.service.server import ConsentService

        self.cfg = load_service_config(config)
        self._service = ConsentService(self.cfg)
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="vgw-demo-service", daemon=True)

    def _serve(self) -> None:
        try:
            self._service.serve(self._ready)
        except BaseException as exc:  # handed to start(), which raises it on the caller's thread
            self._failed = exc
            self._ready.set()

    def start(self, timeout: float = 30.0) -> LocalService:
        """Listen; return once requests are answered. Raises the service's ConfigError (a port taken, ...)."""
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise VgwError(f"consent service not listening after {timeout:g} s")
        if self._failed is not None:
            self._thread.join(10)
            raise self._failed
        return self

    @property
    def issuer(self) -> str:
        return self.cfg.issuer

    def stop(self) -> None:
        if self._thread.is_alive():
            self._service.stop()
            self._thread.join(20)
