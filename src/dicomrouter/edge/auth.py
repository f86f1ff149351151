"""Authentication and roles for the HTTP service.

Three ways in, checked in this order:

- a dashboard session (signed cookie set by ``POST /api/v1/login`` or the login page,
  naming a session the server keeps, so that logging out ends it);
- ``Authorization: Bearer <token>`` for scripts (tokens from ``auth.tokens``);
- ``Authorization: Basic`` with a user's password (handy for curl).

The role is looked up in the *current* configuration on every request, so removing
a user or lowering a role takes effect at once, sessions included. No credentials
give 401; too small a role gives 403. Failed logins are written to the audit log.

The 401 offers only ``Bearer``: offering ``Basic`` would make a browser prompt for
a password and then attach it to every request, cross-site ones included. Basic is
still accepted from clients that send it unasked (``curl -u``).

Guessing is throttled per client address (:class:`LoginThrottle`): after
:attr:`LoginThrottle.limit` failures within :attr:`LoginThrottle.window` seconds,
password and token attempts from that address get 429 with ``Retry-After`` (no
scrypt, no audit row) for a delay that doubles with each further failure. A
successful login forgets only that user's failures, so that a valid account (or a
colleague behind the same address) cannot wipe the count of guesses at another. At most
:data:`SCRYPT_SLOTS` password hashes are computed at once, and an unknown user name
costs the same hash as a known one, so timing does not tell which users exist.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Depends, HTTPException, Request, status

from dicomrouter.control import sessions
from dicomrouter.security import (
    Principal,
    Role,
    hash_password,
    verify_password,
    verify_token,
)
from dicomrouter.store import audit

from .context import AppContext

SESSION_USER = "user"
SESSION_STAMP = "stamp"
SESSION_ID = "sid"  # the token of the session's row (control.sessions)

_ANONYMOUS_ADMIN = Principal("anonymous", Role.admin, "anonymous")

#: What a 401 offers. Never Basic: see the module's description.
CHALLENGE = 'Bearer realm="dicomrouter"'

#: Password hashes (scrypt: ~50 ms and 16 MB each) computed at the same time, at most.
SCRYPT_SLOTS = 2
_scrypt_slots = threading.BoundedSemaphore(SCRYPT_SLOTS)


def _verify_password(password: str, stored: str) -> bool:
    with _scrypt_slots:
        return verify_password(password, stored)


@functools.cache
def _dummy_hash() -> str:
    """Checked against for an unknown user name, so that it costs a known one's time."""
    return hash_password(secrets.token_urlsafe(16))


def context(request: Request) -> AppContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


class _PasswordCache:
    """scrypt costs ~50 ms by design; remember recent successful Basic logins (keyed
    by the stored hash too, so a password change invalidates the entry)."""

    def __init__(self, size: int = 256):
        self._ok: dict[tuple[str, str, str], None] = {}
        self._size = size
        self._lock = threading.Lock()

    def known(self, name: str, password: str, stored: str) -> bool:
        """Whether this exact login succeeded recently (no hash computed)."""
        key = (name, hashlib.sha256(password.encode()).hexdigest(), stored)
        with self._lock:
            return key in self._ok

    def check(self, name: str, password: str, stored: str) -> bool:
        key = (name, hashlib.sha256(password.encode()).hexdigest(), stored)
        with self._lock:
            if key in self._ok:
                return True
        if not _verify_password(password, stored):
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


class TooManyAttempts(HTTPException):
    """429: this address failed too often; ``Retry-After`` says for how long."""

    def __init__(self, retry_after: float):
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"too many failed logins from this address; try again in {self.retry_after} s",
            headers={"Retry-After": str(self.retry_after)},
        )


@dataclass
class _Failures:
    # (time, user name) of each failure within the window ("token" for tokens)
    recent: deque[tuple[float, str]] = field(default_factory=deque)
    level: int = 0  # lockouts in this streak: the next one lasts first_delay * 2**level
    locked_until: float = 0.0
    pending: int = 0  # attempts admitted and not yet decided (hashing)


class LoginThrottle:
    """Failed logins per client address, in memory (one per HTTP process).

    ``limit`` failures within ``window`` seconds lock the address out for
    ``first_delay`` seconds; each failure after a lockout ends (before ``window``
    seconds of calm) locks it out again for twice as long, up to ``max_delay``. A
    successful password login forgets that user name's failures only (the others',
    the lockout level and the attempts under way stay). At most ``capacity`` addresses
    are remembered (the least recently failing are dropped).

    Attempts in progress count too (:meth:`admit`): a password check takes ~50 ms,
    and attempts sent in parallel would otherwise all be checked before the first
    failure is counted. An address gets at most as many attempts under way as it
    has failures left before a lockout; the others get 429 at once."""

    limit = 5
    window = 300.0
    first_delay = 60.0
    max_delay = 900.0

    def __init__(self, capacity: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.clock = clock
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, address: str) -> None:
        """Raise :class:`TooManyAttempts` while ``address`` is locked out."""
        with self._lock:
            entry = self._addresses.get(address)
            remaining = entry.locked_until - self.clock() if entry else 0.0
        if remaining > 0:
            raise TooManyAttempts(remaining)

    def admit(self, address: str) -> None:
        """Start an attempt (password or token): raise :class:`TooManyAttempts` while
        ``address`` is locked out, or when the attempts already under way could use
        up its remaining failures. End it with :meth:`failure`, :meth:`success` or
        :meth:`release`."""
        now = self.clock()
        with self._lock:
            entry = self._addresses.get(address)
            if entry is None:
                entry = self._addresses[address] = _Failures()
                self._trim()
            remaining = entry.locked_until - now
            if remaining > 0:
                raise TooManyAttempts(remaining)
            recent = sum(1 for at, _ in entry.recent if now - at <= self.window)
            # After a lockout, the next failure locks again: one attempt at a time.
            allowed = 1 if entry.level else self.limit - recent
            if entry.pending >= allowed:
                raise TooManyAttempts(1)
            entry.pending += 1

    def release(self, address: str) -> None:
        """End an admitted attempt that neither failed nor succeeded (an error)."""
        with self._lock:
            entry = self._addresses.get(address)
            if entry is not None and entry.pending:
                entry.pending -= 1

    def _trim(self) -> None:
        while len(self._addresses) > self.capacity:
            self._addresses.popitem(last=False)

    def failure(self, address: str, name: str = "") -> float | None:
        """Count a failure (ending an admitted attempt, if any); the lockout's length
        if this one starts a lockout."""
        now = self.clock()
        with self._lock:
            entry = self._addresses.pop(address, None)
            pending = max(0, entry.pending - 1) if entry is not None else 0
            if entry is None or (entry.level and now >= entry.locked_until + self.window):
                entry = _Failures()
            entry.pending = pending
            self._addresses[address] = entry  # the most recent, last
            self._trim()
            if now < entry.locked_until:
                return None  # a concurrent attempt started the lockout already
            while entry.recent and now - entry.recent[0][0] > self.window:
                entry.recent.popleft()
            entry.recent.append((now, name))
            if not entry.level and len(entry.recent) < self.limit:
                return None
            delay = min(self.max_delay, self.first_delay * 2**entry.level)
            entry.level += 1
            entry.locked_until = now + delay
            entry.recent.clear()
            return delay

    def success(self, address: str, name: str) -> None:
        """End an admitted attempt that succeeded for ``name``: forget that name's
        failures, not the others' (nor the lockout level, nor other attempts under
        way), so a valid login cannot reset the count of guesses at another user."""
        with self._lock:
            entry = self._addresses.get(address)
            if entry is None:
                return
            if entry.pending:
                entry.pending -= 1
            entry.recent = deque(item for item in entry.recent if item[1] != name)
            if not (entry.recent or entry.level or entry.pending or entry.locked_until):
                del self._addresses[address]

    def __len__(self) -> int:
        return len(self._addresses)


def throttle(request: Request) -> LoginThrottle:
    state = request.app.state
    found = getattr(state, "login_throttle", None)
    if found is None:
        found = state.login_throttle = LoginThrottle()
    return found  # type: ignore[no-any-return]


def check_login(ctx: AppContext, name: str, password: str) -> Principal | None:
    """The user, if the password is theirs. Not throttled: see :func:`password_login`."""
    user = ctx.config.auth.users.get(name)
    if user is None:
        _verify_password(password, _dummy_hash())  # as slow as for a real user
        return None
    if not _passwords.check(name, password, user.password_hash):
        return None
    return Principal(name, Role.parse(user.role), "user")


def password_login(request: Request, name: str, password: str) -> Principal | None:
    """A user name and password (login form, ``POST /api/v1/login``, Basic), throttled
    per client address: raises :class:`TooManyAttempts` (429) while it is locked out,
    audits a failure and, on success, forgets that user's failures (no one else's)."""
    address = client_address(request)
    limiter = throttle(request)
    ctx = context(request)
    user = ctx.config.auth.users.get(name)
    if user is not None and _passwords.known(name, password, user.password_hash):
        # A script's repeated Basic login, checked before: as cheap as a token, so
        # only a lockout stops it, not the number of attempts under way. It was not
        # admitted and forgets no failures (else it could reset a guesser's count).
        limiter.check(address)
        return Principal(name, Role.parse(user.role), "user")
    limiter.admit(address)
    try:
        principal = check_login(ctx, name, password)
    except BaseException:
        limiter.release(address)
        raise
    if principal is None:
        failed_login(request, name, "wrong user name or password")
    else:
        limiter.success(address, name)
    return principal


def failed_login(request: Request, name: str, reason: str) -> None:
    """Audit a failed attempt and count it against the client's address; the
    attempt that starts a lockout also writes one ``auth.lockout`` row."""
    ctx = context(request)
    address = client_address(request)
    audit.record(
        ctx.engine,
        name or "?",
        "auth.login",
        outcome="denied",
        source=address,
        detail={"reason": reason, "path": request.url.path},
    )
    delay = throttle(request).failure(address, name or "?")
    if delay is not None:
        audit.record(
            ctx.engine,
            name or "?",
            "auth.lockout",
            outcome="denied",
            source=address,
            detail={"seconds": delay, "path": request.url.path},
        )


def _from_session(request: Request, ctx: AppContext) -> Principal | None:
    """The session's user, if the session is live on the server
    (:mod:`dicomrouter.control.sessions`: not logged out, not expired) and the user
    still exists with the same password. Each use slides the session's expiry."""
    session = request.scope.get("session")
    if not session or SESSION_USER not in session:
        return None
    name = session[SESSION_USER]
    live = sessions.find(ctx.reader, str(session.get(SESSION_ID, "")))
    user = ctx.config.auth.users.get(name)
    if live is None or live.user != name:
        session.clear()
        return None
    if user is None or session.get(SESSION_STAMP) != session_stamp(user.password_hash):
        sessions.end_user(ctx.engine, name)  # password changed or user removed
        session.clear()
        return None
    sessions.touch(ctx.engine, live, ctx.config.http.session_lifetime)
    return Principal(name, Role.parse(user.role), "user")


def _from_header(request: Request, ctx: AppContext) -> Principal | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value:
        for name, token in ctx.config.auth.tokens.items():
            if verify_token(value.strip(), token.token_hash):
                # Cheap to check, so valid tokens work even from a locked-out address.
                return Principal(name, Role.parse(token.role), "token")
        throttle(request).admit(client_address(request))
        failed_login(request, "token", "unknown API token")
        return None
    if scheme == "basic" and value:
        try:
            name, _, password = base64.b64decode(value).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password_login(request, name, password)
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
                headers={"WWW-Authenticate": CHALLENGE},
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
