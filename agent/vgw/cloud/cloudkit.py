"""The cloud integration kit behind ``vgw cloud``: keys, consent documents, push, revoke, listen, receipts.

Everything the cloud side of README "The contract, in our words" needs, as small functions over the primitives
of :mod:`vgw.cloud.consent_authority` and :mod:`vgw.cloud.envelopes` (the one implementation of JWS signing,
HPKE and receipt verification on the cloud side, which the reference cloud peer uses too):

- :func:`keygen`: the consent signing key (Ed25519) and one HPKE recipient key pair per controller;
- :func:`load_grants` / :func:`sign_documents`: a consent document per device from a TOML or JSON grants
  description; :func:`revoke_document`: the next version without some (or all) grants;
- :func:`verify_receipt_file`.

The MQTT side (:class:`~vgw.cloud.cloudlink.CloudLink`, :class:`~vgw.cloud.cloudlink.Listener`) is in
:mod:`vgw.cloud.cloudlink`.

Errors: :class:`CloudKitError` (a ``ConfigError``: bad key file, description, document or option, with the
file and field named), :class:`~vgw.base.errors.UplinkError` (broker), :class:`~vgw_sim.cloud.ReceiptError`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from vgw.base.errors import CloudKitError
from vgw.base.fsutil import MAX_CONFIG_BYTES, load_toml, read_small_file
from vgw.cloud.consent_authority import (
    HpkePrivateKey,
    RecipientKey,
    SigningKey,
    consent_claims,
    recipient_public_key,
    sign_consent,
)
from vgw.cloud.envelopes import ReceiptError, verify_receipt
from vgw.contract.certs import device_id_from_cert, device_public_key_from_cert
from vgw.contract.consent.model import Limits, limited_scopes
from vgw.contract.rules.budget import Tally
from vgw.contract.rules.rules import RuleError, parse_rules
from vgw.contract.scopes import SCOPES

__all__ = [
    "CloudKitError",
    "keygen",
    "load_device_certs",
    "load_grants",
    "load_recipient_keys",
    "revoke_document",
    "sign_documents",
    "verify_receipt_file",
]

SIGNER_KEY = "consent-signer.key"
SIGNER_PUB = "consent-signer.pub.pem"
RECIPIENTS = "recipients"
DEFAULT_TTL_S = 86400
_GRANT_KEYS = {"id", "controller", "purpose", "scopes", "recipient", "limits", "retention_s", "collect"}
_TOP_KEYS = {"grant", "grants", "ttl_s", "iss", "ver", "devices"}


# ---------------------------------------------------------------- files


def _write_private(path: Path, data: bytes, force: bool) -> Path:
    if path.exists() and not force:
        raise CloudKitError(f"{path}: exists (use --force to replace a key)")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    os.chmod(path, 0o600)
    return path


def _write_public(path: Path, data: bytes) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def keygen(directory: Path, recipients: Iterable[str] = (), *, signer: bool = True, force: bool = False
           ) -> list[Path]:
    """Write keys into ``directory``: ``consent-signer.key`` (0600) + ``.pub.pem`` (what devices trust), and
    per controller ``recipients/<name>.key`` (X25519, 0600, PKCS#8 PEM) + ``<name>.pub.json`` (the grant's
    ``recipient`` object). An existing signing key is kept unless ``force``. Returns the written paths.

    Raises :class:`CloudKitError` for a bad name or an existing recipient key without ``force``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    signer_path = directory / SIGNER_KEY
    if signer and (force or not signer_path.exists()):
        key = SigningKey.generate()
        pem = key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        out.append(_write_private(signer_path, pem, True))
        out.append(_write_public(directory / SIGNER_PUB, key.public_pem()))
    for name in recipients:
        if not name or "/" in name or name.startswith(".") or "\x00" in name:
            raise CloudKitError(f"recipient name {name!r}: must be a plain file-name stem")
        rdir = directory / RECIPIENTS
        rdir.mkdir(exist_ok=True)
        rk = RecipientKey.generate("X25519")
        assert isinstance(rk.private_key, x25519.X25519PrivateKey)
        pem = rk.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
        out.append(_write_private(rdir / f"{name}.key", pem, force))
        pub = {**rk.recipient(), "controller": name}
        out.append(_write_public(rdir / f"{name}.pub.json", (json.dumps(pub, indent=2) + "\n").encode()))
    return out


def load_signing_key(path: Path) -> SigningKey:
    """Load the consent signing key. Raises :class:`CloudKitError` naming the file."""
    try:
        return SigningKey.load(path)
    except (OSError, ValueError, TypeError) as exc:
        raise CloudKitError(f"{path}: cannot load the Ed25519 signing key: {exc}") from exc


def load_recipient_keys(paths: Iterable[Path]) -> dict[str, HpkePrivateKey]:
    """Recipient private keys by file stem, from ``*.key`` files or directories holding them.

    Raises :class:`CloudKitError` for an unreadable file or a key that is not X25519.
    """
    out: dict[str, HpkePrivateKey] = {}
    for p in paths:
        files = sorted(p.glob("*.key")) if p.is_dir() else [p]
        if p.is_dir() and (p / RECIPIENTS).is_dir():
            files = sorted((p / RECIPIENTS).glob("*.key"))
        for f in files:
            try:
                key = serialization.load_pem_private_key(f.read_bytes(), password=None)
            except (OSError, ValueError, TypeError) as exc:
                raise CloudKitError(f"{f}: cannot load a recipient key: {exc}") from exc
            if not isinstance(key, x25519.X25519PrivateKey):
                raise CloudKitError(f"{f}: not an X25519 private key")
            out[f.name.removesuffix(".key")] = key
    if not out:
        raise CloudKitError("no recipient keys found (give --recipient FILE|DIR)")
    return out


def load_device_certs(paths: Iterable[Path]) -> dict[str, ec.EllipticCurvePublicKey]:
    """Receipt verification keys by device id, from certificate files or directories of ``*.crt``.

    A certificate's device id is its ``vgw:device:`` URI SAN, else its CN. In a directory, certificates
    without a P-256 key are skipped; a named file must be usable. Raises :class:`CloudKitError`.
    """
    out: dict[str, ec.EllipticCurvePublicKey] = {}
    for p in paths:
        files = sorted(p.glob("*.crt")) if p.is_dir() else [p]
        for f in files:
            try:
                out[device_id_from_cert(f)] = device_public_key_from_cert(f)
            except (OSError, ValueError) as exc:
                if not p.is_dir():
                    raise CloudKitError(f"{f}: {exc}") from exc
    return out


# ---------------------------------------------------------------- consent documents


def _load_structured(path: Path) -> dict[str, Any]:
    """A grants description or a recipient's public key: TOML through the loader of the config file and the
    signal map (:func:`vgw.base.fsutil.load_toml`), or JSON when the name ends in ``.json``; a regular file of at
    most ``MAX_CONFIG_BYTES``, nested no deeper than the parser's recursion allows. Raises CloudKitError."""
    try:
        if path.suffix != ".json":
            data: Any = load_toml(path, what="TOML file", error=CloudKitError)
        else:
            raw = read_small_file(path, what="JSON file", max_bytes=MAX_CONFIG_BYTES, error=CloudKitError)
            try:
                data = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CloudKitError(f"{path}: not valid JSON: {exc}") from exc
            except RecursionError as exc:
                raise CloudKitError(f"{path}: not valid JSON: arrays or objects nested too deeply") from exc
    except FileNotFoundError as exc:
        raise CloudKitError(f"{path}: cannot read: {exc.strerror}") from exc
    if not isinstance(data, dict):
        raise CloudKitError(f"{path}: must be an object/table")
    return data


def load_grants(path: Path) -> dict[str, Any]:
    """Parse a grants description (TOML, or JSON if it ends in ``.json``)::

        ttl_s = 86400                      # optional: exp = iat + ttl_s
        [[grant]]
        id = "g-fleet-1"
        controller = "com.example.fleet"   # optional
        purpose = "fleet-maintenance"      # optional
        scopes = ["read_odometer", "read_location"]
        recipient = "keys/recipients/fleet.pub.json"   # a keygen .pub.json (relative to this file) or {kem, pk}
        retention_s = 86400                # optional
        limits = { read_location = { max_hz = 0.2, precision_m = 1000 } }   # optional
        [[grant.collect]]                  # optional collection rules (README "Collection rules"), one table per rule
        scope = "read_speedometer"
        mode = "aggregate"
        window_s = 60

    Returns ``{"grants": [...], "ttl_s": int, "iss": str, "ver": int | None, "devices": [...]}``. Every
    rule the device would apply to the grants (known scopes, unique ids, a usable recipient key) is
    checked here first, so a typo fails at the console, not in the car. Raises :class:`CloudKitError`.
    """
    data = _load_structured(path)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise CloudKitError(f"{path}: unknown key(s) {sorted(unknown)}")
    raw = data.get("grant", data.get("grants", []))
    if not isinstance(raw, list):
        raise CloudKitError(f"{path}: 'grant' must be an array of tables")
    grants: list[dict[str, Any]] = []
    seen: set[str] = set()
    usage = Tally()  # the device's budgets (docs/guarantees.md "Budgets"), over the whole document
    for i, g in enumerate(raw):
        where = f"{path}: grant[{i}]"
        if not isinstance(g, dict):
            raise CloudKitError(f"{where}: must be a table")
        extra = set(g) - _GRANT_KEYS
        if extra:
            raise CloudKitError(f"{where}: unknown key(s) {sorted(extra)}")
        gid = g.get("id")
        if not isinstance(gid, str) or not gid or "/" in gid or "+" in gid or "#" in gid or "." in gid:
            raise CloudKitError(f"{where}: id {gid!r} must be a non-empty string without / + # .")
        if gid in seen:
            raise CloudKitError(f"{where}: id {gid!r} is not unique")
        seen.add(gid)
        scopes = g.get("scopes")
        if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
            raise CloudKitError(f"{where}: scopes must be a non-empty list of strings")
        bad = [s for s in scopes if s not in SCOPES]
        if bad:
            raise CloudKitError(f"{where}: scope {bad[0]!r} is not a known read scope (README 'Scopes')")
        recipient = g.get("recipient")
        if isinstance(recipient, str):
            rpath = (path.parent / recipient) if not Path(recipient).is_absolute() else Path(recipient)
            rdata = _load_structured(rpath if rpath.suffix == ".json" else rpath.with_suffix(".json"))
            recipient = {"kem": rdata.get("kem"), "pk": rdata.get("pk")}
        if not isinstance(recipient, dict):
            raise CloudKitError(f"{where}: recipient must be a .pub.json path or a {{kem, pk}} table")
        try:
            recipient_public_key(recipient)
        except ValueError as exc:
            raise CloudKitError(f"{where}: recipient: {exc}") from exc
        out: dict[str, Any] = {
            "id": gid,
            "controller": str(g.get("controller", "com.example.fleet")),
            "purpose": str(g.get("purpose", "fleet-maintenance")),
            "scopes": list(scopes),
            "recipient": {"kem": recipient["kem"], "pk": recipient["pk"]},
        }
        if "limits" in g:
            if not isinstance(g["limits"], dict) or not set(g["limits"]) <= set(scopes):
                raise CloudKitError(f"{where}: limits must be a table keyed by the grant's scopes")
            out["limits"] = g["limits"]
        if "retention_s" in g:
            if not isinstance(g["retention_s"], int) or g["retention_s"] <= 0:
                raise CloudKitError(f"{where}: retention_s must be a positive integer")
            out["retention_s"] = g["retention_s"]
        if "collect" in g:
            # The device's own validation (vgw.contract.rules.rules): a rule it would reject never gets signed.
            try:
                usage.add(parse_rules(g["collect"], scopes, _limited(scopes, out.get("limits", {}))))
            except RuleError as exc:
                raise CloudKitError(f"{where}: {exc}") from None
            out["collect"] = g["collect"]
        grants.append(out)
    ttl = data.get("ttl_s", DEFAULT_TTL_S)
    if not isinstance(ttl, int) or ttl <= 0:
        raise CloudKitError(f"{path}: ttl_s must be a positive integer")
    ver = data.get("ver")
    if ver is not None and (not isinstance(ver, int) or ver < 1):
        raise CloudKitError(f"{path}: ver must be an integer >= 1")
    devices = data.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise CloudKitError(f"{path}: devices must be a list of device ids")
    return {"grants": grants, "ttl_s": ttl, "iss": str(data.get("iss", "consent-service")), "ver": ver,
            "devices": devices}


def default_version(now: float | None = None) -> int:
    """A version that rises without a counter to keep: Unix time in milliseconds.

    The device accepts only a version greater than the one in force (README "Consent document"), so two documents signed
    by different consent-service replicas in order still apply in order.
    """
    return int((time.time() if now is None else now) * 1000)


def sign_documents(key: SigningKey, description: Mapping[str, Any], devices: Iterable[str], *,
                   ver: int | None = None, now: int | None = None) -> dict[str, str]:
    """One signed consent document (compact JWS) per device. Raises :class:`CloudKitError` for no devices."""
    targets = list(devices) or list(description.get("devices", []))
    if not targets:
        raise CloudKitError("no device: give --device-id ID (repeatable) or 'devices' in the description")
    version = ver or description.get("ver") or default_version()
    iat = int(time.time()) if now is None else now
    out: dict[str, str] = {}
    for device in targets:
        claims = consent_claims(device, version, description["grants"], iat=iat,
                                exp=iat + int(description["ttl_s"]), iss=description["iss"])
        out[device] = sign_consent(claims, key)
    return out


# A consent document is at most 64 KiB (README "Consent document"); a receipt, or the JSON line `vgw cloud listen`
# wrote it in, is far smaller. A file beyond this is no document, whatever it is.
MAX_TOKEN_FILE_BYTES = 256 * 1024


def read_token_file(path: Path, *, what: str) -> str:
    """The text of a small token file (a consent document, a receipt): read the bounded way the agent reads
    its files, so a FIFO or a link to ``/dev/zero`` is one clear line, not a hang or a full memory.
    Raises :class:`CloudKitError`."""
    try:
        raw = read_small_file(path, what=what, max_bytes=MAX_TOKEN_FILE_BYTES, error=CloudKitError)
    except FileNotFoundError as exc:
        raise CloudKitError(f"{path}: {what} not found") from exc
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise CloudKitError(f"{path}: {what} is not UTF-8 text") from exc


def read_document(path: Path, key: SigningKey | None = None) -> dict[str, Any]:
    """The claims of a consent document file, verified under ``key`` when given (expiry not checked: a
    revocation of an expired document is still a valid revocation). Raises :class:`CloudKitError`."""
    token = read_token_file(path, what="consent document")
    try:
        if key is None:
            claims = jwt.decode(token, options={"verify_signature": False})
        else:
            claims = jwt.decode(token, key.public_key, algorithms=["EdDSA"],
                                options={"verify_exp": False, "verify_iat": False})
    except jwt.PyJWTError as exc:
        raise CloudKitError(f"{path}: not a consent document signed by this key: {exc}") from exc
    if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("ver"), int):
        raise CloudKitError(f"{path}: consent document lacks sub/ver")
    return dict(claims)


def revoke_document(key: SigningKey, current: Mapping[str, Any], grants: Iterable[str] | None, *,
                    ver: int | None = None, ttl_s: int = DEFAULT_TTL_S) -> str:
    """The next version of ``current`` (claims) without the named grants (``None``: without any grant).

    Raises :class:`CloudKitError` if a named grant is not in ``current`` or ``ver`` does not rise.
    """
    kept = list(current.get("grants", []))
    if grants is not None:
        names = set(grants)
        present = {g.get("id") for g in kept}
        missing = sorted(names - present)
        if missing:
            raise CloudKitError(f"grant {missing[0]!r} is not in consent v{current['ver']} of {current['sub']}")
        kept = [g for g in kept if g.get("id") not in names]
    else:
        kept = []
    version = ver if ver is not None else max(int(current["ver"]) + 1, default_version())
    if version <= int(current["ver"]):
        raise CloudKitError(f"--ver {version} must be greater than the current version {current['ver']}")
    iat = int(time.time())
    claims = consent_claims(str(current["sub"]), version, kept, iat=iat, exp=iat + ttl_s,
                            iss=str(current.get("iss", "consent-service")))
    return sign_consent(claims, key)


def verify_receipt_file(path: Path, keys: Mapping[str, ec.EllipticCurvePublicKey]) -> dict[str, Any]:
    """Verify the receipt in ``path`` (compact JWS, ES256) under the certificate of the device it names.

    Raises :class:`CloudKitError` if unreadable, :class:`ReceiptError` if it does not verify.
    """
    token = read_token_file(path, what="receipt")
    if token.startswith("{"):  # a JSON line from `vgw cloud listen`: take its token
        try:
            token = str(json.loads(token)["token"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CloudKitError(f"{path}: JSON without a 'token' field") from exc
    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError as exc:
        raise ReceiptError(f"{path}: not a compact JWS: {exc}") from exc
    if not isinstance(sub, str) or sub not in keys:
        raise ReceiptError(f"{path}: receipt names device {sub!r}, for which no certificate was given")
    return verify_receipt(token, keys[sub], device=sub)


def _limited(scopes: Any, limits: Any) -> frozenset[str]:
    """The scopes the device will limit (the grant's ``limits`` or the privacy defaults): no condition may read
    one (vgw.contract.rules.rules)."""
    parsed = {s: Limits(max_hz=v.get("max_hz"), precision_m=v.get("precision_m")) for s, v in limits.items()
              if isinstance(v, dict)}
    return limited_scopes(tuple(scopes), parsed)
