"""Security headers on every answer: pages, API, static files, errors and refusals.

- ``Content-Security-Policy``: scripts, styles and images from this server only, no
  inline script or ``eval`` (the dashboard's only scripts are the bundled htmx and
  ``/static/app.js``; htmx runs with ``allowEval`` off). A page can neither be framed
  (``frame-ancestors 'none'``, and ``X-Frame-Options: DENY`` for old browsers) nor
  post forms elsewhere. The OpenAPI page (``/api/docs``) loads Swagger UI from its
  CDN with an inline start-up script, so it alone gets a policy that allows those.
- ``X-Content-Type-Options: nosniff``: an answer is what its type says.
- ``Referrer-Policy: same-origin``: URLs (study UIDs, patient IDs in filters) never
  leak to another site. Not ``no-referrer``: with it a browser sends
  ``Origin: null`` on same-origin form posts, which :mod:`.csrf` refuses.

A pure ASGI middleware added last, so it runs first and also marks the 403s and
413s of the middlewares inside it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_CDN = "https://cdn.jsdelivr.net"
DOCS_POLICY = (
    f"default-src 'self'; script-src 'self' {_CDN} 'unsafe-inline'; "
    f"style-src 'self' {_CDN} 'unsafe-inline'; "
    f"img-src 'self' data: {_CDN} https://fastapi.tiangolo.com; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/api/docs",)

_COMMON = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


def security_headers(path: str) -> list[tuple[bytes, bytes]]:
    policy = DOCS_POLICY if path.startswith(DOCS_PATHS) else PAGE_POLICY
    return [(b"content-security-policy", policy.encode()), *_COMMON]


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = security_headers(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in extra if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
