"""The receipts a device signs (README "Receipts"): their ``typ`` claims and the reasons an erasure gives.

Signing is :class:`vgw.contract.receipts.ReceiptSigner`'s, verifying :func:`vgw.cloud.envelopes.verify_receipt`'s;
both and every reader of receipts name the types from here.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErasureReason", "ReceiptType"]


class ReceiptType(StrEnum):
    """The ``typ`` claim of a receipt."""

    CONSENT_APPLIED = "consent-applied"  # claims: ver
    CONSENT_REJECTED = "consent-rejected"  # claims: ver (if readable), reason, detail, count (coalesced)
    ERASURE = "erasure"  # claims: grant, ver, batches_deleted, key_destroyed, reason


class ErasureReason(StrEnum):
    """The ``reason`` claim of an ``erasure`` receipt."""

    REVOKED = "revoked"
    EXPIRED = "expired"
    NOT_IN_FORCE = "not-in-force"
    UNINSTALL = "uninstall"  # vgw uninstall --purge
    NARROWED = "narrowed"  # the grant stays in force; stored batches it no longer permits were deleted
