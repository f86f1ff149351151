"""The web dashboard: server-rendered pages (Jinja2 + htmx), no front-end build."""

from __future__ import annotations

from fastapi import FastAPI


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard's pages and static files to ``app``."""
