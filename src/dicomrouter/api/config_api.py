"""Configuration: view, validate, apply (hot reload), export/import, versions, rollback.

Who sees what: the YAML holds only hashes of passwords and tokens, but scrypt hashes
can still be attacked offline, so everyone from ``viewer`` up reads the configuration,
its versions and diffs with those hash values *redacted*; only ``admin`` gets the
exact text (and ``/config/export``, the file itself). Validating is ``operator``;
changing (apply, import, rollback) is ``admin``. Changes and exports are audited,
refused attempts too.

A candidate is sent as the YAML text (``application/yaml`` or ``text/plain``) or as
JSON ``{"yaml": "...", "comment": "..."}``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from fastapi import APIRouter, HTTPException, Request, Response

from dicomrouter.config import ConfigError
from dicomrouter.control import audit, versions
from dicomrouter.control.security import Principal, Role

from .auth import admin, client_address, context, operator, viewer
from .context import AppContext
from .params import RowId

router = APIRouter(prefix="/api/v1", tags=["config"])

_HASH_VALUE = re.compile(r"((?:password|token)_hash\s*:\s*)([^\s,}#]+)")
_YAML_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "text/plain": {"schema": {"type": "string"}},
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


def redact(text: str, principal: Principal) -> str:
    """Hash values replaced by ``<redacted>`` unless the caller is an admin."""
    if principal.may(Role.admin):
        return text
    return _HASH_VALUE.sub(r"\1<redacted>", text)


async def _candidate(request: Request) -> tuple[str, str]:
    """(YAML text, comment) from the request body."""
    body = (await request.body()).decode("utf-8", errors="replace")
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        try:
            data = json.loads(body)
        except ValueError:
            raise HTTPException(400, "the JSON body is not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("yaml"), str):
            raise HTTPException(400, 'a JSON body must be {"yaml": "...", "comment": "..."}')
        return data["yaml"], str(data.get("comment") or "")
    return body, request.query_params.get("comment", "")


def _active_text(ctx: AppContext) -> str:
    if ctx.config_path is not None:
        return versions.read_file(ctx.config_path)
    return yaml.safe_dump(ctx.config.model_dump(mode="json"), sort_keys=False)


def apply_config(
    ctx: AppContext,
    text: str,
    principal: Principal,
    address: str,
    source: str = "api",
    comment: str = "",
) -> versions.ApplyResult:
    """Apply a candidate (also used by the dashboard): the file and a new version, this
    process's configuration at once, the node (and so the dispatcher) by SIGHUP.
    Raises ``HTTPException`` 409 (no file) or 422 (invalid, with the key-path errors)."""
    try:
        result = versions.apply_yaml(
            ctx.engine,
            ctx.config_path,
            text,
            ctx.config,
            author=principal.name,
            source=source,
            address=address,
            comment=comment,
            notify=ctx.reload_node,
        )
    except versions.NoConfigFile as exc:
        raise HTTPException(409, str(exc)) from None
    except ConfigError as exc:
        raise HTTPException(
            422, {"message": "invalid configuration; nothing was changed", "errors": exc.errors}
        ) from None
    ctx.config = result.config
    return result


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
    return {
        "path": str(ctx.config_path) if ctx.config_path else None,
        "version": newest.as_dict() if newest else None,
        "sha256": versions.sha256(text),
        "yaml": redact(text, principal),
        "redacted": not principal.may(Role.admin),
        "restart_pending": pending,
    }


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
    report = versions.validate(text, _active_text(ctx), base, ctx.config).as_dict()
    report["diff"] = redact(report["diff"], principal)
    return report


@router.put(
    "/config",
    summary="Apply a new configuration (admin; hot reload, recorded as a version)",
    openapi_extra=_YAML_BODY,
)
async def put_config(request: Request, principal: Principal = admin) -> dict[str, Any]:
    text, comment = await _candidate(request)
    ctx = context(request)
    return apply_config(ctx, text, principal, client_address(request), "api", comment).as_dict()


@router.post(
    "/config/import",
    summary="Import a configuration file (admin; like PUT, recorded as an import)",
    openapi_extra=_YAML_BODY,
)
async def import_config(request: Request, principal: Principal = admin) -> dict[str, Any]:
    text, comment = await _candidate(request)
    ctx = context(request)
    return apply_config(ctx, text, principal, client_address(request), "import", comment).as_dict()


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
    data["yaml"] = redact(data["yaml"], principal)
    return data


@router.get("/config/versions/{a}/diff/{b}", summary="Unified diff from version a to version b")
def diff_versions(
    request: Request, a: RowId, b: RowId, principal: Principal = viewer
) -> dict[str, Any]:
    change = versions.diff_versions(context(request).reader, a, b)
    if change is None:
        raise HTTPException(404, f"no configuration version {a} or {b}")
    return {"from": a, "to": b, "diff": redact(change, principal)}


@router.post(
    "/config/versions/{version_id}/rollback",
    summary="Roll back to a version (admin; applied as a new version)",
)
def rollback(request: Request, version_id: RowId, principal: Principal = admin) -> dict[str, Any]:
    ctx = context(request)
    old = versions.get_version(ctx.reader, version_id)
    if old is None:
        raise HTTPException(404, f"no configuration version {version_id}")
    result = apply_config(
        ctx,
        old.yaml or "",
        principal,
        client_address(request),
        "rollback",
        f"rollback to version {version_id}",
    )
    return result.as_dict()
