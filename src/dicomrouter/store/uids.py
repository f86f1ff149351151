"""UID validation. A UID is also a file name in storage, so this is a security check.

Only digits and dots pass, each component non-empty, 64 characters at most
(PS3.5 9.1). Leading zeros inside components are tolerated because real modalities
emit them; they cannot form a path traversal either way.
"""

from __future__ import annotations

import re

# fullmatch, not match with "$": "$" also matches before a trailing newline.
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


class InvalidUID(ValueError):
    """A UID that is missing, too long or not made of digits and dots."""


def validate_uid(value: object, name: str) -> str:
    text = str(value).strip("\x00 ") if value is not None else ""
    if not text:
        raise InvalidUID(f"{name} is missing")
    if len(text) > 64:
        raise InvalidUID(f"{name} is longer than 64 characters")
    if not _UID_RE.fullmatch(text):
        raise InvalidUID(f"{name} {text[:80]!r} is not a valid UID (digits and dots only)")
    return text
