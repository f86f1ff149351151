"""Passwords, API tokens and roles.

Passwords are stored as scrypt hashes (memory-hard, in the standard library, so no
extra dependency): ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``. API tokens are
long random strings, so a fast SHA-256 is enough to keep them out of the file
(``sha256$<hex>``); what matters is that a leaked config file does not leak them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_TOKEN_PREFIX = "drt_"  # makes a leaked token easy to recognise (and to grep for)


class Role(IntEnum):
    """Roles are ordered: each one may do everything the ones below it may."""

    viewer = 1
    operator = 2
    admin = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        return cls[name]


@dataclass(frozen=True)
class Principal:
    """Who is making a request: a user (password or session) or an API token."""

    name: str
    role: Role
    kind: str  # "user" | "token" | "anonymous"

    def may(self, role: Role) -> bool:
        return self.role >= role

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role.name, "kind": self.kind}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse_password_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != "scrypt":
        raise ValueError(scheme)
    return int(n), int(r), int(p), base64.b64decode(salt), base64.b64decode(digest)


def check_password_hash_format(stored: str) -> str:
    try:
        _parse_password_hash(stored)
    except (ValueError, TypeError):
        raise ValueError(
            "not a password hash: expected 'scrypt$...' as printed by "
            "'dicomrouter hash-password' (never put a plain password in the file)"
        ) from None
    return stored


def verify_password(password: str, stored: str) -> bool:
    try:
        n, r, p, salt, expected = _parse_password_hash(stored)
    except (ValueError, TypeError):
        return False
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(expected))
    return hmac.compare_digest(digest, expected)


def new_token() -> str:
    return _TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return "sha256$" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_token_hash_format(stored: str) -> str:
    scheme, _, digest = stored.partition("$")
    if scheme != "sha256" or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(
            "not a token hash: expected 'sha256$<64 hex digits>' as printed by "
            "'dicomrouter token' (never put a plain token in the file)"
        )
    return stored


def verify_token(token: str, stored: str) -> bool:
    return hmac.compare_digest(hash_token(token), stored)


def new_password() -> str:
    return secrets.token_urlsafe(12)
