"""The HTTP application: REST API under ``/api/v1``, dashboard at ``/``, ``/metrics``.

One FastAPI app, built from small routers (one module per resource). The OpenAPI
description is served at ``/api/docs``. Sessions are signed cookies
(``SameSite=Strict``, so another site cannot make a logged-in browser act); the
signing key lives in ``<storage>/.http_secret`` so restarts keep people logged in.
Cross-site requests that carry other credentials a browser adds by itself are
refused by :mod:`.csrf`.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.middleware.sessions import SessionMiddleware

from dicomrouter import __version__
from dicomrouter.edge.auth import LoginThrottle
from dicomrouter.edge.context import AppContext
from dicomrouter.edge.params import QueryTextMiddleware
from dicomrouter.store.private import PRIVATE_FILE, tighten
from dicomrouter.web import mount_dashboard

from . import (
    audit_api,
    config_api,
    destinations,
    docs_page,
    health,
    jobs,
    loops,
    metrics_api,
    nodes,
    pseudonyms,
    recovery,
    routes,
    session,
    studies,
)
from . import status as status_api
from .csrf import CrossSiteMiddleware
from .headers import SecurityHeadersMiddleware
from .limits import BodyLimitMiddleware
from .proxy import ProxyHeadersMiddleware

log = logging.getLogger("dicomrouter.http")

SESSION_COOKIE = "dicomrouter_session"
#: Shorter keys (e.g. a file left empty by a crash while it was written) are replaced.
MIN_SECRET_LENGTH = 32


def _write_secret(path: Path, secret: str, *, replace: bool) -> bool:
    """Write ``secret`` to ``path`` atomically (temporary file, fsync, rename), mode
    0600. Without ``replace``, an existing file wins (another process was first):
    returns False then."""
    temporary = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secret)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # like O_EXCL, but never a half-written file
            except FileExistsError:
                return False
    finally:
        temporary.unlink(missing_ok=True)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return True
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return True


def session_secret(storage_root: Path) -> str:
    """Read, or create (mode 0600), the key that signs session cookies.

    A key shorter than :data:`MIN_SECRET_LENGTH` (empty after a crash, or edited by
    hand) is replaced by a new one, which logs everybody out; a file readable by
    others is made private again. Both are logged."""
    path = storage_root / ".http_secret"
    for _ in range(3):
        try:
            secret = path.read_text().strip()
        except FileNotFoundError:
            fresh = secrets.token_urlsafe(32)
            if _write_secret(path, fresh, replace=False):
                return fresh
            continue  # another process created it meanwhile: use theirs
        if len(secret) < MIN_SECRET_LENGTH:
            log.warning(
                "%s holds a key of %d characters (at least %d needed): writing a new "
                "one; dashboard sessions end",
                path,
                len(secret),
                MIN_SECRET_LENGTH,
            )
            fresh = secrets.token_urlsafe(32)
            _write_secret(path, fresh, replace=True)
            return fresh
        tighten(path, PRIVATE_FILE)
        return secret
    raise RuntimeError(f"cannot read or create {path}")


def _json_safe(value: Any) -> Any:
    """NaN and infinities as text: a 422 that echoes ``{"since": NaN}`` must not
    become a 500 because the error itself cannot be written as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))}
    )


def create_app(ctx: AppContext) -> FastAPI:
    app = FastAPI(
        title="dicomrouter",
        version=__version__,
        description="Operate a dicomrouter node: health, queues, history, manual actions, "
        "configuration. Authenticate with a session cookie (`POST /api/v1/login`), "
        "`Authorization: Bearer <token>` or HTTP Basic. Cross-site POST/PUT/PATCH/DELETE "
        "from a browser are refused (403).",
        docs_url=None,  # our own page (docs_page): Swagger UI from this server, not a CDN
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.ctx = ctx
    app.state.login_throttle = LoginThrottle()
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(ctx.store.root),
        session_cookie=SESSION_COOKIE,
        max_age=int(ctx.config.http.session_lifetime),
        same_site="strict",
        # Over HTTPS the cookie is never sent over plain HTTP (``http.tls`` is bound
        # at start-up: a change needs a restart, which builds a new app).
        https_only=ctx.config.http.tls is not None,
    )
    # Added later, run earlier: a refused request never touches the session, a body
    # is bounded before anything reads it, the client address is settled before
    # anything records it, and every answer (refusals too) gets the security headers.
    app.add_middleware(CrossSiteMiddleware, auth_enabled=lambda: ctx.config.auth.enabled)
    app.add_middleware(QueryTextMiddleware)
    app.add_middleware(BodyLimitMiddleware, http_config=lambda: ctx.config.http)
    app.add_middleware(ProxyHeadersMiddleware, trusted=lambda: ctx.config.http.trusted_proxies)
    app.add_middleware(SecurityHeadersMiddleware)
    for module in (
        health,
        session,
        status_api,
        destinations,
        recovery,  # before jobs: /api/v1/jobs/orphaned is not a job id
        jobs,
        studies,
        routes,
        config_api,
        audit_api,
        pseudonyms,
        metrics_api,
        loops,
        nodes,
        docs_page,
    ):
        app.include_router(module.router)
    mount_dashboard(app)
    return app
