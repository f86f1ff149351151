"""Turning DICOM strings and YAML scalars into comparable values.

Both sides of a comparison go through the same parsers, so ``StudyDate: {ge: 20240101}``
(an int in YAML) and ``"2024-01-01"`` mean the same thing as the DICOM ``"20240101"``.
Parsers return ``None`` instead of raising: an unparseable value in an instance
simply does not match, while the compiler turns ``None`` for a rule value into a
:class:`RuleError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime, time
from typing import Any

_NUMBER_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_DT_RE = re.compile(
    r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?(?:[+-]\d{4})?$"
)

Parser = Callable[[Any], Any]


def to_number(value: Any) -> float | int | None:
    """A number from an int/float (pydicom IS/DS are subclasses) or a numeric string.

    Strings such as ``"045Y"`` (PatientAge), ``"nan"`` or ``"inf"`` are *not*
    numbers here: a rule must never match them numerically by accident.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    text = str(value).strip(" \0")
    if _NUMBER_RE.match(text):
        return float(text)
    return None


def parse_date(value: Any) -> date | None:
    """DA ``YYYYMMDD``; also the legacy ``YYYY.MM.DD`` and ISO ``YYYY-MM-DD``."""
    text = str(value).strip(" \0").replace("-", "").replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def parse_time(value: Any) -> time | None:
    """TM ``HH[MM[SS[.FFFFFF]]]``; colons (legacy and ISO ``HH:MM:SS``) are accepted."""
    text = str(value).strip(" \0").replace(":", "")
    main, _, fraction = text.partition(".")
    if len(main) not in (2, 4, 6) or not main.isdigit() or not (fraction.isdigit() or not fraction):
        return None
    hour, minute, second = int(main[:2]), int(main[2:4] or 0), int(main[4:6] or 0)
    try:
        return time(hour, minute, min(second, 59), int(fraction[:6].ljust(6, "0") or 0))
    except ValueError:
        return None


def parse_datetime(value: Any) -> datetime | None:
    """DT ``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]`` or ISO 8601; the UTC offset is ignored.

    Dropping the offset compares DT values as the wall-clock time written in the
    header, which is what a PACS admin reads in a viewer, and avoids mixing
    naive and aware datetimes.
    """
    text = str(value).strip(" \0")
    match = _DT_RE.match(text)
    try:
        if match:
            year, month, day, hour, minute, second, fraction = match.groups()
            return datetime(
                int(year),
                int(month or 1),
                int(day or 1),
                int(hour or 0),
                int(minute or 0),
                min(int(second or 0), 59),
                int((fraction or "0").ljust(6, "0")),
            )
        return datetime.fromisoformat(text).replace(tzinfo=None)
    except ValueError:
        return None


def wildcard_regex(pattern: str) -> re.Pattern[str] | None:
    """A compiled full-match regex for a DICOM wildcard string, or None without wildcards.

    ``*`` matches any run of characters (also none), ``?`` exactly one, as in C-FIND.
    """
    if "*" not in pattern and "?" not in pattern:
        return None
    body = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    return re.compile(body, re.DOTALL)


_BARE_RE = re.compile(r"^[A-Za-z0-9_.*?^/:+-]+$")


def token(value: Any) -> str:
    """A rule value for ``describe()``: bare when unambiguous (``CT``), quoted otherwise."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format_number(value)
    text = str(value)
    return text if _BARE_RE.match(text) else quoted(text)


def quoted(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format_number(value)
    return f"'{value}'"


def format_number(value: float | int) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
