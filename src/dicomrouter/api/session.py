"""Log in and out (a signed cookie naming a session kept on the server), and
``/api/v1/me``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from dicomrouter.edge.auth import password_login, viewer
from dicomrouter.edge.sessions import end_session, start_session
from dicomrouter.security import Principal

router = APIRouter(prefix="/api/v1", tags=["session"])


class Login(BaseModel):
    username: str
    password: str


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
