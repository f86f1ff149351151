"""Configuration: view, validate, apply (hot reload), export/import, versions, rollback.

Who sees what: the YAML holds secrets (password and token hashes, which can be
attacked offline, webhook headers, the database password), so everyone from
``viewer`` up reads the configuration, its versions and diffs *redacted*
(``versions.redact``: parsed, secrets masked, dumped again, so without comments; the
answers say so in ``redaction``); only ``admin`` gets the exact text (and
``/config/export``, the file itself). Validating is ``operator``; changing (apply,
import, rollback) is ``admin``. Changes and exports are audited, refused attempts too.

A candidate is sent as the YAML text (``application/yaml``, ``application/x-yaml`` or
``text/yaml``) or as JSON ``{"yaml": "...", "comment": "..."}``; anything else is
``415``, so a cross-site HTML form (``text/plain``, form encodings) cannot send one.
The logic is in ``control.versions``; this module only maps it to HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool

from dicomrouter.config import ConfigError
from dicomrouter.control import versions
from dicomrouter.edge.auth import admin, client_address, context, operator, viewer
from dicomrouter.edge.context import AppContext
from dicomrouter.edge.params import RowId
from dicomrouter.security import Principal
from dicomrouter.store import audit

from .control_errors import http_errors

router = APIRouter(prefix="/api/v1", tags=["config"])

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")
_T = TypeVar("_T")
_YAML_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **{media: {"schema": {"type": "string"}} for media in YAML_TYPES},
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["yaml"],
                    "properties": {"yaml": {"type": "string"}, "comment": {"type": "string"}},
                }
            },
        },
    }
}


async def _candidate(request: Request) -> tuple[str, str]:
    """(YAML text, comment) from the request body; 415 for any other media type."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and media not in YAML_TYPES:
        raise HTTPException(
            415,
            "send the configuration as application/yaml (or application/x-yaml, "
            'text/yaml) or as JSON {"yaml": "...", "comment": "..."}',
        )
    body = (await request.body()).decode("utf-8", errors="replace")
    if media == "application/json":
        try:
            data = json.loads(body)
        except ValueError:
            raise HTTPException(400, "the JSON body is not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("yaml"), str):
            raise HTTPException(400, 'a JSON body must be {"yaml": "...", "comment": "..."}')
        return data["yaml"], str(data.get("comment") or "")
    return body, request.query_params.get("comment", "")


def _active_text(ctx: AppContext) -> str:
    return versions.active_text(ctx.config_path, ctx.config)


def _changing(call: Callable[[], _T]) -> _T:
    """Control errors as HTTP: 404, 409 (no file), 422 with every key-path error."""
    with http_errors():
        try:
            return call()
        except versions.InvalidConfig as exc:
            raise HTTPException(422, {"message": str(exc), "errors": exc.errors}) from None


def _shown(data: dict[str, Any], principal: Principal) -> dict[str, Any]:
    """Marks an answer holding configuration text as redacted (or not)."""
    redacted = not versions.sees_secrets(principal)
    data["redacted"] = redacted
    if redacted:
        data["redaction"] = versions.REDACTION_NOTE
    return data


@router.get("/config", summary="The active configuration (YAML) and its version")
def get_config(request: Request, principal: Principal = viewer) -> dict[str, Any]:
    ctx = context(request)
    text = _active_text(ctx)
    newest = versions.latest_version(ctx.reader, with_yaml=False)
    pending: list[str] = []
    if ctx.config_path is not None:
        try:
            on_disk = versions.parse_yaml(text, ctx.config_path.parent)
            pending = versions.restart_required(versions.changed_keys(ctx.config, on_disk))
        except ConfigError:
            pending = []  # an invalid file edited by hand is never applied
    data = {
        "path": str(ctx.config_path) if ctx.config_path else None,
        "version": newest.as_dict() if newest else None,
        "sha256": versions.sha256(text),
        "yaml": versions.redact(text, principal),
        "restart_pending": pending,
    }
    return _shown(data, principal)


@router.get(
    "/config/export",
    summary="Download the configuration file (admin; the exact file, for import elsewhere)",
    response_class=Response,
    responses={200: {"content": {"application/yaml": {}}}},
)
def export_config(request: Request, principal: Principal = admin) -> Response:
    ctx = context(request)
    audit.record(ctx.engine, principal.name, "config.export", source=client_address(request))
    return Response(
        _active_text(ctx),
        media_type="application/yaml",
        headers={"Content-Disposition": 'attachment; filename="dicomrouter.yaml"'},
    )


@router.post(
    "/config/validate",
    summary="Validate a candidate: errors, lint warnings, diff against the active one",
    openapi_extra=_YAML_BODY,
)
async def validate_config(request: Request, principal: Principal = operator) -> dict[str, Any]:
    ctx = context(request)
    text, _ = await _candidate(request)
    base = ctx.config_path.parent if ctx.config_path else ctx.store.root.parent
    redacted = not versions.sees_secrets(principal)
    check = await run_in_threadpool(  # 422 for a text too large or complex to parse
        _changing,
        lambda: versions.validate(text, _active_text(ctx), base, ctx.config, redacted=redacted),
    )
    return _shown(check.as_dict(), principal)


@router.put(
    "/config",
    summary="Apply a new configuration (admin; hot reload, recorded as a version)",
    openapi_extra=_YAML_BODY,
)
async def put_config(request: Request, principal: Principal = admin) -> dict[str, Any]:
    text, comment = await _candidate(request)
    ctx, address = context(request), client_address(request)
    result = await run_in_threadpool(  # fsyncs and the index: not on the event loop
        _changing, lambda: versions.apply_config(ctx, text, principal, address, "api", comment)
    )
    return result.as_dict()


@router.post(
    "/config/import",
    summary="Import a configuration file (admin; like PUT, recorded as an import)",
    openapi_extra=_YAML_BODY,
)
async def import_config(request: Request, principal: Principal = admin) -> dict[str, Any]:
    text, comment = await _candidate(request)
    ctx, address = context(request), client_address(request)
    result = await run_in_threadpool(
        _changing, lambda: versions.apply_config(ctx, text, principal, address, "import", comment)
    )
    return result.as_dict()


@router.get("/config/versions", summary="Applied configuration versions, newest first")
def list_versions(
    request: Request, limit: int = 50, offset: int = 0, principal: Principal = viewer
) -> dict[str, Any]:
    total, found = versions.list_versions(
        context(request).reader, max(1, min(limit, 500)), max(0, offset)
    )
    return {"total": total, "versions": [v.as_dict() for v in found]}


@router.get("/config/versions/{version_id}", summary="One version, with its YAML")
def get_version(
    request: Request, version_id: RowId, principal: Principal = viewer
) -> dict[str, Any]:
    found = versions.get_version(context(request).reader, version_id)
    if found is None:
        raise HTTPException(404, f"no configuration version {version_id}")
    data = found.as_dict()
    data["yaml"] = versions.redact(data["yaml"], principal)
    return _shown(data, principal)


@router.get("/config/versions/{a}/diff/{b}", summary="Unified diff from version a to version b")
def diff_versions(
    request: Request, a: RowId, b: RowId, principal: Principal = viewer
) -> dict[str, Any]:
    redacted = not versions.sees_secrets(principal)
    change = versions.diff_versions(context(request).reader, a, b, redacted=redacted)
    if change is None:
        raise HTTPException(404, f"no configuration version {a} or {b}")
    return _shown({"from": a, "to": b, "diff": change}, principal)


@router.post(
    "/config/versions/{version_id}/rollback",
    summary="Roll back to a version (admin; applied as a new version)",
)
def rollback(request: Request, version_id: RowId, principal: Principal = admin) -> dict[str, Any]:
    ctx, address = context(request), client_address(request)
    return _changing(
        lambda: versions.rollback_config(ctx, version_id, principal, address)
    ).as_dict()
