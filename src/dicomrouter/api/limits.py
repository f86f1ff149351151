"""Bound request bodies before anything reads them (authentication included).

FastAPI reads a JSON body before it resolves the dependencies that authenticate the
caller, so without a bound an anonymous client could make the process hold any
amount of memory. This pure ASGI middleware runs first: a ``Content-Length`` above
the limit gets 413 without a byte of the body being read, and a body without one
(chunked) is counted as the application pulls it and cut off with 413 as soon as it
passes the limit.

Three limits (``http.*``): configuration uploads (``max_config_size``), the rule
tester's DICOM files (``max_upload_size``) and every other body (``max_body_size``).
They are read from the live configuration on every request.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomrouter.config.models import HttpConfig

#: Paths whose bodies are configuration texts (API and dashboard).
CONFIG_PATHS = ("/api/v1/config", "/config/")
#: Paths that take DICOM file uploads (the rule tester, API and dashboard).
UPLOAD_PATHS = frozenset({"/api/v1/routes/test", "/routes/test"})


def body_limit(http: HttpConfig, path: str) -> tuple[int, str]:
    """(bytes, the ``http.*`` key that sets it) for a request to ``path``."""
    if path in UPLOAD_PATHS:
        return http.max_upload_size, "http.max_upload_size"
    if path == "/config" or path.startswith(CONFIG_PATHS):
        return http.max_config_size, "http.max_config_size"
    return http.max_body_size, "http.max_body_size"


def too_large_message(size: int | None, limit: int, key: str) -> str:
    found = f"of {size} bytes " if size is not None else ""
    return f"request body {found}is over the limit of {limit} bytes ({key})"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes its limit. An
    ``HTTPException``, so FastAPI's body reading lets it through as a 413."""

    def __init__(self, limit: int, key: str) -> None:
        super().__init__(413, too_large_message(None, limit, key))


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, http_config: Callable[[], HttpConfig]) -> None:
        self.app = app
        #: The *current* ``http`` section (configuration reloads change limits).
        self.http_config = http_config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, key = body_limit(self.http_config(), scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, too_large_message(declared, limit, key))
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, key)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _refuse(send, str(exc.detail))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _refuse(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
