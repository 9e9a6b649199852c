"""Owners' passwords as scrypt hashes (RFC 7914, through cryptography; parameters as OWASP's password
storage guidance gives for scrypt: N = 2^17, r = 8, p = 1). Stored as ``scrypt$N$r$p$salt$hash`` (base64url),
so the cost can rise later without breaking the hashes already stored."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vgw.cloud.consent_authority import b64url, b64url_decode

__all__ = ["hash_password", "verify_password"]

_N, _R, _P, _LEN = 2**17, 8, 1, 32
MAX_PASSWORD = 1024  # a megabyte "password" must not cost a megabyte of scrypt


def hash_password(password: str, *, n: int = _N) -> str:
    """A fresh salted hash of ``password``. Raises ``ValueError`` for an empty or over-long password."""
    if not password or len(password) > MAX_PASSWORD:
        raise ValueError(f"a password must have 1 to {MAX_PASSWORD} characters")
    salt = os.urandom(16)
    digest = Scrypt(salt=salt, length=_LEN, n=n, r=_R, p=_P).derive(password.encode())
    return f"scrypt${n}${_R}${_P}${b64url(salt)}${b64url(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant time). A malformed ``stored`` never matches."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt" or len(password) > MAX_PASSWORD:
            return False
        Scrypt(salt=b64url_decode(salt), length=_LEN, n=int(n), r=int(r), p=int(p)).verify(
            password.encode(), b64url_decode(digest))
    except (ValueError, InvalidKey):
        return False
    return True


def dummy_check(password: str) -> None:
    """Spend what a real check spends, so an unknown user name takes as long as a wrong password."""
    hash_password(password[:MAX_PASSWORD] or "x")
