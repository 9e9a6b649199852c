"""The device storage key and per-grant data keys.

The storage key (32 random bytes, a 0600 file) never encrypts data itself: it wraps (RFC 3394 AES key wrap)
one AES-256-GCM data key per grant. Destroying a grant's wrapped key makes every outbox row of that grant
unreadable at once, before the rows themselves are deleted.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from vgw.base.errors import StorageError
from vgw.base.fsutil import MAX_KEY_BYTES, atomic_write, check_owner, read_small_file

KEY_BYTES = 32
NONCE_BYTES = 12


def load_or_create_storage_key(path: Path, *, create: bool = True) -> bytes:
    """Read the storage key; create it (0600) when missing and ``create``. Raises StorageError for a missing,
    non-regular, oversized, foreign-owned, group/other-writable or group/other-readable key file."""
    try:
        key = read_small_file(path, what="storage key", max_bytes=MAX_KEY_BYTES)
    except FileNotFoundError:
        if not create:
            raise StorageError(f"{path}: storage key missing (run `vgw provision`)") from None
        key = os.urandom(KEY_BYTES)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, key, mode=0o600)
        return key
    st = check_owner(path, what="storage key", allow_root=True)
    if len(key) != KEY_BYTES:
        raise StorageError(f"{path}: storage key must be {KEY_BYTES} bytes, found {len(key)}")
    if st.st_mode & 0o077:
        raise StorageError(f"{path}: storage key is readable by others; chmod 600 it")
    return key


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def wrap(storage_key: bytes, data_key: bytes) -> bytes:
    return aes_key_wrap(storage_key, data_key)


def unwrap(storage_key: bytes, wrapped: bytes) -> bytes:
    try:
        return aes_key_unwrap(storage_key, wrapped)
    except InvalidUnwrap as exc:
        raise StorageError("a data key does not unwrap with this storage key (wrong or replaced key file?)") from exc


def seal_row(data_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad)


def open_row(data_key: bytes, blob: bytes, aad: bytes) -> bytes:
    return AESGCM(data_key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
