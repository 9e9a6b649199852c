"""Helpers for tests of the owner's consent service (`vgw cloud serve`): lay out its folder (signing key, app
key, device certificates, config), register an app and an owner through the CLI, run the service as a real
process on a free loopback port, and act as the owner's browser over HTTP (requests) or as the app (Authlib's
OAuth 2.0 client)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from vgw_sim.nats_cluster import stable_port
from vgw_sim.pki import TestPKI

from tests.agentkit import ROOT, stop_process, vgw, wait_until

OWNER, PASSWORD, DEVICE = "alice", "correct horse battery staple", "dev-0001"
APP_ID, APP_NAME, PURPOSE = "com.example.insurer", "Example Insurance", "Pay-as-you-drive insurance premium"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def free_port() -> int:
    """A free loopback port for a server started later (the service, PostgreSQL): below the kernel's ephemeral
    range, where the local port of some test's outgoing connection cannot take it meanwhile (a port from
    ``bind(0)`` once was, and the service could not listen: "Address already in use")."""
    return stable_port()


@dataclass
class ServiceDir:
    """A service's folder: ``service.toml``, keys, ``devices/<id>.crt``; the app's client id, secret, key."""

    root: Path
    config: Path
    port: int
    issuer: str
    redirect_uri: str
    client_id: str
    client_secret: str
    app_key: Path  # the app's recipient private key (opens its telemetry)
    trust: Path  # the signing key's public key: what the car trusts
    verify: str | bool = True  # the CA that verifies the service's HTTPS certificate

    def client(self, scope: str = "read_speedometer read_odometer", **kw: Any) -> OAuth2Session:
        """The app's OAuth 2.0 client (Authlib), PKCE S256."""
        session = OAuth2Session(self.client_id, self.client_secret, scope=scope, redirect_uri=self.redirect_uri,
                                code_challenge_method="S256", **kw)
        session.verify = self.verify
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify; loopback needs no proxy
        return session


def make_service_dir(tmp: Path, pki: TestPKI, broker_port: int, *, database: str = "consent.sqlite",
                     https: bool = False, **service: Any) -> ServiceDir:
    root = tmp / "service"
    root.mkdir()
    keys = root / "keys"
    assert vgw("cloud", "keygen", "--dir", str(keys), "--recipient", "insurer").returncode == 0
    devices = root / "devices"
    devices.mkdir()
    for device_id, paths in pki.devices.items():
        shutil.copy(paths.cert, devices / f"{device_id}.crt")
    port = free_port()
    issuer = f"{'https' if https else 'http'}://127.0.0.1:{port}"
    if https:
        service |= {"tls_cert": str(pki.server.cert), "tls_key": str(pki.server.key)}
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in service.items())
    config = root / "service.toml"
    config.write_text(f"""[service]
listen = "127.0.0.1:{port}"
issuer = "{issuer}"
database = "{database}"
signing_key = "keys/consent-signer.key"
device_certs = "devices"
{extra}
[broker]
host = "localhost"
port = {broker_port}
ca_file = "{pki.ca.cert}"
cert_file = "{pki.cloud.cert}"
key_file = "{pki.cloud.key}"
""")
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    out = vgw("cloud", "app", "add", "--config", str(config), "--id", APP_ID, "--name", APP_NAME,
              "--redirect-uri", redirect_uri, "--recipient", str(keys / "recipients" / "insurer.pub.json"),
              "--purpose", PURPOSE)
    assert out.returncode == 0, out.stderr
    creds = json.loads(out.stdout)
    owner = vgw("cloud", "owner", "add", "--config", str(config), "--id", OWNER, "--device", DEVICE,
                input=PASSWORD + "\n")
    assert owner.returncode == 0, owner.stderr
    return ServiceDir(root, config, port, issuer, redirect_uri, creds["client_id"], creds["client_secret"],
                      keys / "recipients" / "insurer.key", keys / "consent-signer.pub.pem",
                      str(pki.ca.cert) if https else True)


@contextmanager
def service_process(sd: ServiceDir) -> Iterator[subprocess.Popen[str]]:
    """`vgw cloud serve --config` as a child process, answering HTTP when the block starts."""
    log = open(sd.root / "serve.log", "a")
    # no --log-level: `vgw cloud serve` logs its progress (INFO) by default, as `vgw run` does
    proc = subprocess.Popen([sys.executable, "-m", "vgw", "cloud", "serve", "--config", str(sd.config)],
                            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        def up() -> bool:
            try:
                return requests.get(f"{sd.issuer}/.well-known/oauth-authorization-server", timeout=2,
                                    verify=sd.verify).ok
            except requests.ConnectionError:
                assert proc.poll() is None, (sd.root / "serve.log").read_text()
                return False
        assert wait_until(up, 30, 0.1), (sd.root / "serve.log").read_text()
        yield proc
        proc.terminate()  # SIGTERM: a clean stop, exit 0
        assert proc.wait(20) == 0, (sd.root / "serve.log").read_text()
    finally:
        stop_process(proc, 15)
        log.close()


def csrf_of(page: str) -> str:
    found = _CSRF.search(page)
    assert found, page
    return found.group(1)


class Owner:
    """The car's owner in a browser, as plain HTTP: a cookie jar, forms with their CSRF tokens."""

    def __init__(self, sd: ServiceDir) -> None:
        self.sd = sd
        self.http = requests.Session()
        self.http.verify = sd.verify
        self.http.trust_env = False  # REQUESTS_CA_BUNDLE would override verify; loopback needs no proxy

    def sign_in(self, username: str = OWNER, password: str = PASSWORD) -> requests.Response:
        page = self.http.get(f"{self.sd.issuer}/login", timeout=10)
        return self.http.post(f"{self.sd.issuer}/login", timeout=30, allow_redirects=False,
                              data={"username": username, "password": password, "csrf_token": csrf_of(page.text)})

    def open(self, url: str) -> requests.Response:
        return self.http.get(url, timeout=10, allow_redirects=False)

    def decide(self, authorize_url: str, decision: str) -> requests.Response:
        """Open the consent page at ``authorize_url`` and press Allow or Deny; returns the service's answer."""
        page = self.open(authorize_url)
        assert page.status_code == 200, page.text
        return self.http.post(authorize_url, data={"decision": decision, "csrf_token": csrf_of(page.text)},
                              timeout=30, allow_redirects=False)

    def home(self) -> str:
        page = self.http.get(f"{self.sd.issuer}/", timeout=10)
        assert page.status_code == 200
        return page.text

    def withdraw(self, grant_id: str) -> requests.Response:
        page = self.home()
        return self.http.post(f"{self.sd.issuer}/withdraw", data={"grant": grant_id, "csrf_token": csrf_of(page)},
                              timeout=30, allow_redirects=False)


def authorize_url(sd: ServiceDir, client: OAuth2Session, **params: Any) -> tuple[str, str, str]:
    """(url, state, code_verifier) of a fresh authorization request of ``client``."""
    verifier = generate_token(48)
    url, state = client.create_authorization_url(f"{sd.issuer}/authorize", code_verifier=verifier, **params)
    return url, state, verifier


def retained_consent(pki: TestPKI, broker_port: int, device: str = DEVICE, timeout: float = 15.0) -> str | None:
    """The consent document the broker holds retained for ``device`` (read as the cloud identity), or None."""
    import threading

    from vgw.cloud.mqttclient import make_client
    from vgw.transport.tlsctx import client_context

    got: list[str] = []
    done = threading.Event()
    client = make_client(f"test-reader-{os.getpid()}-{free_port()}", "5",
                         client_context(pki.ca.cert, pki.cloud.cert, pki.cloud.key), False)

    def on_connect(c: Any, *_a: Any) -> None:
        c.subscribe(f"vgw/{device}/consent", qos=1)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.retain and msg.payload:
            got.append(msg.payload.decode())
            done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("localhost", broker_port)
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[-1] if got else None
