"""The HTTP application: REST API under ``/api/v1``, dashboard at ``/``, ``/metrics``.

One FastAPI app, built from small routers (one module per resource). The OpenAPI
description is served at ``/api/docs``. Sessions are signed cookies
(``SameSite=Strict``, so another site cannot make a logged-in browser act); the
signing key lives in ``<storage>/.http_secret`` so restarts keep people logged in.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fastapi import FastAPI
from starlette.middleware.sessions import SessionMiddleware

from dicomrouter import __version__

from . import (
    audit_api,
    config_api,
    destinations,
    health,
    jobs,
    metrics_api,
    routes,
    session,
    studies,
)
from . import status as status_api
from .context import AppContext

SESSION_COOKIE = "dicomrouter_session"


def session_secret(storage_root: Path) -> str:
    """Read, or create (mode 0600), the key that signs session cookies."""
    path = storage_root / ".http_secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        secret = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret)
        return secret


def create_app(ctx: AppContext) -> FastAPI:
    app = FastAPI(
        title="dicomrouter",
        version=__version__,
        description="Operate a dicomrouter node: health, queues, history, manual actions, "
        "configuration. Authenticate with a session cookie (`POST /api/v1/login`), "
        "`Authorization: Bearer <token>` or HTTP Basic.",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.ctx = ctx
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(ctx.store.root),
        session_cookie=SESSION_COOKIE,
        max_age=int(ctx.config.http.session_lifetime),
        same_site="strict",
    )
    for module in (
        health,
        session,
        status_api,
        destinations,
        jobs,
        studies,
        routes,
        config_api,
        audit_api,
        metrics_api,
    ):
        app.include_router(module.router)
    from dicomrouter.web import mount_dashboard

    mount_dashboard(app)
    return app
