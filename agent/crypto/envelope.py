"""The telemetry envelope (README "Telemetry envelope").

``payload = 0x01 || enc || ct``: RFC 9180 HPKE single-shot seal, base mode, to the grant's recipient key;
suite DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM (or the MLKEM768-X25519 hybrid KEM when the
grant asks for it); ``info = b"vgw/1 " + device + b"/" + grant``; empty aad. The plaintext is zlib
(RFC 1950) compressed UTF-8 JSON.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from vgw.consent.model import KEM_MLKEM768_X25519, KEM_X25519

ENVELOPE_VERSION = 0x01
_SUITES = {
    KEM_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    KEM_MLKEM768_X25519: hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}
_MLKEM768_PK = 1184

RecipientKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey


def load_recipient_key(kem: str, pk: bytes) -> RecipientKey:
    """Parse a raw recipient public key. Raises ValueError if it is not a valid key of that KEM."""
    if kem == KEM_X25519:
        return x25519.X25519PublicKey.from_public_bytes(pk)
    if kem == KEM_MLKEM768_X25519:
        if len(pk) != _MLKEM768_PK + 32:
            raise ValueError("MLKEM768-X25519 public key must be 1216 bytes")
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(pk[:_MLKEM768_PK]),
            x25519.X25519PublicKey.from_public_bytes(pk[_MLKEM768_PK:]),
        )
    raise ValueError(f"unsupported KEM {kem!r}")


def hpke_info(device: str, grant: str) -> bytes:
    return b"vgw/1 " + device.encode("utf-8") + b"/" + grant.encode("utf-8")


def batch_plaintext(device: str, grant: str, seq: int, samples: Sequence[dict[str, Any]], *, epoch: str) -> bytes:
    """The version 1 plaintext (README "Telemetry envelope"). ``epoch`` is the outbox's: receivers de-duplicate on
    (device, grant, epoch, seq), so a wiped device that starts ``seq`` at 1 again is not taken for a replay."""
    doc = {"v": 1, "device": device, "grant": grant, "seq": seq, "epoch": epoch, "samples": list(samples)}
    return zlib.compress(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8"), 6)


def seal(kem: str, recipient: RecipientKey, device: str, grant: str, plaintext: bytes) -> bytes:
    """Seal an already-compressed plaintext into an envelope."""
    return bytes([ENVELOPE_VERSION]) + _SUITES[kem].encrypt(plaintext, recipient, info=hpke_info(device, grant))
