"""The consent verifier: bytes and a clock in, a verified :class:`Consent` or a specific error out.

No I/O, no MQTT, no disk. Every rule of README "Consent document" is one visible check below, with the attack it blocks.
Any failure rejects the whole document; the caller keeps the consent in force.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vgw.base.errors import (
    AlgorithmError,
    BadClaimError,
    BadRuleError,
    BadSignatureError,
    ControlScopeError,
    CriticalHeaderError,
    DuplicateGrantError,
    ExpiredError,
    MalformedError,
    NotYetValidError,
    PayloadError,
    RecipientError,
    RollbackError,
    TooLargeError,
    TypeHeaderError,
    UnknownKeyError,
    UnknownScopeError,
    UntrustedError,
    ValidityError,
    VersionConflictError,
    WrongDeviceError,
)
from vgw.base.timefmt import LATEST_TIME
from vgw.contract.consent.model import KEM_PK_LENGTH, Consent, Grant, Limits, Recipient, limited_scopes
from vgw.contract.rules.budget import Tally
from vgw.contract.rules.rules import RuleError, parse_rules
from vgw.contract.scopes import SCOPES

MAX_DOCUMENT_BYTES = 64 * 1024  # enforced before any parsing: a huge document is a memory/CPU attack
MAX_GRANTS = 64
MAX_SCOPES_PER_GRANT = len(SCOPES)
IAT_SKEW_S = 300  # README "Consent document": iat - 300 s <= now
EARLIEST_TIME = 946_684_800  # 2000-01-01 00:00:00 UTC: no genuine consent document is older
CONSENT_TYP = "vgw-consent+jwt"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Every key a grant and a limit may carry (README "Consent document" and "Collection rules"). Anything else rejects the
# document: a restriction this agent cannot enforce must never be silently ignored (fail closed).
GRANT_KEYS = frozenset({"id", "controller", "purpose", "scopes", "limits", "retention_s", "recipient", "collect"})
LIMIT_KEYS = frozenset({"max_hz", "precision_m"})
RECIPIENT_KEYS = frozenset({"kem", "pk"})
_COMPACT_JWS = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


def peek_version(token: str | bytes) -> int | None:
    """The unverified ``ver`` claim, for the rejection receipt only (never trusted for anything else)."""
    try:
        text = token.decode("ascii") if isinstance(token, bytes) else token
        payload = text.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        ver = claims.get("ver") if isinstance(claims, dict) else None
        return ver if isinstance(ver, int) and not isinstance(ver, bool) else None
    except Exception:
        return None


def verify_consent(
    token: str | bytes,
    *,
    trust_keys: Sequence[Ed25519PublicKey],
    device: str,
    now: float,
    in_force: Consent | None = None,
    floor_ver: int = 0,
) -> Consent:
    """Verify a compact-JWS consent document for ``device`` at time ``now``.

    ``floor_ver`` is the highest version this device ever accepted (README "Consent document"): a lower one is
    refused whether or not a document is in force. Returns ``in_force`` itself when the token is an
    idempotent re-delivery of it. Raises
    one :class:`~vgw.base.errors.ConsentError` subclass per broken rule (see the tree in :mod:`vgw.base.errors`: e.g.
    :class:`~vgw.base.errors.RollbackError`), grouped as SignatureError, ClaimsError and FreshnessError; its
    ``reason`` is the tag a rejection receipt carries.
    """
    # Size first, before any decoding: an oversized document must cost us nothing.
    if len(token) > MAX_DOCUMENT_BYTES:
        raise TooLargeError(f"consent rejected: {len(token)} bytes > {MAX_DOCUMENT_BYTES} limit")
    try:
        text = token.decode("ascii") if isinstance(token, bytes) else token
    except UnicodeDecodeError:
        raise MalformedError("consent rejected: not a compact JWS (non-ASCII bytes)") from None
    text = text.strip()
    ver_hint = peek_version(text)

    # Shape: exactly three base64url segments. Blocks truncated tokens and JSON-serialised JWS.
    if not _COMPACT_JWS.match(text):
        raise MalformedError("consent rejected: not a compact JWS (header.payload.signature)",
                      ver_hint)

    # Idempotent re-delivery (retained message, QoS 1 duplicate): the same bytes as the document in force.
    if in_force is not None and text == in_force.token:
        return in_force

    # Parse the protected header ourselves: PyJWT's get_unverified_header already raises on some headers
    # (e.g. `crit`) with exception types outside DecodeError, and every rule below must be judged here.
    header = _header(text, ver_hint)

    # Algorithm pinned to EdDSA: blocks `alg: none` and HS256-with-the-public-key-as-secret confusion.
    if header.get("alg") != "EdDSA":
        raise AlgorithmError(f"consent rejected: alg {header.get('alg')!r} is not EdDSA", ver_hint)
    # Explicit type: blocks a token minted for another purpose by the same signer (cross-JWT confusion).
    if header.get("typ") != CONSENT_TYP:
        raise TypeHeaderError(f"consent rejected: typ {header.get('typ')!r} is not {CONSENT_TYP!r}",
                      ver_hint)
    # Unknown critical extensions must not be ignored (RFC 7515 §4.1.11).
    if "crit" in header:
        raise CriticalHeaderError("consent rejected: unsupported 'crit' header", ver_hint)

    # Signature under one of the trust keys (several at once: key rotation). Blocks forgery and
    # documents signed by any key the device was not told to trust.
    payload = _verify_signature(text, trust_keys, ver_hint)

    try:
        claims = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PayloadError("consent rejected: payload is not JSON", ver_hint) from None
    if not isinstance(claims, dict):
        raise PayloadError("consent rejected: payload is not a JSON object", ver_hint)

    ver = _int(claims, "ver", ver_hint, minimum=1)
    iss = _str(claims, "iss", ver)
    sub = _str(claims, "sub", ver)
    iat = _int(claims, "iat", ver, minimum=0)
    exp = _int(claims, "exp", ver, minimum=0)

    # Real dates only: iat and exp in years 2000..9999 UTC. Blocks a document "valid forever" (exp 2**63) and
    # values no calendar can show, which crashed every command that prints the expiry (time_t overflow).
    for key, t in (("iat", iat), ("exp", exp)):
        if not EARLIEST_TIME <= t <= LATEST_TIME:
            shown = str(t) if len(str(t)) <= 20 else str(t)[:20] + "..."
            raise ValidityError(f"consent v{ver} rejected: {key} {shown} is not a time in years 2000..9999 UTC", ver)

    # Audience: a document for another device must never apply here (replay across devices).
    if sub != device:
        raise WrongDeviceError(f"consent v{ver} rejected: sub {sub!r} is not this device", ver)

    # Rollback: an older version (e.g. a replay of a grant after its revocation) is refused.
    if in_force is not None and ver < in_force.ver:
        raise RollbackError(f"consent v{ver} rejected: version must be > {in_force.ver} (in force)", ver)
    # Rollback past a damaged or deleted cache: with nothing in force, a genuine older document (a grant the
    # owner withdrew since) must not come back; the highest version ever accepted binds (it is kept apart from
    # the cache). Equal is allowed: the same version delivered again restores what a damaged cache lost.
    if ver < floor_ver:
        raise RollbackError(f"consent v{ver} rejected: version must be >= {floor_ver} (the highest accepted "
                            "here)", ver)
    # Same version, different content: two documents cannot both be v{ver}; keep the first.
    digest = hashlib.sha256(payload).hexdigest()
    if in_force is not None and ver == in_force.ver:
        if digest == in_force.digest:
            return in_force
        raise VersionConflictError(f"consent v{ver} rejected: same version as in force with different content", ver)

    # Validity window on the monotonic device clock: blocks expired documents, and documents minted in
    # the future (a stolen signer pre-dating consent). `now` never runs backwards (see store.py).
    if exp <= iat:
        raise ValidityError(f"consent v{ver} rejected: exp {exp} is not after iat {iat}", ver)
    if now >= exp:
        raise ExpiredError(f"consent v{ver} rejected: expired at {exp} (now {int(now)})", ver)
    if iat - IAT_SKEW_S > now:
        raise NotYetValidError(f"consent v{ver} rejected: iat {iat} is more than {IAT_SKEW_S} s in the future", ver)

    grants = _grants(claims.get("grants"), ver)
    return Consent(iss=iss, sub=sub, ver=ver, iat=iat, exp=exp, grants=grants, token=text, digest=digest)


def _verify_signature(text: str, trust_keys: Sequence[Ed25519PublicKey], ver: int | None) -> bytes:
    if not trust_keys:
        raise UntrustedError("consent rejected: no trust keys configured", ver)
    jws = jwt.PyJWS()
    last: Exception | None = None
    for key in trust_keys:
        try:
            decoded = jws.decode_complete(text, key=key, algorithms=["EdDSA"])
            return bytes(decoded["payload"])
        except jwt.exceptions.InvalidSignatureError as exc:
            last = exc
        except jwt.exceptions.PyJWTError as exc:
            raise MalformedError(f"consent rejected: {exc}", ver) from exc
    raise BadSignatureError("consent rejected: signature does not verify under any trust key",
                  ver) from last


def _header(text: str, ver: int | None) -> dict[str, Any]:
    segment = text.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MalformedError("consent rejected: unreadable JWS header", ver) from exc
    if not isinstance(header, dict):
        raise MalformedError("consent rejected: JWS header is not a JSON object", ver)
    return header


def _int(claims: dict[str, Any], key: str, ver: int | None, *, minimum: int) -> int:
    value = claims.get(key)
    # bool is an int in Python and JSON floats like 7.0 are not versions: exact type only.
    if type(value) is not int or value < minimum:
        what = f"consent v{ver}" if ver is not None else "consent"
        raise BadClaimError(f"{what} rejected: {key!r} must be an integer >= {minimum}, got {value!r}",
                      ver)
    return value


def _str(claims: dict[str, Any], key: str, ver: int | None, *, where: str = "") -> str:
    value = claims.get(key)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise BadClaimError(f"consent v{ver} rejected: {where}{key!r} must be a non-empty string",
                      ver)
    return value


def _grants(raw: Any, ver: int) -> tuple[Grant, ...]:
    if not isinstance(raw, list):
        raise BadClaimError(f"consent v{ver} rejected: 'grants' must be a list", ver)
    if len(raw) > MAX_GRANTS:
        raise TooLargeError(f"consent v{ver} rejected: more than {MAX_GRANTS} grants", ver)
    grants: list[Grant] = []
    seen: set[str] = set()
    usage = Tally()
    for i, g in enumerate(raw):
        if not isinstance(g, dict):
            raise BadClaimError(f"consent v{ver} rejected: grant #{i} is not an object", ver)
        gid = _str(g, "id", ver, where=f"grant #{i} ")
        if not _ID.match(gid):
            raise BadClaimError(f"consent v{ver} rejected: grant id {gid!r} has invalid characters",
                          ver)
        # Unique ids: a duplicate would make revocation of "that grant" ambiguous.
        if gid in seen:
            raise DuplicateGrantError(f"consent v{ver} rejected: grant id {gid!r} appears twice",
                          ver)
        seen.add(gid)
        # Unknown keys: e.g. a newer document's restriction this agent cannot enforce. Fail closed.
        unknown = set(g) - GRANT_KEYS
        if unknown:
            raise UnknownKeyError(f"consent v{ver} rejected: grant {gid!r} has unknown key(s) {sorted(unknown)}", ver)
        where = f"grant {gid!r} "
        controller = _str(g, "controller", ver, where=where)
        purpose = _str(g, "purpose", ver, where=where)
        scopes = _scopes(g.get("scopes"), ver, gid)
        limits = _limits(g.get("limits"), scopes, ver, gid)
        retention = g.get("retention_s")
        if retention is not None and (type(retention) is not int or retention <= 0):
            raise BadClaimError(f"consent v{ver} rejected: grant {gid!r} retention_s must be a positive integer", ver)
        recipient = _recipient(g.get("recipient"), ver, gid)
        # Collection rules (README "Collection rules"): one bad rule rejects the whole document, like any other rule.
        try:
            collect = parse_rules(g.get("collect"), scopes, limited_scopes(scopes, limits))
            # Budgets per agent (docs/guarantees.md "Budgets"): a document within every size limit must still
            # not take a core or the memory; counted grant by grant, so the rest is not even read.
            usage.add(collect)
        except RuleError as exc:
            raise BadRuleError(f"consent v{ver} rejected: grant {gid!r} {exc}", exc.reason, version=ver) from None
        grants.append(Grant(id=gid, controller=controller, purpose=purpose, scopes=scopes, recipient=recipient,
                            limits=limits, retention_s=retention, collect=collect))
    return tuple(grants)


def _scopes(raw: Any, ver: int, gid: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or len(raw) > MAX_SCOPES_PER_GRANT * 2:
        raise BadClaimError(f"consent v{ver} rejected: grant {gid!r} scopes must be a non-empty list",
                      ver)
    out: list[str] = []
    for s in raw:
        if not isinstance(s, str):
            raise BadClaimError(f"consent v{ver} rejected: grant {gid!r} scope {s!r} is not a string",
                          ver)
        # Write access is never grantable to this device: any control_* scope rejects the document.
        if s.startswith("control_"):
            raise ControlScopeError(f"consent v{ver} rejected: scope {s!r} is a control scope",
                          ver)
        # Only known read scopes: an unknown scope could mean a newer policy this agent cannot enforce.
        if s not in SCOPES:
            raise UnknownScopeError(f"consent v{ver} rejected: unknown scope {s!r}", ver)
        if s not in out:
            out.append(s)
    return tuple(out)


def _limits(raw: Any, scopes: tuple[str, ...], ver: int, gid: str) -> dict[str, Limits]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadClaimError(f"consent v{ver} rejected: grant {gid!r} limits must be an object", ver)
    out: dict[str, Limits] = {}
    for scope, lim in raw.items():
        if scope not in scopes:
            raise BadClaimError(f"consent v{ver} rejected: grant {gid!r} limits name scope {scope!r} it does not "
                                "grant", ver)
        if not isinstance(lim, dict):
            raise BadClaimError(f"consent v{ver} rejected: grant {gid!r} limits for {scope!r} must be an object", ver)
        # An unknown limit key is a restriction this agent cannot enforce: fail closed.
        if set(lim) - LIMIT_KEYS:
            raise UnknownKeyError(f"consent v{ver} rejected: grant {gid!r} limits for {scope!r} have unknown key(s) "
                          f"{sorted(set(lim) - LIMIT_KEYS)} (known: max_hz, precision_m)", ver)
        vals: dict[str, float | None] = {}
        for key in ("max_hz", "precision_m"):
            v = lim.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1e9):
                raise BadClaimError(f"consent v{ver} rejected: grant {gid!r} {scope} {key} must be a positive "
                                    "number", ver)
            vals[key] = float(v) if v is not None else None
        out[scope] = Limits(max_hz=vals["max_hz"], precision_m=vals["precision_m"])
    return out


def _recipient(raw: Any, ver: int, gid: str) -> Recipient:
    # Without a well-formed recipient key nothing could be encrypted for the app: refuse the grant.
    if not isinstance(raw, dict):
        raise RecipientError(f"consent v{ver} rejected: grant {gid!r} has no recipient", ver)
    if set(raw) - RECIPIENT_KEYS:
        raise UnknownKeyError(f"consent v{ver} rejected: grant {gid!r} recipient has unknown "
                      f"key(s) {sorted(set(raw) - RECIPIENT_KEYS)}", ver)
    kem = raw.get("kem")
    if kem not in KEM_PK_LENGTH:
        raise RecipientError(f"consent v{ver} rejected: grant {gid!r} recipient kem {kem!r} "
                      f"not supported (use {' or '.join(KEM_PK_LENGTH)})", ver)
    pk_b64 = raw.get("pk")
    if not isinstance(pk_b64, str) or not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", pk_b64):
        raise RecipientError(f"consent v{ver} rejected: grant {gid!r} recipient pk is not base64url",
                      ver)
    try:
        pk = base64.urlsafe_b64decode(pk_b64 + "=" * (-len(pk_b64) % 4))
    except (binascii.Error, ValueError):
        raise RecipientError(f"consent v{ver} rejected: grant {gid!r} recipient pk is not base64url",
                      ver) from None
    if len(pk) != KEM_PK_LENGTH[kem]:
        raise RecipientError(f"consent v{ver} rejected: grant {gid!r} recipient pk is {len(pk)} "
                      f"bytes, {kem} needs {KEM_PK_LENGTH[kem]}", ver)
    from vgw.contract.envelope import load_recipient_key  # validate the point itself, not just its length

    try:
        load_recipient_key(kem, pk)
    except ValueError:
        raise RecipientError(f"consent v{ver} rejected: grant {gid!r} recipient pk is not a valid "
                      f"{kem} key", ver) from None
    return Recipient(kem=kem, pk=pk)
