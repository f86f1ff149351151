"""Parameter types shared by the API's endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BeforeValidator


def parse_timestamp(value: Any) -> Any:
    """POSIX seconds, or an ISO 8601 date/time (without a zone: the router's local
    time), so both scripts and people typing curl are served. Anything else is left
    to pydantic, which answers 422."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise ValueError(
                f"{value!r} is neither POSIX seconds nor an ISO 8601 time "
                "(e.g. 2026-11-22T08:00 or 2026-11-22)"
            ) from None
    return value


#: A point in time: POSIX seconds or ISO 8601 (``2026-11-22T08:00``, ``2026-11-22``).
Timestamp = Annotated[float, BeforeValidator(parse_timestamp)]
