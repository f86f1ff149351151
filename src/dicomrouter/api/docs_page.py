"""``/api/docs``: Swagger UI over the OpenAPI description, entirely from this server.

Hospital networks are often offline, so Swagger UI is vendored in the dashboard's
``static/`` (``swagger-ui-bundle.js``, ``swagger-ui.css``, from the npm package
``swagger-ui-dist`` (version below), Apache-2.0 licence and notice beside them)
instead of FastAPI's default page, which loads it from a CDN. The page starts it
with ``/static/swagger-init.js`` rather than an inline script, so it runs under the
same Content-Security-Policy as the dashboard (:mod:`.headers`).
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

#: The vendored ``swagger-ui-dist`` release (web/static/swagger-ui-*).
SWAGGER_UI_VERSION = "5.36.0"
DOCS_PATH = "/api/docs"

router = APIRouter()


def docs_html(title: str, openapi_url: str, root_path: str = "") -> str:
    static = f"{root_path}/static"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{escape(title)} - API</title>
<link rel="stylesheet" href="{static}/swagger-ui.css?v={SWAGGER_UI_VERSION}">
<link rel="icon" type="image/png" href="{static}/swagger-ui-favicon.png">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{escape(root_path + openapi_url)}"></div>
<script src="{static}/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}"></script>
<script src="{static}/swagger-init.js"></script>
</body>
</html>
"""


@router.get(DOCS_PATH, include_in_schema=False)
def swagger_ui(request: Request) -> HTMLResponse:
    app = request.app
    root_path = str(request.scope.get("root_path", "")).rstrip("/")
    return HTMLResponse(docs_html(app.title, app.openapi_url or "", root_path))
