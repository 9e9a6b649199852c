"""A real consent state directory for tests: outbox (SQLite), audit log, consent cache, clock floor, receipt
signer with a device key from the test PKI, and the ConsentManager over them; plus a consent authority.

Nothing is mocked: every test that uses it reads and writes real files in its own temp folder.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vgw.contract.receipts import ReceiptSigner
from vgw.state.audit import AuditLog
from vgw.state.consent.manager import ConsentManager, load_trust_keys
from vgw.state.consent.store import ConsentStore
from vgw.state.keys import load_or_create_storage_key
from vgw.state.outbox import Outbox
from vgw_sim.cloud import RecipientKey, SigningKey, consent_claims, grant, sign_consent, verify_receipt
from vgw_sim.pki import TestPKI, device_public_key_from_cert

OUTBOX_FILE = "outbox.sqlite"  # agent.runtime.OUTBOX_FILE (not imported: keeps these tests off the runtime)


class Authority:
    """The consent service of a test: trusted signing keys, one HPKE recipient key per grant id."""

    def __init__(self, folder: Path, keys: int = 1) -> None:
        self.keys = [SigningKey.generate() for _ in range(keys)]
        self.trust = [k.write_public_pem(folder / f"trust-{i}.pem") for i, k in enumerate(self.keys)]
        self.recipients: dict[str, RecipientKey] = {}

    @property
    def key(self) -> SigningKey:
        return self.keys[0]

    def recipient(self, gid: str, kem: str = "X25519") -> RecipientKey:
        if gid not in self.recipients:
            self.recipients[gid] = RecipientKey.generate(kem)
        return self.recipients[gid]

    def grant(self, gid: str, scopes: Iterable[str], *, kem: str = "X25519", **kw: Any) -> dict[str, Any]:
        return grant(gid, list(scopes), self.recipient(gid, kem), **kw)

    def claims(self, device: str, ver: int, grants: Iterable[Mapping[str, Any]], **kw: Any) -> dict[str, Any]:
        return consent_claims(device, ver, grants, **kw)

    def sign(self, claims: Mapping[str, Any], *, key: SigningKey | None = None, **kw: Any) -> str:
        return sign_consent(claims, key or self.key, **kw)

    def doc(self, device: str, ver: int, grants: Iterable[Mapping[str, Any]], **kw: Any) -> str:
        return self.sign(self.claims(device, ver, grants, **kw))


class State:
    """One device's state directory and the manager over it. ``reopen()`` simulates a restart."""

    def __init__(self, root: Path, pki: TestPKI, authority: Authority, device: str = "dev-0001") -> None:
        self.root = root
        self.dir = root / "state"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.pki = pki
        self.authority = authority
        self.device = device
        self.device_public_key = device_public_key_from_cert(pki.device(device).cert)
        self.revoked_hook: list[frozenset[str]] = []
        self._open()

    def _open(self) -> None:
        key = load_or_create_storage_key(self.dir / "storage.key")
        self.outbox = Outbox(self.dir / OUTBOX_FILE, key, self.device)
        self.audit = AuditLog(self.dir)
        self.store = ConsentStore(self.dir)
        self.signer = ReceiptSigner.from_file(self.device, self.pki.device(self.device).key)
        self.manager = ConsentManager(device=self.device, store=self.store, outbox=self.outbox, audit=self.audit,
                                      signer=self.signer, trust_keys=load_trust_keys(self.authority.trust),
                                      on_revoke=self.revoked_hook.append)

    def reopen(self, *, load: bool = True) -> None:
        self.outbox.close()
        self._open()
        if load:
            self.manager.load_cached()

    def close(self) -> None:
        self.outbox.close()

    # -- observations -------------------------------------------------------------------------------

    def receipts(self, typ: str | None = None) -> list[dict[str, Any]]:
        """Every queued receipt, verified (ES256 under the device certificate's key), oldest first."""
        out = []
        for _, token in self.outbox.pending_receipts(10_000):
            claims = verify_receipt(token, self.device_public_key, device=self.device)
            if typ is None or claims["typ"] == typ:
                out.append(claims)
        return out

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.audit.entries() if event is None or e.get("event") == event]

    def cache_bytes(self) -> bytes | None:
        p = self.store.consent_path
        return p.read_bytes() if p.exists() else None

    def snapshot(self) -> dict[str, Any]:
        """What a rejected document must leave unchanged."""
        c = self.manager.in_force
        return {
            "ver": c.ver if c else None,
            "digest": c.digest if c else None,
            "grants": sorted(c.grant_ids) if c else [],
            "cache": self.cache_bytes(),
            "active": sorted(self.outbox.active_grants()),
            "keys": {g: self.outbox.has_key(g) for g in (sorted(c.grant_ids) if c else [])},
        }


def payload_of(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    doc: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return doc
