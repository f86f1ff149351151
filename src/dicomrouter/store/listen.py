"""Hear PostgreSQL ``NOTIFY``s on a channel, on a connection of its own.

What one node records in the index, another learns of at once this way (a new
configuration version). A notification can be lost (the connection broke, the node
was restarting), so listeners also poll what they wait for; on SQLite, with one
node, polling is all there is and no listener runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine

from .dialect import POSTGRESQL, dedicated_connection

log = logging.getLogger("dicomrouter.listen")

#: Seconds between two attempts to connect again after the connection broke.
RECONNECT = 5.0
#: Seconds between two looks at the stop flag while nothing is heard.
_WAKE = 1.0


class Listener(threading.Thread):
    """``LISTEN channel``, calling ``on_notify(payload)`` for each notification, and
    ``on_notify(None)`` after each (re)connection, since what was announced while
    the connection was down is lost. A thread; ``stop()`` ends it."""

    def __init__(
        self, engine: Engine, channel: str, on_notify: Callable[[str | None], None]
    ) -> None:
        super().__init__(name=f"listen-{channel}", daemon=True)
        if not channel.replace("_", "").isalnum():
            raise ValueError(f"not a channel name: {channel!r}")
        self.engine = engine
        self.channel = channel
        self.on_notify = on_notify
        self._halt = threading.Event()

    @staticmethod
    def needed(engine: Engine) -> bool:
        """Only PostgreSQL has NOTIFY (and several nodes)."""
        return engine.dialect.name == POSTGRESQL

    def run(self) -> None:
        while not self._halt.is_set():
            conn = None
            try:
                conn = dedicated_connection(self.engine, f"listen {self.channel}")
                conn.execute(f"LISTEN {self.channel}")
                self.on_notify(None)
                while not self._halt.is_set():
                    for notice in conn.notifies(timeout=_WAKE):
                        self.on_notify(notice.payload)
            except Exception as exc:
                if not self._halt.is_set():
                    log.warning(
                        "not listening on %s (%s); again in %gs", self.channel, exc, RECONNECT
                    )
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
            self._halt.wait(RECONNECT)

    def stop(self, timeout: float = 5.0) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout)
