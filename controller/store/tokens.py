"""API tokens: generated, hashed with a per-row salt, verified in constant time.

A generated token reads "gl_<id>_<secret>": the id is public and finds the principal's row in
one lookup; the 32-byte random secret is what proves possession. Such secrets are too long to
guess, so a salted SHA-256 suffices and keeps per-request authentication cheap. A token an
operator chose (the bootstrap admin's, from the environment) may be weak: it gets scrypt.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

SHA256 = "sha256"
SCRYPT = "scrypt"
_GENERATED = re.compile(r"gl_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class TokenHash:
    token_id: str | None
    scheme: str
    salt: str  # hex
    digest: str  # hex


def generate() -> tuple[str, TokenHash]:
    """A fresh token and what to store for it."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return f"gl_{token_id}_{secret}", _hashed(token_id, SHA256, secret)


def chosen(token: str) -> TokenHash:
    """What to store for a token the caller picked."""
    if not token.strip():
        raise ValueError("a token must not be empty")
    found = _GENERATED.fullmatch(token)
    if found:
        return _hashed(found.group(1), SHA256, found.group(2))
    return _hashed(None, SCRYPT, token)


def token_id_of(token: str) -> str | None:
    found = _GENERATED.fullmatch(token)
    return found.group(1) if found else None


def verify(token: str, stored: TokenHash) -> bool:
    found = _GENERATED.fullmatch(token)
    secret = found.group(2) if found and stored.token_id is not None else token
    digest = _digest(stored.scheme, bytes.fromhex(stored.salt), secret)
    return hmac.compare_digest(digest, stored.digest)


def _hashed(token_id: str | None, scheme: str, secret: str) -> TokenHash:
    salt = secrets.token_bytes(16)
    return TokenHash(token_id, scheme, salt.hex(), _digest(scheme, salt, secret))


def _digest(scheme: str, salt: bytes, secret: str) -> str:
    data = secret.encode()
    if scheme == SHA256:
        return hashlib.sha256(salt + data).hexdigest()
    if scheme == SCRYPT:
        return hashlib.scrypt(data, salt=salt, n=2**14, r=8, p=1, dklen=32).hex()
    raise ValueError(f"unknown token hash scheme {scheme!r}")
