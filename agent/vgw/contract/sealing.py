"""How a telemetry envelope is sealed (README "Telemetry envelope"): the parameters both ends must share.

``payload = ENVELOPE_VERSION || enc || ct``: RFC 9180 HPKE, base mode, single shot, to the grant's recipient
key under the suite of its KEM, with ``info`` = :func:`hpke_info` and an empty aad. The plaintext is zlib
JSON whose ``v`` is :data:`SENT_VERSION` from the agent (columnar) and one of :data:`READ_VERSIONS` for every
receiver. The sealer and the opener (:mod:`vgw.contract.envelope`, :mod:`vgw.cloud.envelopes`) take all of this
from here.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hpke

__all__ = [
    "ENC_LENGTH",
    "ENVELOPE_VERSION",
    "KEM_MLKEM768_X25519",
    "KEM_PK_LENGTH",
    "KEM_X25519",
    "READ_VERSIONS",
    "SENT_VERSION",
    "SUITES",
    "hpke_info",
]

#: The first byte of every envelope.
ENVELOPE_VERSION = 0x01
#: The plaintext version the agent sends (columnar: ``t0_us`` and series) and the ones a receiver reads.
SENT_VERSION = 2
READ_VERSIONS = (1, 2)

# The KEMs a grant's recipient may name (README "Consent document": ``recipient.kem``).
KEM_X25519 = "X25519"
KEM_MLKEM768_X25519 = "MLKEM768-X25519"
#: Raw public key sizes: X25519 (RFC 7748); X-Wing style ML-KEM-768 + X25519 (1184 + 32).
KEM_PK_LENGTH = {KEM_X25519: 32, KEM_MLKEM768_X25519: 1216}
#: The encapsulated key at the start of ``enc || ct``: 32 bytes for X25519, ML-KEM-768's 1088 + 32 for the hybrid.
ENC_LENGTH = {KEM_X25519: 32, KEM_MLKEM768_X25519: 1088 + 32}
#: The HPKE suite of each KEM: KDF HKDF-SHA256 and AEAD AES-256-GCM for both.
SUITES = {
    KEM_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    KEM_MLKEM768_X25519: hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}


def hpke_info(device: str, grant: str) -> bytes:
    """The HPKE ``info`` of a grant's envelopes: ``b"vgw/1 " + device + b"/" + grant`` (UTF-8). It binds an
    envelope to its device and grant: one re-published on another device's or grant's topic does not open."""
    return b"vgw/1 " + device.encode("utf-8") + b"/" + grant.encode("utf-8")
