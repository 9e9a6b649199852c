"""The owner's consent service (`vgw cloud serve`, README "The owner's consent service") driven as its users
drive it: the app through Authlib's OAuth 2.0 client (authorization code + PKCE S256), the owner through HTTP
forms with their CSRF tokens, the service as a real process on a free loopback port, pushing to a real
mosquitto over mutual TLS. Every refusal of RFC 6749 the service owes has a test here; the car's side (a real
agent starts and stops sending, the erasure receipt) is at the end, and in a real browser in
tests/test_consent_service_browser.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests
from authlib.integrations.base_client.errors import OAuthError
from authlib.oauth2.rfc6749 import MismatchingStateException
from cryptography.hazmat.primitives import serialization
from vgw.contract.consent.verifier import verify_consent
from vgw_sim.broker import Mosquitto
from vgw_sim.pki import TestPKI

from tests.agentkit import agent_process, connected_cloud, vgw, wait_until, write_config
from tests.faultkit import record_trace
from tests.servicekit import (
    APP_NAME,
    DEVICE,
    PURPOSE,
    Owner,
    ServiceDir,
    authorize_url,
    make_service_dir,
    retained_consent,
    service_process,
)

pytestmark = pytest.mark.xdist_group("consent-service")  # one worker: the module's broker and service start once


@pytest.fixture(scope="module")
def mod_broker(pki: TestPKI) -> Iterator[Mosquitto]:
    mosq = Mosquitto.from_pki(pki)
    try:
        mosq.start()
        yield mosq
    finally:
        mosq.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, mod_broker: Mosquitto) -> Iterator[ServiceDir]:
    sd = make_service_dir(tmp_path_factory.mktemp("svc"), pki, mod_broker.port)
    with service_process(sd):
        yield sd


@pytest.fixture
def owner(service: ServiceDir) -> Owner:
    o = Owner(service)
    assert o.sign_in().status_code == 303
    return o


def _grant_ids(token: str | None) -> set[str]:
    """The grant ids of a document (unverified: a test's look; the car's verifier is :func:`_verified`)."""
    if not token:
        return set()
    return {g["id"] for g in jwt.decode(token, options={"verify_signature": False})["grants"]}


def _query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def _trust_key(sd: ServiceDir) -> object:
    return serialization.load_pem_public_key(sd.trust.read_bytes())


def _verified(sd: ServiceDir, token: str) -> object:
    """The car's own verifier on a document the service pushed."""
    return verify_consent(token, trust_keys=[_trust_key(sd)], device=DEVICE, now=time.time())  # type: ignore[list-item]


# ---------------------------------------------------------------- the flow


def test_metadata_is_rfc8414(service: ServiceDir) -> None:
    meta = requests.get(f"{service.issuer}/.well-known/oauth-authorization-server", timeout=10).json()
    assert meta["issuer"] == service.issuer
    assert meta["authorization_endpoint"] == f"{service.issuer}/authorize"
    assert meta["token_endpoint"] == f"{service.issuer}/token"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert set(meta["scopes_supported"]) == {
        "read_vehicle_info", "read_vin", "read_odometer", "read_fuel", "read_battery", "read_charge",
        "read_engine_oil", "read_tires", "read_diagnostics", "read_speedometer", "read_thermometer",
        "read_location", "read_compass", "read_security", "read_climate"}


def test_allow_gives_the_app_a_token_for_its_grant_and_the_car_a_signed_document(
        service: ServiceDir, owner: Owner, pki: TestPKI, mod_broker: Mosquitto) -> None:
    client = service.client(scope="read_speedometer read_location")
    url, state, verifier = authorize_url(service, client)
    page = owner.open(url)
    # the consent page: the app, its purpose, each scope in the owner's report's words, the car's limits
    assert APP_NAME in page.text and PURPOSE in page.text
    assert "Speed: every reading" in page.text
    assert "Location (position of the car): every reading (at most one reading every 5 s; position rounded to " \
           "100 m)" in page.text
    assert ">Allow</button>" in page.text and ">Deny</button>" in page.text
    answer = owner.decide(url, "allow")
    assert answer.status_code == 302 and answer.headers["Location"].startswith(service.redirect_uri + "?")
    token = client.fetch_token(f"{service.issuer}/token", authorization_response=answer.headers["Location"],
                               code_verifier=verifier, state=state)
    assert token["token_type"] == "Bearer"  # noqa: S105 - the token type, no secret
    assert token["access_token"] and token["device"] == DEVICE
    gid = token["grant_id"]
    # the document the broker holds for the car passes the car's own verifier and holds the grant as allowed
    doc = wait_until(lambda: (t := retained_consent(pki, mod_broker.port)) and gid in _grant_ids(t) and t, 15)
    assert doc
    consent = _verified(service, doc)
    granted = {g.id: g for g in consent.grants}  # type: ignore[attr-defined]
    assert set(granted[gid].scopes) == {"read_speedometer", "read_location"}
    app_key = json.loads((service.root / "keys" / "recipients" / "insurer.pub.json").read_text())
    assert granted[gid].controller == "com.example.insurer"
    from vgw.cloud.consent_authority import b64url
    assert b64url(granted[gid].recipient.pk) == app_key["pk"]
    # the app may ask which grant its token stands for
    me = requests.get(f"{service.issuer}/api/grant", headers={"Authorization": f"Bearer {token['access_token']}"},
                      timeout=10).json()
    assert me["grant_id"] == gid and me["device"] == DEVICE and me["delivered"] is True
    # a second allow: a new version above the first, still holding the first grant
    url2, state2, _verifier2 = authorize_url(service, service.client(scope="read_odometer"))
    answer2 = owner.decide(url2, "allow")
    assert _query(answer2.headers["Location"])["state"] == state2
    doc2 = wait_until(lambda: (t := retained_consent(pki, mod_broker.port)) and t != doc and t, 15)
    consent2 = _verified(service, doc2)
    assert consent2.ver > consent.ver  # type: ignore[attr-defined]
    assert gid in {g.id for g in consent2.grants}  # type: ignore[attr-defined]


def test_withdraw_signs_a_document_without_the_grant_and_revokes_its_token(
        service: ServiceDir, owner: Owner, pki: TestPKI, mod_broker: Mosquitto) -> None:
    client = service.client(scope="read_fuel")
    url, state, verifier = authorize_url(service, client)
    token = client.fetch_token(f"{service.issuer}/token", code_verifier=verifier, state=state,
                               authorization_response=owner.decide(url, "allow").headers["Location"])
    gid = token["grant_id"]
    assert gid in owner.home()
    assert owner.withdraw(gid).status_code == 303
    doc = wait_until(lambda: (t := retained_consent(pki, mod_broker.port)) and gid not in _grant_ids(t) and t, 15)
    assert doc and gid not in {g.id for g in _verified(service, doc).grants}  # type: ignore[attr-defined]
    home = owner.home()
    assert "Withdrawn" in home and "Waiting for your car's erasure receipt" in home
    assert "Withdrawn: Fuel level" in home and "Allowed: Fuel level" in home  # the history
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert requests.get(f"{service.issuer}/api/grant", headers=bearer, timeout=10).status_code == 401


# ---------------------------------------------------------------- refusals (RFC 6749 §4.1.2.1, RFC 6749 §5.2)


def test_deny_redirects_access_denied_and_signs_nothing(service: ServiceDir, owner: Owner, pki: TestPKI,
                                                          mod_broker: Mosquitto) -> None:
    before = retained_consent(pki, mod_broker.port, timeout=2)
    url, state, _verifier = authorize_url(service, service.client(scope="read_vin"))
    answer = owner.decide(url, "deny")
    assert answer.status_code == 302
    q = _query(answer.headers["Location"])
    assert q["error"] == "access_denied" and q["state"] == state and "code" not in q
    assert retained_consent(pki, mod_broker.port, timeout=2) == before
    assert "Vehicle identification number" not in owner.home()


def test_a_callback_with_another_state_is_refused_by_the_client(service: ServiceDir, owner: Owner) -> None:
    client = service.client()
    url, state, verifier = authorize_url(service, client)
    location = owner.decide(url, "allow").headers["Location"]
    assert _query(location)["state"] == state  # the service echoes exactly what the app sent
    with pytest.raises(MismatchingStateException):
        client.fetch_token(f"{service.issuer}/token", authorization_response=location, code_verifier=verifier,
                           state=state + "x")


def test_a_request_without_state_is_refused(service: ServiceDir, owner: Owner) -> None:
    client = service.client()
    url, state, _v = authorize_url(service, client)
    url = url.replace(f"&state={state}", "").replace(f"state={state}&", "")
    answer = owner.open(url)
    assert answer.status_code == 302 and _query(answer.headers["Location"])["error"] == "invalid_request"


def test_a_code_works_once_and_its_reuse_revokes_the_token(service: ServiceDir, owner: Owner) -> None:
    client = service.client()
    url, state, verifier = authorize_url(service, client)
    location = owner.decide(url, "allow").headers["Location"]
    token = client.fetch_token(f"{service.issuer}/token", authorization_response=location, code_verifier=verifier,
                               state=state)
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert requests.get(f"{service.issuer}/api/grant", headers=bearer, timeout=10).ok
    with pytest.raises(OAuthError) as refused:
        service.client().fetch_token(f"{service.issuer}/token", authorization_response=location,
                                     code_verifier=verifier)
    assert refused.value.error == "invalid_grant"
    # RFC 6749 §4.1.2: a code used twice was stolen; what it gave is revoked
    assert requests.get(f"{service.issuer}/api/grant", headers=bearer, timeout=10).status_code == 401


def test_a_wrong_pkce_verifier_is_refused(service: ServiceDir, owner: Owner) -> None:
    client = service.client()
    url, state, verifier = authorize_url(service, client)
    location = owner.decide(url, "allow").headers["Location"]
    with pytest.raises(OAuthError) as refused:
        client.fetch_token(f"{service.issuer}/token", authorization_response=location,
                           code_verifier=verifier[::-1], state=state)
    assert refused.value.error == "invalid_grant"


@pytest.mark.parametrize("change", ["no challenge", "plain"])
def test_pkce_s256_is_required(service: ServiceDir, owner: Owner, change: str) -> None:
    from authlib.integrations.requests_client import OAuth2Session

    plain = OAuth2Session(service.client_id, service.client_secret, scope="read_fuel",
                          redirect_uri=service.redirect_uri,
                          code_challenge_method="plain" if change == "plain" else None)
    url, _state = plain.create_authorization_url(
        f"{service.issuer}/authorize", **({"code_verifier": "v" * 50} if change == "plain" else {}))
    answer = owner.open(url)
    assert answer.status_code == 302 and _query(answer.headers["Location"])["error"] == "invalid_request"


def test_the_implicit_grant_is_refused(service: ServiceDir, owner: Owner) -> None:
    # RFC 9700 §2.1.2: no access token in a redirect URI
    url, _state, _v = authorize_url(service, service.client(), response_type="token")
    answer = owner.open(url)
    assert answer.status_code == 302
    q = _query(answer.headers["Location"])
    assert q["error"] == "unsupported_response_type" and "access_token" not in answer.headers["Location"]


def test_an_unknown_client_is_refused_without_a_redirect(service: ServiceDir, owner: Owner) -> None:
    from authlib.integrations.requests_client import OAuth2Session

    stranger = OAuth2Session("com.example.stranger", "x", scope="read_fuel", redirect_uri=service.redirect_uri,
                             code_challenge_method="S256")
    url, _state = stranger.create_authorization_url(f"{service.issuer}/authorize", code_verifier="v" * 50)
    answer = owner.open(url)
    assert answer.status_code == 400 and "Location" not in answer.headers
    assert "invalid_client" in answer.text
    # and its secret cannot buy a token either
    token = requests.post(f"{service.issuer}/token", data={"grant_type": "authorization_code", "code": "x"},
                          auth=("com.example.stranger", "x"), timeout=10)
    assert token.status_code == 401 and token.json()["error"] == "invalid_client"


@pytest.mark.parametrize("suffix", ["/other", "x", "?next=evil", "/../evil"])
def test_an_unregistered_redirect_uri_is_refused_without_a_redirect(service: ServiceDir, owner: Owner,
                                                                      suffix: str) -> None:
    client = service.client()
    client.redirect_uri = service.redirect_uri + suffix
    url, _state, _v = authorize_url(service, client)
    answer = owner.open(url)
    assert answer.status_code == 400 and "Location" not in answer.headers


def test_forms_without_their_csrf_token_are_refused(service: ServiceDir, owner: Owner) -> None:
    url, _state, _v = authorize_url(service, service.client(scope="read_tires"))
    assert owner.open(url).status_code == 200
    answer = owner.http.post(url, data={"decision": "allow"}, allow_redirects=False, timeout=10)
    assert answer.status_code == 400
    answer = owner.http.post(url, data={"decision": "allow", "csrf_token": "forged"}, allow_redirects=False,
                             timeout=10)
    assert answer.status_code == 400 and "Tyre" not in owner.home()
    login = requests.post(f"{service.issuer}/login", data={"username": "alice", "password": "x"}, timeout=10)
    assert login.status_code == 400


def test_session_cookie_is_httponly_and_samesite(service: ServiceDir) -> None:
    answer = Owner(service).sign_in()
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback here; over HTTPS the cookie is Secure (__Host-)


def test_over_https_the_cookie_is_secure_and_host_bound(tmp_path: Path, pki: TestPKI, broker: Mosquitto) -> None:
    sd = make_service_dir(tmp_path, pki, broker.port, https=True)
    with service_process(sd):
        owner = Owner(sd)
        cookie = owner.sign_in().headers["Set-Cookie"]
        assert cookie.startswith("__Host-vgw-session=") and "Secure" in cookie and "HttpOnly" in cookie
        client = sd.client(scope="read_fuel")
        url, state, verifier = authorize_url(sd, client)
        token = client.fetch_token(f"{sd.issuer}/token", code_verifier=verifier, state=state,
                                   authorization_response=owner.decide(url, "allow").headers["Location"])
        assert token["device"] == DEVICE
        meta = requests.get(f"{sd.issuer}/.well-known/oauth-authorization-server", verify=sd.verify, timeout=10)
        assert meta.json()["token_endpoint"].startswith("https://")
        with pytest.raises(requests.ConnectionError):  # plain HTTP is not served on the HTTPS port
            requests.get(f"http://127.0.0.1:{sd.port}/", timeout=10)


def test_an_unsigned_in_owner_is_sent_to_sign_in_first(service: ServiceDir) -> None:
    url, _state, _v = authorize_url(service, service.client())
    answer = requests.get(url, allow_redirects=False, timeout=10)
    assert answer.status_code == 303 and answer.headers["Location"].startswith("/login?next=%2Fauthorize")


# ---------------------------------------------------------------- a stricter service of its own


def test_expired_codes_and_password_guessing_are_refused(tmp_path: Path, pki: TestPKI, broker: Mosquitto) -> None:
    sd = make_service_dir(tmp_path, pki, broker.port, code_ttl_s=1, login_attempts=3)
    with service_process(sd):
        owner = Owner(sd)
        assert owner.sign_in().status_code == 303
        client = sd.client()
        url, state, verifier = authorize_url(sd, client)
        location = owner.decide(url, "allow").headers["Location"]
        issued = time.monotonic()
        wait_until(lambda: time.monotonic() - issued > 1.5, 5)
        with pytest.raises(OAuthError) as refused:
            client.fetch_token(f"{sd.issuer}/token", authorization_response=location, code_verifier=verifier,
                               state=state)
        assert refused.value.error == "invalid_grant"
        # sign-in: three wrong passwords, then even the right one waits
        guesser = Owner(sd)
        wrong = "guess"
        assert [guesser.sign_in(password=wrong).status_code for _ in range(3)] == [401, 401, 401]
        locked = guesser.sign_in()
        assert locked.status_code == 429 and "Too many failed attempts" in locked.text
        log = (sd.root / "serve.log").read_text()
        assert "alice" not in log and "guess" not in log  # no personal data in the log


def test_a_push_the_broker_did_not_acknowledge_is_shown_pending_and_retried(
        tmp_path: Path, pki: TestPKI, broker: Mosquitto) -> None:
    sd = make_service_dir(tmp_path, pki, broker.port)
    with service_process(sd):
        owner = Owner(sd)
        assert owner.sign_in().status_code == 303
        assert wait_until(lambda: "connected to the broker" in (sd.root / "serve.log").read_text(), 20)
        broker.stop()
        url, _state, _verifier = authorize_url(sd, sd.client(scope="read_climate"))
        answer = owner.decide(url, "allow")
        assert answer.status_code == 302 and "code" in _query(answer.headers["Location"])
        assert ">pending</span>" in owner.home()
        broker.start()
        assert wait_until(lambda: "delivered to the broker" in owner.home(), 30)
        doc = retained_consent(pki, broker.port)
        assert doc and "read_climate" in json.dumps(
            [g.scopes for g in _verified(sd, doc).grants])  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the command line


def test_cli_refuses_bad_input_with_one_line(tmp_path: Path, pki: TestPKI, broker: Mosquitto) -> None:
    sd = make_service_dir(tmp_path, pki, broker.port)
    recipient = str(sd.root / "keys" / "recipients" / "insurer.pub.json")
    again = vgw("cloud", "app", "add", "--config", str(sd.config), "--id", "com.example.insurer", "--name", "X",
                "--redirect-uri", "https://app.example.com/cb", "--recipient", recipient)
    assert again.returncode == 1 and "already registered" in again.stderr and len(again.stderr.splitlines()) == 1
    http = vgw("cloud", "app", "add", "--config", str(sd.config), "--id", "a2", "--name", "X",
               "--redirect-uri", "http://app.example.com/cb", "--recipient", recipient)
    assert http.returncode == 1 and "--redirect-uri" in http.stderr
    nokey = vgw("cloud", "app", "add", "--config", str(sd.config), "--id", "a3", "--name", "X",
                "--redirect-uri", "https://app.example.com/cb", "--recipient", str(sd.config))
    assert nokey.returncode == 1 and "--recipient" in nokey.stderr
    empty = vgw("cloud", "owner", "add", "--config", str(sd.config), "--id", "bob", "--device", "dev-0002", input="")
    assert empty.returncode == 1 and "stdin" in empty.stderr
    bad = sd.root / "bad.toml"
    bad.write_text(sd.config.read_text().replace("[service]\n", "[service]\nlisten_port = 1\n"))
    typo = vgw("cloud", "serve", "--config", str(bad))
    assert typo.returncode == 1 and "listen_port" in typo.stderr and "Traceback" not in typo.stderr
    # the password is stored as an scrypt hash, never as given
    db = (sd.root / "consent.sqlite").read_bytes()
    assert b"correct horse" not in db and b"scrypt$" in db


# ---------------------------------------------------------------- the car


def test_the_owner_sees_when_the_car_refuses_the_document(tmp_path: Path, pki: TestPKI, broker: Mosquitto) -> None:
    sd = make_service_dir(tmp_path, pki, broker.port)
    from vgw.cloud.consent_authority import SigningKey

    stranger = SigningKey.generate().write_public_pem(tmp_path / "another-signer.pub.pem")
    cfg = write_config(tmp_path, pki, broker.port, stranger,
                       can={"replay": str(record_trace(tmp_path, 5.0)), "replay_loop": True})
    with service_process(sd), agent_process(cfg):  # a car that trusts another signer, not this service
        owner = Owner(sd)
        assert owner.sign_in().status_code == 303
        url, _state, _v = authorize_url(sd, sd.client(scope="read_fuel"))
        assert owner.decide(url, "allow").status_code == 302
        assert wait_until(lambda: "refused by your car" in owner.home(), 40), owner.home()
        assert "applied by your car" not in owner.home()


def test_the_car_sends_for_an_allowed_grant_and_erases_when_withdrawn(
        tmp_path: Path, pki: TestPKI, broker: Mosquitto) -> None:
    sd = make_service_dir(tmp_path, pki, broker.port)
    trace = record_trace(tmp_path, 20.0)
    cfg = write_config(tmp_path, pki, broker.port, sd.trust,
                       can={"replay": str(trace), "replay_rate": 2.0, "replay_loop": True})
    from vgw.cloud.cloudkit import load_recipient_keys

    app_key = load_recipient_keys([sd.app_key])["insurer"]
    with service_process(sd), connected_cloud(broker, pki) as app_side, agent_process(cfg):
        owner = Owner(sd)
        assert owner.sign_in().status_code == 303
        client = sd.client(scope="read_speedometer")
        url, state, verifier = authorize_url(sd, client)
        token = client.fetch_token(f"{sd.issuer}/token", code_verifier=verifier, state=state,
                                   authorization_response=owner.decide(url, "allow").headers["Location"])
        gid = token["grant_id"]
        app_side.add_recipient(gid, app_key)
        # allow -> the car sends speed for this grant, sealed to the app's key
        assert app_side.wait_for(lambda: len(app_side.batches(DEVICE, gid)) >= 2, 40)
        paths = {s["path"] for b in app_side.batches(DEVICE, gid) for s in b.samples}
        assert paths == {"Vehicle.Speed"}
        # withdraw -> the car stops, erases, and the owner's page shows its verified receipt
        assert owner.withdraw(gid).status_code == 303
        assert wait_until(lambda: "signature verified" in owner.home(), 40), owner.home()
        status = json.loads(vgw("status", "--config", str(cfg), "--json").stdout)
        assert gid not in {g["id"] for g in status["grants"]}
        erasures = [r for r in app_side.receipts(DEVICE, "erasure") if r.claims.get("grant") == gid]
        assert erasures and erasures[0].claims["key_destroyed"] is True
        count = len(app_side.batches(DEVICE, gid))
        time.sleep(2.0)  # a negative check: nothing more arrives for the withdrawn grant
        assert len(app_side.batches(DEVICE, gid)) == count
