"""Dashboard sessions kept on the server, so that they can be ended.

A signed cookie alone cannot be revoked: after logout (or after it was copied) it
would stay valid until it expires. So the cookie carries only a random token, and
the index keeps the token's SHA-256 with the user and an expiry. Logging out deletes
the row; a request with a token that has no live row is anonymous.

The lifetime slides: every request made with a session moves its expiry to
``now + http.session_lifetime``. To keep the index's write lock for the receiver,
the row is rewritten at most every :data:`TOUCH_INTERVAL` seconds, so a session can
end up to that much earlier than the lifetime says. Expired rows are deleted when
someone logs in.

Every time here is the database's (``database_now``): behind a load balancer, a
session started on one node is checked and slid on the others, whose wall clocks
may differ (one ahead would log everyone out, or delete their sessions).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, delete, select, update

from dicomrouter.store.dialect import database_now
from dicomrouter.store.schema import http_sessions

#: Seconds between two writes of one session's expiry.
TOUCH_INTERVAL = 60.0


@dataclass(frozen=True)
class Session:
    """A live session: ``key`` is the row's id (the token's SHA-256)."""

    key: str
    user: str
    last_seen: float
    expires_at: float
    #: The database's time when it was found live (what :func:`touch` compares).
    found_at: float = 0.0


def _key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def start(engine: Engine, user: str, lifetime: float, source: str = "") -> str:
    """A new session for ``user``; returns the token for the cookie."""
    token = secrets.token_urlsafe(32)
    with engine.begin() as conn:
        now = database_now(conn)
        conn.execute(delete(http_sessions).where(http_sessions.c.expires_at <= now))
        conn.execute(
            http_sessions.insert().values(
                id=_key(token),
                user=user[:128],
                created_at=now,
                last_seen=now,
                expires_at=now + lifetime,
                source=source[:64],
            )
        )
    return token


def find(engine: Engine, token: str) -> Session | None:
    """The live session with this token, or None (unknown, ended or expired)."""
    if not token:
        return None
    with engine.connect() as conn:
        row = conn.execute(
            select(
                http_sessions.c.id,
                http_sessions.c.user,
                http_sessions.c.last_seen,
                http_sessions.c.expires_at,
            ).where(http_sessions.c.id == _key(token))
        ).first()
        now = database_now(conn)
    if row is None or row.expires_at <= now:
        return None
    return Session(row.id, row.user, row.last_seen, row.expires_at, now)


def touch(engine: Engine, session: Session, lifetime: float) -> None:
    """Slide the session's expiry to now + ``lifetime`` (at most every
    :data:`TOUCH_INTERVAL` seconds)."""
    if session.found_at - session.last_seen < TOUCH_INTERVAL:
        return
    with engine.begin() as conn:
        now = database_now(conn)
        conn.execute(
            update(http_sessions)
            .where(http_sessions.c.id == session.key)
            .values(last_seen=now, expires_at=now + lifetime)
        )


def end(engine: Engine, token: str) -> bool:
    """End the session with this token; whether there was one."""
    if not token:
        return False
    with engine.begin() as conn:
        result = conn.execute(delete(http_sessions).where(http_sessions.c.id == _key(token)))
    return bool(result.rowcount)


def end_user(engine: Engine, user: str) -> int:
    """End every session of ``user`` (password changed, user removed)."""
    with engine.begin() as conn:
        result = conn.execute(delete(http_sessions).where(http_sessions.c.user == user))
    return int(result.rowcount or 0)
