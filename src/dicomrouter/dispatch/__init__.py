"""Dispatch stage: runs outside the receive path, one worker thread per association."""

from .service import Dispatcher

__all__ = ["Dispatcher"]
