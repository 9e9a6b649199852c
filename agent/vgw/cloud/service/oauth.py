"""Authlib's OAuth 2.0 authorization server over the service's store: the authorization code grant
(RFC 6749 §4.1) with PKCE ``S256`` required for every client (RFC 7636; RFC 9700 §2.1.1), ``state`` required, the
redirect URI matched exactly as registered (RFC 9700 §4.1.3), codes single-use and short-lived (a second
exchange also revokes the token of the first, RFC 6749 §4.1.2), confidential clients only.

Authlib raises its OAuth2Error kinds; :func:`make_authorization_server` returns the Flask integration, whose
responses are the errors of RFC 6749 §4.1.2.1 and RFC 6749 §5.2.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, InvalidRequestError, grants
from authlib.oauth2.rfc7636 import CodeChallenge
from flask import Flask, g

from vgw.cloud.service.store import App, Store, digest
from vgw.contract.scopes import SCOPES

__all__ = ["Client", "make_authorization_server"]

AUTH_METHODS = ("client_secret_basic", "client_secret_post")


@dataclass(frozen=True)
class Client(ClientMixin):  # type: ignore[misc]
    """A registered app as Authlib sees it."""

    app: App

    def get_client_id(self) -> str:
        return self.app.client_id

    def get_default_redirect_uri(self) -> str:
        return self.app.redirect_uri

    def get_allowed_scope(self, scope: str | None) -> str:
        return " ".join(s for s in (scope or "").split() if s in SCOPES)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        # Exact string match, no prefix or pattern (RFC 9700 §4.1.3: open redirectors and code leaks).
        return bool(redirect_uri == self.app.redirect_uri)

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(digest(client_secret), self.app.secret_digest)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in AUTH_METHODS

    def check_response_type(self, response_type: str) -> bool:
        return bool(response_type == "code")

    def check_grant_type(self, grant_type: str) -> bool:
        return bool(grant_type == "authorization_code")


@dataclass(frozen=True)
class Code:
    """An authorization code as Authlib sees it (AuthorizationCodeMixin's methods)."""

    row: dict[str, Any]

    @property
    def code_challenge(self) -> str:
        return str(self.row["challenge"])

    @property
    def code_challenge_method(self) -> str:
        return str(self.row["method"])

    def get_redirect_uri(self) -> str:
        return str(self.row["redirect_uri"])

    def get_scope(self) -> str:
        return str(self.row["scope"])

    def get_auth_time(self) -> int:
        return int(self.row["issued"])

    def get_nonce(self) -> None:
        return None


class S256Challenge(CodeChallenge):  # type: ignore[misc]
    """PKCE with ``S256`` only, required of every client (RFC 9700 §2.1.1), and ``state`` required too."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]  # noqa: RUF012 - Authlib's class attribute

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("Missing 'code_challenge': PKCE is required")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("'code_challenge_method' must be S256")
        # state binds the answer to the app's own request (RFC 6749 §10.12: CSRF against the app's callback)
        if not grant.request.payload.state:
            raise InvalidRequestError("Missing 'state'")
        super().validate_code_challenge(grant, redirect_uri)


def make_authorization_server(app: Flask, store: Store, *, code_ttl_s: float) -> AuthorizationServer:
    """The authorization server of ``app``. A request that allows must put the new grant's id in
    ``flask.g.grant_id`` before it creates the authorization response."""

    class CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
        TOKEN_ENDPOINT_AUTH_METHODS = list(AUTH_METHODS)  # noqa: RUF012 - Authlib's class attribute

        def save_authorization_code(self, code: str, request: Any) -> None:
            data = request.payload.data
            store.add_code(code, client_id=request.client.get_client_id(),
                           redirect_uri=request.payload.redirect_uri or request.client.get_default_redirect_uri(),
                           scope=request.scope, challenge=data["code_challenge"], method="S256",
                           owner=request.user, grant_id=g.grant_id, ttl_s=code_ttl_s)

        def query_authorization_code(self, code: str, client: Client) -> Code | None:
            row = store.code(code)
            if row is None or row["client_id"] != client.get_client_id():
                return None
            if not store.use_code(row["digest"]):
                # A code exchanged twice was stolen or replayed: revoke what the first exchange issued.
                store.revoke_tokens_of_code(row["digest"])
                return None
            if row["expires"] < time.time():
                return None
            request = self.request
            request.vgw_code = row  # for save_token
            return Code(row)

        def delete_authorization_code(self, authorization_code: Code) -> None:
            """Already marked used when it was looked up (single use even if the exchange then fails)."""

        def authenticate_user(self, authorization_code: Code) -> str:
            return str(authorization_code.row["owner"])

    def query_client(client_id: str) -> Client | None:
        found = store.app(client_id)
        return Client(found) if found else None

    def save_token(token: dict[str, Any], request: Any) -> None:
        row = request.vgw_code
        grant_row = store.grant(row["grant_id"])
        store.add_token(token["access_token"], client_id=row["client_id"], grant_id=row["grant_id"],
                        code_digest=row["digest"], scope=row["scope"], ttl_s=float(token.get("expires_in", 3600)))
        # README "The owner's consent service": the app learns its grant and device, so its telemetry topic
        token["grant_id"] = row["grant_id"]
        token["device"] = grant_row.device if grant_row else None

    server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
    server.scopes_supported = sorted(SCOPES)
    server.register_grant(CodeGrant, [S256Challenge(required=True)])
    return server
