"""The HTTP edge: REST API, dashboard and metrics over ``dicomrouter.control``."""

from .app import create_app
from .context import AppContext

__all__ = ["AppContext", "create_app"]
