"""What every dashboard page shares: templates, who is asking, flash messages.

Pages authenticate exactly like the API (:func:`dicomrouter.edge.auth.authenticate`:
session cookie first for a browser, a token or Basic for scripts), so a role change
in the configuration applies to both at once. A page differs from the API only in
how it says no: a browser without a session is sent to the login page instead of
getting a bare 401, and a role that is too small gets a readable 403 page.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dicomrouter import __version__
from dicomrouter.control.errors import ControlError, Invalid
from dicomrouter.edge.auth import authenticate, client_address, context
from dicomrouter.edge.context import AppContext
from dicomrouter.edge.params import parse_timestamp
from dicomrouter.security import Principal, Role

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")

#: Who sees which page in the navigation (and may open it).
AUDIT_ROLE = Role.admin  # as the API: the log holds failed logins and diffs
CONFIG_ROLE = Role.viewer  # redacted for all but admins; validate: operator; apply: admin

NAV: tuple[tuple[str, str, Role], ...] = (
    ("/", "Overview", Role.viewer),
    ("/destinations", "Destinations", Role.viewer),
    ("/jobs", "Jobs", Role.viewer),
    ("/studies", "Studies", Role.viewer),
    ("/routes", "Routes", Role.viewer),
    ("/nodes", "Nodes", Role.viewer),
    ("/config", "Configuration", CONFIG_ROLE),
    ("/audit", "Audit log", AUDIT_ROLE),
)

_FLASH = "flash"


class LoginRequired(Exception):
    """Raised by page dependencies when nobody is logged in: becomes a redirect."""


class PageForbidden(Exception):
    """The caller's role is too small for this page or action: a 403 page."""

    def __init__(self, principal: Principal, role: Role):
        super().__init__(f"this needs the {role.name} role; you are {principal.role.name}")
        self.principal = principal
        self.role = role


def page_user(request: Request) -> Principal:
    principal = authenticate(request)
    if principal is None:
        raise LoginRequired()
    return principal


def page_role(role: Role) -> Callable[[Request], Principal]:
    """A dependency: the caller if they have at least ``role`` (else login or 403)."""

    def dependency(request: Request) -> Principal:
        principal = page_user(request)
        if not principal.may(role):
            raise PageForbidden(principal, role)
        return principal

    return dependency


viewer = Depends(page_role(Role.viewer))
operator = Depends(page_role(Role.operator))
admin = Depends(page_role(Role.admin))


def safe_next(target: str | None) -> str:
    """Only local paths: a login form must not send people to another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def login_redirect(request: Request, exc: Exception) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    location = f"/login?next={quote(target if request.method == 'GET' else '/')}"
    if request.headers.get("hx-request"):
        # htmx follows a 3xx itself and would swap the login form into the page.
        return Response(status_code=204, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303)


def forbidden_page(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageForbidden)
    return render(
        request,
        "error.html",
        {"title": "Not allowed", "message": str(exc)},
        principal=exc.principal,
        status_code=403,
    )


def flash(request: Request, text: str, level: str = "ok") -> None:
    """A message shown once, on the next page (after the redirect of a POST)."""
    messages = list(request.session.get(_FLASH, []))
    messages.append([level, text])
    request.session[_FLASH] = messages[-5:]


def back(request: Request, default: str) -> RedirectResponse:
    """Redirect (303, so the browser GETs) to the page the form came from."""
    target = request.headers.get("referer", "")
    base = str(request.base_url)
    path = target[len(base) - 1 :] if target.startswith(base) else default
    return RedirectResponse(safe_next(path), status_code=303)


def run_action(request: Request, action: Callable[[], str]) -> None:
    """Run a control-plane action; show its result, or its error, as a flash message.

    Control errors (not found, conflict, invalid) are messages for the operator, not
    crashes: the page reloads and says what happened.
    """
    try:
        flash(request, action())
    except ControlError as exc:
        flash(request, str(exc), "error")


def actor(principal: Principal, request: Request) -> dict[str, str]:
    """The audit fields of a manual action: who, and from which address."""
    return {"actor": principal.name, "source": client_address(request)}


def ctx_of(request: Request) -> AppContext:
    return context(request)


def render(
    request: Request,
    template: str,
    values: Mapping[str, Any] | None = None,
    *,
    principal: Principal | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    who = principal or authenticate(request)
    role = who.role if who else Role.viewer
    data: dict[str, Any] = {
        "principal": who,
        "nav": [(path, label) for path, label, need in NAV if who and role >= need],
        "current_path": request.url.path,
        "can_operate": bool(who and who.may(Role.operator)),
        "can_admin": bool(who and who.may(Role.admin)),
        "version": __version__,
        "flashes": request.session.pop(_FLASH, []) if "session" in request.scope else [],
        "partial": bool(request.headers.get("hx-request")),
    }
    data.update(values or {})
    return templates.TemplateResponse(request, template, data, status_code=status_code)


# -- template filters -------------------------------------------------------------------
def when(value: float | None) -> str:
    if value is None:
        return "—"
    return dt.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


def age(seconds: float | None) -> str:
    """``3d 4h``, ``5m 12s``: two units are enough to judge how late something is."""
    if seconds is None:
        return "—"
    s = int(max(0, seconds))
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    shown = [f"{n}{u}" for n, u in parts if n][:2]
    return " ".join(shown) or "0s"


def ago(value: float | None) -> str:
    return "—" if value is None else f"{age(time.time() - value)} ago"


def size(value: float | None) -> str:
    if value is None:
        return "—"
    number = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(number) < 1024 or unit == "TiB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return f"{number:.1f} TiB"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def parse_time(value: str | None) -> float | None:
    """An ``<input type=datetime-local>`` value (local time), or anything the API
    takes (ISO 8601, POSIX seconds), as POSIX seconds. A value that is not a time is
    an error, never an ignored filter: a bulk action on "everything matching" must
    not widen because one field was mistyped."""
    if not value:
        return None
    try:
        return float(parse_timestamp(value))
    except ValueError as exc:
        raise Invalid(str(exc)) from None


templates.env.filters.update(when=when, age=age, ago=ago, size=size, percent=percent)
