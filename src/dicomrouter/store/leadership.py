"""One node for a duty that must run once across nodes (alerts, notifications): the
holder of a PostgreSQL session-level advisory lock.

Every node that may do the duty calls :meth:`Leadership.check` before each round of
it. The first to ask takes ``pg_try_advisory_lock`` on a connection of its own, kept
open; it is the leader for as long as that connection lives, and each later check
confirms it with one ``SELECT 1``. The lock is the session's: when the node dies, is
killed, or loses the database (keepalives, ``dialect.KEEPALIVES``), PostgreSQL ends
the session and frees the lock, and the next node that checks takes it: the duty
moves within one of its intervals. A leader whose connection broke learns it at its
next check, and stops. No consensus of our own: PostgreSQL is the referee.

On SQLite there is one node, and it is always the leader.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

from sqlalchemy import Engine

from .dialect import POSTGRESQL, dedicated_connection

log = logging.getLogger("dicomrouter.leader")


def lock_key(duty: str) -> int:
    """The advisory lock's key for ``duty``: 64 bits of a hash of its name, so every
    node agrees on it and no two duties share one (nor the write lock's key)."""
    digest = hashlib.sha256(f"dicomrouter leader: {duty}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership:
    """Whether this process is the leader for ``duty`` (thread-safe)."""

    def __init__(self, engine: Engine, duty: str, announce: bool = True) -> None:
        """``announce``: log each time this process becomes the leader (a duty that
        holds the lock for one run at a time, as the purge, need not)."""
        self.engine = engine
        self.duty = duty
        self.announce = announce
        self.key = lock_key(duty)
        self.shared = engine.dialect.name == POSTGRESQL
        self._lock = threading.Lock()
        self._conn: Any = None
        self._held = False

    def check(self) -> bool:
        """True when this process leads ``duty`` now: it held the lock and its
        connection still answers, or it just took the lock. False while another
        node holds it, or when the database cannot be reached (then nobody here
        does the duty: better none than two)."""
        if not self.shared:
            return True
        with self._lock:
            if self._held:
                try:
                    self._conn.execute("SELECT 1")
                    return True
                except Exception as exc:
                    log.warning(
                        "no longer the %s leader: its connection broke (%s)", self.duty, exc
                    )
                    self._drop()
            try:
                if self._conn is None:
                    self._conn = dedicated_connection(self.engine, f"leader {self.duty}")
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            except Exception as exc:
                log.warning("cannot ask for the %s leadership: %s", self.duty, exc)
                self._drop()
                return False
            self._held = bool(row and row[0])
            if self._held and self.announce:
                log.info("this node is now the %s leader", self.duty)
            return self._held

    @property
    def held(self) -> bool:
        """What the last check found (no database round trip)."""
        return self._held or not self.shared

    def release(self) -> None:
        """Give the duty up (a clean stop): close the connection, which frees the lock."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        conn, self._conn, self._held = self._conn, None, False
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
