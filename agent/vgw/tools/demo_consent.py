"""Who signs the consent in `vgw demo` (README "Your own dev stack" tells the same for a kept stack).

- :class:`ServiceConsent`: the owner's consent service (docs/consent-service.md) runs in the demo's process;
  each app asks through OAuth 2.0 (authorization code + PKCE), the owner signs in and presses Allow, later
  Withdraw, all over HTTP as a browser and an app would (:mod:`vgw.tools.service_play`); the service signs,
  verifies and pushes each document, and its owner's page shows the car's erasure receipt.
- :class:`PeerConsent`: without the ``service`` extra, the reference cloud peer signs and publishes the
  documents itself (the demo as it was before the service existed).

Both hand the demo the same thing: the live grants (:class:`LiveGrant`), a withdrawal, and checks to add to
the summary. Thread: the demo's main thread only.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgw.base.errors import VgwError
from vgw.contract.consent.model import DEFAULT_LIMITS

__all__ = ["APPS", "DEVICE", "REVOKED_APP", "LiveGrant", "PeerConsent", "ServiceConsent"]

DEVICE = "demo-car-01"
OWNER = "owner"
RECEIPT_WAIT_S = 10.0


@dataclass(frozen=True)
class DemoApp:
    """One of the demo's two apps: what it asks for, and (without the service) the grant the peer signs."""

    key: str  # its short name in the demo: fleet, insurer
    client_id: str  # its OAuth client id, the grant's controller
    name: str
    purpose: str
    scopes: tuple[str, ...]
    grant_id: str  # the peer's grant id (the service chooses its own)
    limits: dict[str, Any] = field(default_factory=dict)  # the peer's limits (the service leaves the car's)


APPS = (
    DemoApp("fleet", "com.example.fleet", "Example Fleet", "fleet-maintenance",
            ("read_odometer", "read_fuel", "read_tires", "read_location"), "g-fleet",
            {"read_location": {"max_hz": 0.5, "precision_m": 500}}),
    DemoApp("insurer", "com.example.insurer", "Example Insurance", "usage-based-insurance",
            ("read_speedometer", "read_odometer", "read_battery"), "g-insurer"),
)
REVOKED_APP = "insurer"


@dataclass(frozen=True)
class LiveGrant:
    """A grant the car holds in the demo: its id on the wire, its app, scopes and the limits the car applies."""

    id: str
    app: str
    controller: str
    purpose: str
    scopes: list[str]
    limits: dict[str, dict[str, float]]


def car_limits(scopes: list[str], own: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The limits the car enforces per scope: the grant's own, else its privacy defaults (README "Telemetry
    envelope")."""
    out: dict[str, dict[str, float]] = {}
    for s in scopes:
        hz, precision = DEFAULT_LIMITS.get(s, (None, None))
        mine = own.get(s, {})
        lim = {k: v for k, v in (("max_hz", mine.get("max_hz", hz)), ("precision_m", mine.get("precision_m",
                                                                                                 precision))) if v}
        if lim:
            out[s] = lim
    return out


Say = Callable[[str], None]


def _rel(path: Path, base: Path) -> Path:
    """``path`` relative to ``base`` (a kept demo's service config stays valid wherever its folder goes)."""
    return Path(os.path.relpath(path, base))


class PeerConsent:
    """The reference cloud peer signs and publishes the consent (no consent service)."""

    def __init__(self, root: Path, cloud: Any, missing: str) -> None:
        from vgw.cloud.consent_authority import RecipientKey, SigningKey

        self.cloud = cloud
        self.missing = missing
        self.signer = SigningKey.generate()
        self.trust = self.signer.write_public_pem(root / "consent-signer.pub.pem")
        self.recipients = {a.grant_id: RecipientKey.generate() for a in APPS}
        for gid, rk in self.recipients.items():
            cloud.add_recipient(gid, rk)
        self._doc: list[dict[str, Any]] = []

    def allow(self, say: Say) -> list[LiveGrant]:
        from vgw.cloud.consent_authority import consent_claims, grant, sign_consent

        self._doc = [grant(a.grant_id, a.scopes, self.recipients[a.grant_id], controller=a.client_id,
                           purpose=a.purpose, limits=a.limits or None) for a in APPS]
        self.cloud.publish_consent(DEVICE, sign_consent(consent_claims(DEVICE, 1, self._doc, iat=int(time.time())),
                                                        self.signer))
        say("cloud publishes consent v1 (retained): " + "; ".join(f"{a.grant_id} -> {', '.join(a.scopes)}"
                                                                  for a in APPS))
        return [LiveGrant(a.grant_id, a.key, a.client_id, a.purpose, list(a.scopes), car_limits(list(a.scopes),
                                                                                                a.limits))
                for a in APPS]

    def withdraw(self, grant: LiveGrant, say: Say) -> None:
        from vgw.cloud.consent_authority import consent_claims, sign_consent

        kept = [d for d in self._doc if d["id"] != grant.id]
        self.cloud.publish_consent(DEVICE, sign_consent(consent_claims(DEVICE, 2, kept, iat=int(time.time())),
                                                        self.signer))
        say(f"owner withdraws consent: cloud publishes v2 without {grant.id}")

    def checks(self, _grant: LiveGrant, _receipt: bool) -> dict[str, bool]:
        return {}

    def verdict(self, _checks: dict[str, bool]) -> str:
        return ""

    def describe(self, _checks: dict[str, bool]) -> dict[str, Any]:
        return {"shown": False, "reason": f"{self.missing} missing: pip install 'vgw[service]'"}

    def close(self) -> None:
        pass


class ServiceConsent:
    """The owner's consent service signs the consent; the demo plays the owner's browser and the two apps."""

    def __init__(self, root: Path, pki: Any, broker_port: int, cloud: Any) -> None:
        from vgw_sim.broker import free_port

        from vgw.cloud.cloudkit import keygen, load_recipient_keys
        from vgw.cloud.service.config import load_service_config
        from vgw.cloud.service.server import add_app, add_owner
        from vgw.tools.service_play import AppClient, LocalService, OwnerBrowser, service_config_text

        self.cloud = cloud
        base = root / "service"
        base.mkdir(mode=0o700)
        keygen(base / "keys", [a.key for a in APPS])
        self.trust = base / "keys" / "consent-signer.pub.pem"
        devices = base / "devices"
        devices.mkdir()
        (devices / f"{DEVICE}.crt").write_bytes(pki.devices[DEVICE].cert.read_bytes())
        self.keys = load_recipient_keys([base / "keys"])
        config = base / "service.toml"
        self.service: Any = None
        for attempt in range(3):  # a free port can be taken before the service binds it: another one then
            config.write_text(service_config_text(
                port=free_port(), database="consent.sqlite", signing_key=Path("keys/consent-signer.key"),
                device_certs=Path("devices"), broker_port=broker_port, ca=_rel(pki.ca.cert, base),
                cert=_rel(pki.cloud.cert, base), key=_rel(pki.cloud.key, base)))
            if attempt == 0:
                cfg = load_service_config(config)
                self.password = secrets.token_urlsafe(12)  # a throwaway demo's owner: shown on the screen
                add_owner(cfg, owner_id=OWNER, device=DEVICE, password=self.password)
                self.clients: dict[str, Any] = {}
                callback = f"http://127.0.0.1:{free_port()}/callback"  # nothing listens: the demo reads the redirect
                for a in APPS:
                    creds = add_app(cfg, client_id=a.client_id, name=a.name, redirect_uri=callback,
                                    recipient=base / "keys" / "recipients" / f"{a.key}.pub.json", purpose=a.purpose)
                    self.clients[a.key] = (a, creds["client_secret"], callback)
            try:
                self.service = LocalService(config).start()
                break
            except VgwError:
                if attempt == 2:
                    raise
        issuer = self.service.issuer
        self.issuer = issuer
        self.owner = OwnerBrowser(issuer)
        self.apps = {k: AppClient(issuer, a.client_id, secret, cb, list(a.scopes))
                     for k, (a, secret, cb) in self.clients.items()}
        self.tokens: dict[str, str] = {}

    def allow(self, say: Say) -> list[LiveGrant]:
        say(f"consent service (OAuth 2.0, PKCE S256) at {self.issuer}/  metadata "
            f"{self.issuer}/.well-known/oauth-authorization-server")
        say(f"the owner's page: {self.issuer}/  (user {OWNER}, password {self.password}; open it in a browser "
            "while the demo runs)")
        self.owner.sign_in(OWNER, self.password)
        grants = []
        for a in APPS:
            client = self.apps[a.key]
            url = client.authorize_url()
            say(f"{a.name} asks for {', '.join(a.scopes)}: the owner's browser opens {url}")
            token = client.exchange(self.owner.decide(url, "allow"))
            gid, device = str(token["grant_id"]), token.get("device")
            if device != DEVICE:
                raise VgwError(f"consent service gave {a.client_id} a grant for {device!r}, not {DEVICE}")
            self.tokens[a.key] = str(token["access_token"])
            self.cloud.add_recipient(gid, self.keys[a.key])  # the app opens its own grant's data, nothing else
            say(f"owner presses Allow: the service signs the car's next consent document with {gid} for "
                f"{a.client_id}, checks it with the car's verifier, pushes it (retained); the app's token names "
                f"{gid}")
            grants.append(LiveGrant(gid, a.key, a.client_id, a.purpose, list(a.scopes), car_limits(list(a.scopes),
                                                                                                    {})))
        return grants

    def withdraw(self, grant: LiveGrant, say: Say) -> None:
        self.owner.withdraw(grant.id)
        say(f"owner presses Withdraw for {grant.controller} on {self.issuer}/: the service signs and pushes the next "
            f"document without {grant.id}")

    def checks(self, grant: LiveGrant, receipt: bool) -> dict[str, bool]:
        """What the owner and the app see after the withdrawal: the car's verified erasure receipt on the owner's
        page (the service heard and verified it too), the app's token refused, the other app's still good."""
        deadline = time.monotonic() + (RECEIPT_WAIT_S if receipt else 0.0)
        shown = False
        while True:
            page = self.owner.page()
            shown = "Erasure receipt from your car, signature verified" in page and f'value="{grant.id}"' not in page
            if shown or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        others = [k for k in self.tokens if k != grant.app]
        return {
            "owner_page_shows_erasure_receipt": shown,
            "withdrawn_app_token_refused": self.apps[grant.app].grant_status(self.tokens[grant.app]) == 401,
            "other_app_token_valid": all(self.apps[k].grant_status(self.tokens[k]) == 200 for k in others),
        }

    def verdict(self, checks: dict[str, bool]) -> str:
        return ("owner's page shows the car's erasure receipt, signature verified: "
                f"{'yes' if checks.get('owner_page_shows_erasure_receipt') else 'NO'}; the withdrawn app's token "
                f"is refused (401): {'yes' if checks.get('withdrawn_app_token_refused') else 'NO'}")

    def describe(self, checks: dict[str, bool]) -> dict[str, Any]:
        return {"shown": True, "url": f"{self.issuer}/",
                "metadata": f"{self.issuer}/.well-known/oauth-authorization-server", **checks}

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
