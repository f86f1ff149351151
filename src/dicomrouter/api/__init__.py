"""The HTTP edge: REST API, dashboard and metrics over ``dicomrouter.control``."""

from dicomrouter.edge.context import AppContext

from .app import create_app

__all__ = ["AppContext", "create_app"]
