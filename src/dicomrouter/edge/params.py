"""Parameter types shared by the API's endpoints, and the query-string check.

No query parameter may hold a control character (:class:`QueryTextMiddleware`):
a NUL in a filter once matched every job in SQL (and a bulk cancel with it canceled
them all), and nothing a person types into a filter contains one.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import Path
from pydantic import AllowInfNan, BeforeValidator
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomrouter.observe.logs import find_control

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


def control_character_error(key: str, value: str) -> str | None:
    """Why ``key=value`` is refused (it holds a control character), or None."""
    found = find_control(key) or find_control(value)
    if found is None:
        return None
    return f"{key!r}: control character {found!r} not allowed in a parameter"


class QueryTextMiddleware:
    """422 for a request whose query string holds a control character, naming the
    parameter, before any endpoint (API or dashboard) sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            query = scope["query_string"].decode("latin-1")
            for key, value in parse_qsl(query, keep_blank_values=True):
                reason = control_character_error(key, value)
                if reason is not None:
                    await _unprocessable(send, key, reason)
                    return
        await self.app(scope, receive, send)


async def _unprocessable(send: Send, key: str, reason: str) -> None:
    detail = [{"type": "value_error", "loc": ["query", key], "msg": reason}]
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 422,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
