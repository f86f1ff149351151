"""Security headers on every answer: pages, API, static files, errors and refusals.

- ``Content-Security-Policy``: scripts, styles and images from this server only, no
  inline script or ``eval`` (the dashboard's only scripts are the bundled htmx and
  ``/static/app.js``; htmx runs with ``allowEval`` off). A page can neither be framed
  (``frame-ancestors 'none'``, and ``X-Frame-Options: DENY`` for old browsers) nor
  post forms elsewhere. The OpenAPI page (``/api/docs``) is under the same policy:
  its Swagger UI is vendored in the dashboard's static files and started by a script
  file there (:mod:`.docs_page`), so nothing comes from a CDN and nothing is inline.
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

SECURITY_HEADERS = [
    (b"content-security-policy", PAGE_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(n, v) for n, v in SECURITY_HEADERS if n not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
