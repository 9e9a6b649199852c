"""The consent model (README "Consent document") as immutable data, free of JWS and JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from vgw.base.timefmt import LATEST_TIME, utc_text
from vgw.contract.rules.describe import describe_grant
from vgw.contract.rules.rules import Rule
from vgw.contract.sealing import KEM_MLKEM768_X25519 as KEM_MLKEM768_X25519  # the envelope's KEMs, re-exported
from vgw.contract.sealing import KEM_PK_LENGTH as KEM_PK_LENGTH
from vgw.contract.sealing import KEM_X25519 as KEM_X25519

# A version is any rising integer (README "Consent document"); `vgw cloud sign` and the consent service default to
# the signing time in Unix milliseconds. From 10**12 (2001-09-09 in ms) a version is read as such a time.
_MS_VERSIONS_FROM = 10**12


def version_text(ver: int | None) -> str:
    """A consent version as people read it: ``consent v1796625176006 (dated 2026-12-07 06:32:56 UTC)`` for a
    version in Unix milliseconds, ``consent v7`` for a small one, ``no consent in force`` for None."""
    if ver is None:
        return "no consent in force"
    if isinstance(ver, int) and not isinstance(ver, bool) and _MS_VERSIONS_FROM <= ver <= LATEST_TIME * 1000:
        return f"consent v{ver} (dated {utc_text(ver // 1000)})"
    return f"consent v{ver}"


# Privacy defaults when a grant sets no limits for these scopes (README "Telemetry envelope", EDPB Guidelines 01/2020).
DEFAULT_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "read_location": (0.2, 100.0),
    "read_compass": (0.2, None),
}


@dataclass(frozen=True, slots=True)
class Limits:
    max_hz: float | None = None
    precision_m: float | None = None


def limited_scopes(scopes: tuple[str, ...], limits: dict[str, Limits]) -> frozenset[str]:
    """The scopes of a grant whose samples the device limits (``limits`` or the privacy defaults)."""
    out = set()
    for s in scopes:
        own = limits.get(s, Limits())
        default_hz, default_precision = DEFAULT_LIMITS.get(s, (None, None))
        if own.max_hz or own.precision_m or default_hz or default_precision:
            out.add(s)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Recipient:
    kem: str
    pk: bytes


@dataclass(frozen=True)
class Grant:
    id: str
    controller: str
    purpose: str
    scopes: tuple[str, ...]
    recipient: Recipient
    limits: dict[str, Limits] = field(default_factory=dict)
    retention_s: int | None = None
    collect: tuple[Rule, ...] = ()  # collection rules (README "Collection rules"); empty: every sample, within limits

    def limits_for(self, scope: str) -> Limits:
        """The limits the device enforces for ``scope``: the grant's, else the privacy default, else none."""
        # Field by field: a grant that sets only max_hz for read_location has not asked for finer than the
        # 100 m default precision, so it keeps it (EDPB 01/2020: minimisation is the default, not an opt-in).
        default_hz, default_precision = DEFAULT_LIMITS.get(scope, (None, None))
        own = self.limits.get(scope)
        if own is None:
            return Limits(max_hz=default_hz, precision_m=default_precision)
        return Limits(max_hz=own.max_hz if own.max_hz is not None else default_hz,
                      precision_m=own.precision_m if own.precision_m is not None else default_precision)

    def limits_in_force(self) -> dict[str, dict[str, float]]:
        """Per scope, the limits the device enforces (privacy defaults included), only where there are any."""
        return {
            s: {k: v for k, v in (("max_hz", lim.max_hz), ("precision_m", lim.precision_m)) if v}
            for s, lim in ((s, self.limits_for(s)) for s in self.scopes)
            if lim.max_hz or lim.precision_m
        }


@dataclass(frozen=True)
class Consent:
    """A verified consent document. ``token`` is the compact JWS it came from; ``digest`` its payload hash."""

    iss: str
    sub: str
    ver: int
    iat: int
    exp: int
    grants: tuple[Grant, ...]
    token: str
    digest: str

    def grant(self, grant_id: str) -> Grant | None:
        for g in self.grants:
            if g.id == grant_id:
                return g
        return None

    @property
    def grant_ids(self) -> frozenset[str]:
        return frozenset(g.id for g in self.grants)

    def summary(self) -> dict[str, object]:
        """What `vgw consent show --json` prints: no keys, no personal data."""
        return {
            "version": self.ver,
            "issuer": self.iss,
            "device": self.sub,
            "issued_at": self.iat,
            "expires": self.exp,
            "grants": [
                {
                    "id": g.id,
                    "controller": g.controller,
                    "purpose": g.purpose,
                    "scopes": list(g.scopes),
                    "limits": g.limits_in_force(),
                    "retention_s": g.retention_s,
                    **({"collect": [r.to_json() for r in g.collect]} if g.collect else {}),
                    # What the app receives, in plain words (collection rules, then limits).
                    "receives": describe_grant(g.scopes, g.collect, g.limits_in_force()),
                    "kem": g.recipient.kem,
                    "expires": self.exp,
                }
                for g in self.grants
            ],
        }
