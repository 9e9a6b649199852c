"""Telemetry envelopes (README "Telemetry envelope") and receipts (README "Receipts") on the cloud side. No I/O.

- :func:`seal_envelope` / :func:`open_envelope`: ``0x01 || enc || ct``, HPKE base mode to a grant's
  :class:`~vgw.cloud.consent_authority.RecipientKey`, ``info`` bound to device and grant; the version byte,
  suites and ``info`` are :mod:`vgw.contract.sealing`'s and sealing is the agent's own
  :func:`vgw.contract.envelope.seal`;
- :func:`verify_receipt`: a receipt is an ES256 compact JWS under the device certificate's key.

Errors (defined in :mod:`vgw.base.errors`)::

    VgwError
     +-- EnvelopeError     an envelope broke a rule of README "Telemetry envelope" (``reason``)
     +-- ReceiptError      a receipt is not a valid ES256 JWS of its device (README "Receipts")

:mod:`vgw_sim.cloud` re-exports every name here.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from vgw.base.errors import EnvelopeError, ReceiptError
from vgw.cloud.consent_authority import HpkePrivateKey, HpkePublicKey, RecipientKey
from vgw.contract.envelope import loads, plaintext_samples, seal
from vgw.contract.sealing import (
    ENC_LENGTH,
    ENVELOPE_VERSION,
    KEM_MLKEM768_X25519,
    KEM_X25519,
    READ_VERSIONS,
    SUITES,
    hpke_info,
)

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_PLAINTEXT",
    "RECEIPT_LEEWAY_S",
    "EnvelopeError",
    "ReceiptError",
    "open_envelope",
    "seal_envelope",
    "verify_receipt",
]

MAX_PLAINTEXT = 4 * 1024 * 1024  # decompression bound: a hostile zlib stream must not exhaust memory
RECEIPT_LEEWAY_S = 300
# the epoch is a short random string (README "Telemetry envelope"); a receiver keys its de-duplication on it
MAX_EPOCH = 64


# ---------------------------------------------------------------- envelopes and receipts


def _kem_of(key: HpkePrivateKey | HpkePublicKey) -> str:
    if isinstance(key, x25519.X25519PrivateKey | x25519.X25519PublicKey):
        return KEM_X25519
    return KEM_MLKEM768_X25519


def seal_envelope(
    batch: Mapping[str, Any], recipient: RecipientKey | HpkePublicKey, device: str, grant_id: str
) -> bytes:
    """Reference sealer: ``0x01 || enc || ct`` of zlib(JSON(batch)) to ``recipient`` (README "Telemetry envelope").

    For tests that need a batch the agent would not write (any ``v``, a hand-made sample list); sealed by the
    agent's own :func:`vgw.contract.envelope.seal`. Raises ``TypeError``/``ValueError`` for unserialisable
    batches.
    """
    pub = recipient.public_key() if isinstance(recipient, RecipientKey) else recipient
    plaintext = zlib.compress(json.dumps(dict(batch), separators=(",", ":")).encode())
    return seal(_kem_of(pub), pub, device, grant_id, plaintext)


def open_envelope(
    payload: bytes, recipient_sk: HpkePrivateKey | RecipientKey, device: str, grant_id: str
) -> dict[str, Any]:
    """Open a telemetry envelope of ``device``/``grant_id`` (README "Telemetry envelope") and return the batch object.

    Checks, in order: version byte 0x01; HPKE open (base mode, ``info`` bound to device and grant, so an
    envelope replayed onto another device's or grant's topic fails); zlib within ``MAX_PLAINTEXT``; a JSON
    object with ``v`` 1 or 2, matching ``device`` and ``grant``, integer ``seq`` >= 1, a string ``epoch`` if present
    (an agent before contract 1.1 sends none; receivers then use "") and samples: a list of them (v1) or
    ``t0_us`` and series (v2). A v2 batch is returned with its samples also as ``samples`` in v1 form
    (:func:`vgw.contract.envelope.plaintext_samples`), so every receiver reads both versions alike.
    Raises :class:`EnvelopeError` naming the failed rule.
    """
    sk = recipient_sk.private_key if isinstance(recipient_sk, RecipientKey) else recipient_sk
    kem = _kem_of(sk)
    where = f"envelope {device}/{grant_id}"
    if len(payload) < 1 + ENC_LENGTH[kem] + 16:
        raise EnvelopeError(f"{where}: {len(payload)} bytes is too short", "length")
    if payload[0] != ENVELOPE_VERSION:
        raise EnvelopeError(f"{where}: version byte {payload[0]:#04x}, expected {ENVELOPE_VERSION:#04x}", "version")
    try:
        compressed = SUITES[kem].decrypt(payload[1:], sk, info=hpke_info(device, grant_id))
    except Exception as exc:  # cryptography raises InvalidTag or ValueError; both mean "not for us"
        raise EnvelopeError(
            f"{where}: HPKE open failed (wrong key, device, grant or tampered)", "hpke"
        ) from exc
    try:
        dec = zlib.decompressobj()
        plaintext = dec.decompress(compressed, MAX_PLAINTEXT)
        if dec.unconsumed_tail or not dec.eof:
            raise EnvelopeError(f"{where}: plaintext over {MAX_PLAINTEXT} bytes or truncated", "zlib")
    except zlib.error as exc:
        raise EnvelopeError(f"{where}: not a zlib stream: {exc}", "zlib") from exc
    try:
        batch = loads(plaintext)
    except ValueError as exc:  # also UnicodeDecodeError and both JSON libraries' decode errors
        raise EnvelopeError(f"{where}: plaintext is not UTF-8 JSON: {exc}", "json") from exc
    if not isinstance(batch, dict) or batch.get("v") not in READ_VERSIONS or isinstance(batch.get("v"), bool):
        raise EnvelopeError(f"{where}: batch must be an object with v = 1 or 2", "schema")
    # The topic names device and grant; the sealed copy must agree (blocks re-labelling by a relay).
    if batch.get("device") != device or batch.get("grant") != grant_id:
        raise EnvelopeError(
            f"{where}: sealed device/grant {batch.get('device')!r}/{batch.get('grant')!r} differ from topic",
            "mismatch",
        )
    seq = batch.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise EnvelopeError(f"{where}: seq must be an integer >= 1, got {seq!r}", "schema")
    # The outbox epoch (README "Telemetry envelope", since contract 1.1); an agent before 1.1 sends none: its epoch is
    # "".
    epoch = batch.get("epoch", "")
    if not isinstance(epoch, str) or len(epoch) > MAX_EPOCH:
        raise EnvelopeError(f"{where}: epoch must be a string of at most {MAX_EPOCH} characters", "schema")
    try:
        batch["samples"] = plaintext_samples(batch)
    except ValueError as exc:
        raise EnvelopeError(f"{where}: {exc}", "schema") from exc
    return batch


def verify_receipt(
    token: str, public_key: ec.EllipticCurvePublicKey, *, device: str | None = None
) -> dict[str, Any]:
    """Verify a receipt (README "Receipts"): compact JWS, ES256 only, under the device certificate's key; return its
    claims.

    Requires ``typ``, ``sub`` and ``iat`` (``iat`` at most 300 s in the future); if ``device`` is given,
    ``sub`` must equal it. Raises :class:`ReceiptError` naming the failed rule.
    """
    try:
        # algorithms pinned to ES256: a token claiming "none" or HS256 (key confusion) is refused.
        claims: dict[str, Any] = jwt.decode(
            token,
            public_key,
            algorithms=["ES256"],
            options={"require": ["typ", "sub", "iat"], "verify_aud": False},
            leeway=RECEIPT_LEEWAY_S,
        )
    except jwt.PyJWTError as exc:
        raise ReceiptError(f"receipt rejected: {exc}") from exc
    if not isinstance(claims.get("typ"), str) or not isinstance(claims.get("sub"), str):
        raise ReceiptError("receipt rejected: typ and sub must be strings")
    if device is not None and claims["sub"] != device:
        raise ReceiptError(f"receipt rejected: sub {claims['sub']!r} is not device {device!r}")
    return claims
