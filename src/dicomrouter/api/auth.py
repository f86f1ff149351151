"""Authentication and roles for the HTTP service.

Three ways in, checked in this order:

- a dashboard session (signed cookie set by ``POST /api/v1/login`` or the login page);
- ``Authorization: Bearer <token>`` for scripts (tokens from ``auth.tokens``);
- ``Authorization: Basic`` with a user's password (handy for curl).

The role is looked up in the *current* configuration on every request, so removing
a user or lowering a role takes effect at once, sessions included. No credentials
give 401; too small a role gives 403. Failed logins are written to the audit log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections.abc import Callable

from fastapi import Depends, HTTPException, Request, status

from dicomrouter.control import audit
from dicomrouter.control.security import Principal, Role, verify_password, verify_token

from .context import AppContext

SESSION_USER = "user"
SESSION_STAMP = "stamp"

_ANONYMOUS_ADMIN = Principal("anonymous", Role.admin, "anonymous")


def context(request: Request) -> AppContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


class _PasswordCache:
    """scrypt costs ~50 ms by design; remember recent successful Basic logins (keyed
    by the stored hash too, so a password change invalidates the entry)."""

    def __init__(self, size: int = 256):
        self._ok: dict[tuple[str, str, str], None] = {}
        self._size = size
        self._lock = threading.Lock()

    def check(self, name: str, password: str, stored: str) -> bool:
        key = (name, hashlib.sha256(password.encode()).hexdigest(), stored)
        with self._lock:
            if key in self._ok:
                return True
        if not verify_password(password, stored):
            return False
        with self._lock:
            if len(self._ok) >= self._size:
                self._ok.clear()
            self._ok[key] = None
        return True


_passwords = _PasswordCache()


def session_stamp(password_hash: str) -> str:
    """Tied to the user's password hash: changing the password ends old sessions."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def check_login(ctx: AppContext, name: str, password: str) -> Principal | None:
    user = ctx.config.auth.users.get(name)
    if user is None or not _passwords.check(name, password, user.password_hash):
        return None
    return Principal(name, Role.parse(user.role), "user")


def failed_login(request: Request, name: str, reason: str) -> None:
    ctx = context(request)
    audit.record(
        ctx.engine,
        name or "?",
        "auth.login",
        outcome="denied",
        source=client_address(request),
        detail={"reason": reason, "path": request.url.path},
    )


def _from_session(request: Request, ctx: AppContext) -> Principal | None:
    session = request.scope.get("session")
    if not session or SESSION_USER not in session:
        return None
    user = ctx.config.auth.users.get(session[SESSION_USER])
    if user is None or session.get(SESSION_STAMP) != session_stamp(user.password_hash):
        session.clear()
        return None
    return Principal(session[SESSION_USER], Role.parse(user.role), "user")


def _from_header(request: Request, ctx: AppContext) -> Principal | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value:
        for name, token in ctx.config.auth.tokens.items():
            if verify_token(value.strip(), token.token_hash):
                return Principal(name, Role.parse(token.role), "token")
        failed_login(request, "token", "unknown API token")
        return None
    if scheme == "basic" and value:
        try:
            name, _, password = base64.b64decode(value).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        principal = check_login(ctx, name, password)
        if principal is None:
            failed_login(request, name, "wrong user name or password")
        return principal
    return None


def authenticate(request: Request) -> Principal | None:
    """The caller, or None. Cached on the request."""
    if "principal" in request.scope:
        return request.scope["principal"]  # type: ignore[no-any-return]
    ctx = context(request)
    principal: Principal | None
    if not ctx.config.auth.enabled:
        principal = _ANONYMOUS_ADMIN
    else:
        principal = _from_header(request, ctx) or _from_session(request, ctx)
    request.scope["principal"] = principal
    return principal


def require(role: Role) -> Callable[[Request], Principal]:
    """A FastAPI dependency: the caller, if it has at least ``role``."""

    def dependency(request: Request) -> Principal:
        principal = authenticate(request)
        if principal is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "authentication required",
                headers={"WWW-Authenticate": 'Bearer, Basic realm="dicomrouter"'},
            )
        if not principal.may(role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this needs the {role.name} role; {principal.name} is {principal.role.name}",
            )
        return principal

    return dependency


viewer = Depends(require(Role.viewer))
operator = Depends(require(Role.operator))
admin = Depends(require(Role.admin))
