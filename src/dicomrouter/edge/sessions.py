"""Dashboard sessions: start one at login, end it at logout. The API's
``POST /api/v1/login`` and the dashboard's login page both use these."""

from __future__ import annotations

from fastapi import Request

from dicomrouter.control import sessions
from dicomrouter.security import Principal
from dicomrouter.store import audit

from .auth import SESSION_ID, SESSION_STAMP, SESSION_USER, client_address, context, session_stamp


def start_session(request: Request, principal: Principal) -> None:
    ctx = context(request)
    user = ctx.config.auth.users[principal.name]
    address = client_address(request)
    end_session(request, audited=False)  # a new login replaces any previous session
    token = sessions.start(ctx.engine, principal.name, ctx.config.http.session_lifetime, address)
    request.session[SESSION_USER] = principal.name
    request.session[SESSION_STAMP] = session_stamp(user.password_hash)
    request.session[SESSION_ID] = token
    audit.record(ctx.engine, principal.name, "auth.login", source=address)


def end_session(request: Request, *, audited: bool = True) -> None:
    """Log out: the session ends on the server (its cookie no longer works, even
    replayed) and the cookie is cleared."""
    ctx = context(request)
    session = request.session
    if sessions.end(ctx.engine, str(session.get(SESSION_ID, ""))) and audited:
        who = str(session.get(SESSION_USER, "?"))
        audit.record(ctx.engine, who, "auth.logout", source=client_address(request))
    session.clear()
