"""The web dashboard: server-rendered pages (Jinja2 + htmx), no front-end build.

Pages are thin: they read through :mod:`dicomrouter.control` and act through the
same functions as the REST API, so a retry from the browser is audited and checked
exactly like one from a script. htmx (vendored in ``static/``, never from a CDN:
hospital networks are often offline) only refreshes parts of pages; every form is a
plain POST that works without it.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from . import (
    audit_pages,
    common,
    config_pages,
    destinations_pages,
    jobs_pages,
    login,
    nodes_pages,
    overview,
    recovery_pages,
    routes_pages,
    studies_pages,
)


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard's pages and static files to ``app``."""
    app.mount("/static", StaticFiles(directory=common.HERE / "static"), name="static")
    app.add_exception_handler(common.LoginRequired, common.login_redirect)
    app.add_exception_handler(common.PageForbidden, common.forbidden_page)
    for module in (
        login,
        overview,
        recovery_pages,
        destinations_pages,
        jobs_pages,
        studies_pages,
        routes_pages,
        config_pages,
        audit_pages,
        nodes_pages,
    ):
        app.include_router(module.router)
