"""Parameter types shared by the API's endpoints."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any

from fastapi import Path
from pydantic import AllowInfNan, BeforeValidator

#: The largest row id SQLite (a signed 64-bit integer) can hold.
MAX_ID = 2**63 - 1

#: A row id in a URL path (job, configuration version): 1 .. 2**63-1, so a larger
#: number is a 422 instead of an overflow (a 500) in the database driver.
RowId = Annotated[int, Path(ge=1, le=MAX_ID, description="Row id (1 .. 2**63-1)")]


def _finite(number: float, value: Any) -> float:
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a point in time (not a finite number)")
    return number


def parse_timestamp(value: Any) -> Any:
    """POSIX seconds, or an ISO 8601 date/time (without a zone: the router's local
    time), so both scripts and people typing curl are served. Anything else is left
    to pydantic, which answers 422. NaN and infinities are refused (422): compared
    with in SQL they would match everything or nothing."""
    if isinstance(value, float):
        return _finite(value, value)
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            return _finite(number, value)
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise ValueError(
                f"{value!r} is neither POSIX seconds nor an ISO 8601 time "
                "(e.g. 2026-11-22T08:00 or 2026-11-22)"
            ) from None
    return value


#: A point in time: POSIX seconds or ISO 8601 (``2026-11-22T08:00``, ``2026-11-22``).
Timestamp = Annotated[float, BeforeValidator(parse_timestamp), AllowInfNan(False)]
