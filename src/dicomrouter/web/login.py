"""The login page and logout: the same signed session cookie as ``/api/v1/login``."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from dicomrouter.edge.auth import TooManyAttempts, authenticate, password_login
from dicomrouter.edge.sessions import end_session, start_session

from .common import ctx_of, render, safe_next

router = APIRouter(include_in_schema=False)


@router.get("/login", summary="Login page")
def login_page(request: Request, next: str = "/") -> Response:
    if not ctx_of(request).config.auth.enabled or authenticate(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", _values(request, next=safe_next(next), error=None))


def _values(request: Request, **values: object) -> dict[str, object]:
    """The template's values, and whether there is anyone to log in as: with no users
    the page says how to create the first one instead of just refusing."""
    return {"no_users": not ctx_of(request).config.auth.users, **values}


@router.post("/login", summary="Log in from the form")
def login_submit(
    request: Request,
    username: str = Form(""),
    password: str = Form(""),
    next: str = Form("/"),
) -> Response:
    try:
        principal = password_login(request, username, password)
    except TooManyAttempts as exc:
        values = _values(request, next=safe_next(next), error=exc.detail, user=username)
        response = render(request, "login.html", values, status_code=429)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if principal is None:
        values = _values(
            request, next=safe_next(next), error="Wrong user name or password.", user=username
        )
        return render(request, "login.html", values, status_code=401)
    start_session(request, principal)
    return RedirectResponse(safe_next(next), status_code=303)


@router.post("/logout", summary="Log out")
def logout(request: Request) -> Response:
    end_session(request)
    return RedirectResponse("/login", status_code=303)
