"""Refuse requests a browser was tricked into sending (CSRF, DNS rebinding).

Session cookies are ``SameSite=Strict``, but a browser also attaches credentials it
was never asked to keep out of cross-site requests: cached HTTP Basic credentials,
or none at all when ``auth.enabled`` is false. So, for every request:

- an unsafe method (POST, PUT, PATCH, DELETE) is refused (403) when the browser says
  it comes from another site: ``Sec-Fetch-Site`` present and not ``same-origin`` or
  ``none`` (typed in the address bar), or ``Origin`` present and not this server's
  own ``scheme://host[:port]`` (as the ``Host`` header names it). Requests without
  these headers (curl, scripts; browsers always send at least one of them on a
  cross-site POST) pass;
- with ``auth.enabled: false``, a request whose ``Host`` is not an IP address or
  ``localhost`` is refused (403): a page on ``evil.example`` that re-points its own
  name at the router's address (DNS rebinding) would otherwise be same-origin with an
  admin that needs no credentials.

``X-Forwarded-Host`` is not trusted: anybody can send it. ``Origin`` may be
``https://`` while the request arrived over plain HTTP (TLS ended by a reverse
proxy that uvicorn does not trust for ``X-Forwarded-Proto``): the same host and
port with a stronger scheme is the same server; the opposite (an ``http://`` page
posting to an ``https://`` router) is refused.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SAME_SITE = frozenset({"same-origin", "none"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _split_host(host: str) -> tuple[str, str]:
    """``host[:port]`` (``[v6]:port`` too) as (lowercase host, port text)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, ""


def _authority(scheme: str, host: str) -> tuple[str, int] | None:
    """(host, port) with the scheme's default port filled in; None if malformed."""
    name, port = _split_host(host)
    if not name:
        return None
    if not port:
        return name, _DEFAULT_PORTS.get(scheme, 0)
    return (name, int(port)) if port.isdigit() else None


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether an ``Origin`` header names the server that received the request."""
    try:
        parts = urlsplit(origin.strip())
        origin_scheme = parts.scheme.lower()
        origin_host = parts.netloc
    except ValueError:
        return False
    if not origin_scheme or not origin_host or "@" in origin_host:
        return False  # also "null" (sandboxed frames, some redirects)
    if origin_scheme != scheme and not (origin_scheme == "https" and scheme == "http"):
        return False
    ours = _authority(scheme, host)
    theirs = _authority(origin_scheme, origin_host)
    if ours is None or theirs is None:
        return False
    if theirs == ours:
        return True
    # TLS ended in front of us: Origin https://router (443) for a Host "router" (80).
    return (
        origin_scheme != scheme
        and theirs[0] == ours[0]
        and _split_host(origin_host)[1] == _split_host(host)[1]
    )


def is_local_host(host: str) -> bool:
    """``localhost`` or an IP literal (no name that DNS could re-point)."""
    name, _ = _split_host(host)
    if name.endswith("."):
        name = name[:-1]
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def cross_site_reason(method: str, headers: dict[str, str], scheme: str) -> str | None:
    """Why an unsafe request looks cross-site, or None if it may go on."""
    if method not in UNSAFE_METHODS:
        return None
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.strip().lower() not in _SAME_SITE:
        return f"cross-site request refused (Sec-Fetch-Site: {fetch_site[:40]})"
    origin = headers.get("origin")
    if origin is not None and not same_origin(origin, scheme, headers.get("host", "")):
        return f"cross-origin request refused (Origin {origin[:100]!r} is not this server)"
    return None


class CrossSiteMiddleware:
    """Pure ASGI (no body buffering): looks at the headers only."""

    def __init__(self, app: ASGIApp, auth_enabled: Any) -> None:
        self.app = app
        #: A callable giving the *current* ``auth.enabled`` (configuration reloads).
        self.auth_enabled = auth_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        reason = cross_site_reason(scope["method"], headers, scope.get("scheme", "http"))
        if reason is None and not self.auth_enabled():
            host = headers.get("host")
            if host is not None and not is_local_host(host):
                reason = (
                    f"host name {host[:100]!r} refused: with auth.enabled false the "
                    "router answers only to localhost or an IP address (protection "
                    "against DNS rebinding); use the IP address, or enable auth"
                )
        if reason is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": reason}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
