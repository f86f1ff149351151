"""Log in and out (a signed cookie naming a session kept on the server), and
``/api/v1/me``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from dicomrouter.control import sessions
from dicomrouter.security import Principal
from dicomrouter.store import audit

from .auth import (
    SESSION_ID,
    SESSION_STAMP,
    SESSION_USER,
    client_address,
    context,
    password_login,
    session_stamp,
    viewer,
)

router = APIRouter(prefix="/api/v1", tags=["session"])


class Login(BaseModel):
    username: str
    password: str


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


@router.post(
    "/login",
    summary="Start a dashboard session (sets a cookie)",
    responses={429: {"description": "Too many failed logins from this address"}},
)
def login(body: Login, request: Request) -> dict[str, Any]:
    principal = password_login(request, body.username, body.password)
    if principal is None:
        raise HTTPException(401, "wrong user name or password")
    start_session(request, principal)
    return principal.as_dict()


@router.post("/logout", summary="End the dashboard session")
def logout(request: Request) -> dict[str, str]:
    end_session(request)
    return {"status": "logged out"}


@router.get("/me", summary="Who am I, and with which role")
def me(principal: Principal = viewer) -> dict[str, Any]:
    return principal.as_dict()
