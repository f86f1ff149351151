"""The key of the re-identification mapping, and what it does: seal an original,
open it again, and hash it for look-ups.

The environment variable a ``deidentify`` step's ``mapping.key_env`` names holds a
secret (at least :data:`MIN_SECRET` characters; a Fernet key or ``openssl rand
-base64 32`` will do). Three values are derived from it with HKDF-SHA256, each
under its own label, so none tells anything about the others:

- the AES-256-GCM key that encrypts each original (a random 96-bit nonce per row,
  the row's pipeline, kind and pseudonym as associated data: a sealed original
  moved to another row does not open);
- the HMAC-SHA256 key of the look-up hash, which finds a row from its original
  without decrypting every row, and keys the idempotent insert;
- the key id, stored with each row, so that a read with another key says so
  plainly instead of failing on every row.

The secret and the derived keys are never written anywhere, nor put in a message.
No cryptography of our own: ``cryptography``'s HKDF, AESGCM and HMAC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .base import MappingRecord, TransformUnavailable

#: The kinds of entries, in the order a re-identification lists them.
KINDS = ("patient", "date_offset", "study", "series", "instance")
#: The shortest secret accepted, in characters.
MIN_SECRET = 32

_SALT = b"dicomrouter re-identification mapping"
_NONCE = 12


class MappingKeyError(Exception):
    """A row cannot be opened with this key (another key, or altered data)."""


def _derive(secret: bytes, label: str, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=label.encode()).derive(
        secret
    )


def _aad(pipeline: str, kind: str, pseudonym: str) -> bytes:
    return "\x00".join((pipeline, kind, pseudonym)).encode("utf-8", "surrogateescape")


class MappingKey:
    """The keys derived from one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET:
            raise ValueError(f"shorter than {MIN_SECRET} characters")
        self._aead = AESGCM(_derive(secret, "aes-256-gcm v1", 32))
        self._lookup = _derive(secret, "lookup hmac v1", 32)
        self.key_id = _derive(secret, "key id v1", 8).hex()

    @classmethod
    def from_environ(cls, variable: str, environ: Mapping[str, str]) -> MappingKey:
        """The key in ``environ[variable]``; missing, empty or too short:
        TransformUnavailable naming the variable (never the value)."""
        value = environ.get(variable, "")
        if not value:
            state = "empty" if variable in environ else "missing"
            raise TransformUnavailable(
                f"the re-identification mapping key is not set: environment variable "
                f"{variable} is {state} (nothing is sent until it can be recorded)"
            )
        try:
            return cls(value.encode("utf-8", "surrogateescape"))
        except ValueError as exc:
            raise TransformUnavailable(
                f"the re-identification mapping key in {variable} is unusable: {exc}"
            ) from None

    def lookup(self, kind: str, material: bytes) -> str:
        """The look-up hash of an original of ``kind`` (hex)."""
        message = kind.encode() + b"\x00" + material
        return hmac.new(self._lookup, message, hashlib.sha256).hexdigest()

    def seal(
        self,
        pipeline: str,
        kind: str,
        material: bytes,
        pseudonym: str,
        original: Mapping[str, Any],
    ) -> MappingRecord:
        """The row recording ``original`` (shown on re-identification) under
        ``pseudonym``; ``material`` is what the look-up hash is computed on."""
        nonce = os.urandom(_NONCE)
        plain = json.dumps(dict(original), sort_keys=True, ensure_ascii=False).encode(
            "utf-8", "surrogateescape"
        )
        sealed = nonce + self._aead.encrypt(nonce, plain, _aad(pipeline, kind, pseudonym))
        return MappingRecord(
            pipeline=pipeline,
            kind=kind,
            lookup=self.lookup(kind, material),
            pseudonym=pseudonym,
            sealed=base64.b64encode(sealed).decode("ascii"),
            key_id=self.key_id,
        )

    def open(self, pipeline: str, kind: str, pseudonym: str, sealed: str) -> dict[str, Any]:
        """The original recorded in a row; MappingKeyError if this key cannot open it."""
        try:
            raw = base64.b64decode(sealed)
            plain = self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], _aad(pipeline, kind, pseudonym))
        except (InvalidTag, ValueError) as exc:
            raise MappingKeyError(
                "the recorded original cannot be decrypted with this key (another key, "
                "or the row was altered)"
            ) from exc
        value = json.loads(plain.decode("utf-8", "surrogateescape"))
        return value if isinstance(value, dict) else {"value": value}
