"""Log in and out (a signed session cookie), and ``/api/v1/me``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from dicomrouter.control import audit
from dicomrouter.control.security import Principal

from .auth import (
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
    request.session.clear()
    request.session[SESSION_USER] = principal.name
    request.session[SESSION_STAMP] = session_stamp(user.password_hash)
    audit.record(ctx.engine, principal.name, "auth.login", source=client_address(request))


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
    request.session.clear()
    return {"status": "logged out"}


@router.get("/me", summary="Who am I, and with which role")
def me(principal: Principal = viewer) -> dict[str, Any]:
    return principal.as_dict()
