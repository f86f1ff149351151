"""Configuration: view, validate with a diff preview, apply, history and rollback.

Applying goes through the API's ``apply_config`` (validate, write the file, record a
version, audit, reload the node), so the dashboard cannot take a path the API does
not. Everyone sees the configuration with password and token hashes redacted;
admins see it exactly, and only they may edit, apply and roll back.
"""

from __future__ import annotations

from typing import Any

import yaml
from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dicomrouter.api.auth import client_address
from dicomrouter.api.context import AppContext
from dicomrouter.api.params import RowId
from dicomrouter.control import versions
from dicomrouter.control.security import Principal, Role

from .common import admin, ctx_of, flash, render, viewer

router = APIRouter(include_in_schema=False)


def active_text(ctx: AppContext) -> str:
    if ctx.config_path is not None:
        return versions.read_file(ctx.config_path)
    return yaml.safe_dump(ctx.config.model_dump(mode="json"), sort_keys=False)


def _redact(text: str, principal: Principal) -> str:
    from dicomrouter.api.config_api import redact

    return redact(text, principal)


def _page(
    request: Request, principal: Principal, extra: dict[str, Any] | None = None
) -> HTMLResponse:
    ctx = ctx_of(request)
    text = active_text(ctx)
    total, history = versions.list_versions(ctx.reader, 50, 0)
    values: dict[str, Any] = {
        "title": "Configuration",
        "path": str(ctx.config_path) if ctx.config_path else None,
        "active": _redact(text, principal),
        "candidate": text if principal.may(Role.admin) else None,
        "versions": history,
        "versions_total": total,
        "check": None,
        "comment": "",
    }
    values.update(extra or {})
    return render(request, "config.html", values, principal=principal)


@router.get("/config", summary="Configuration", response_class=HTMLResponse)
def config_page(request: Request, principal: Principal = viewer) -> HTMLResponse:
    return _page(request, principal)


@router.post(
    "/config/preview", summary="Validate and diff a candidate", response_class=HTMLResponse
)
def preview(
    request: Request,
    candidate: str = Form(...),
    comment: str = Form(""),
    principal: Principal = admin,
) -> HTMLResponse:
    ctx = ctx_of(request)
    base = ctx.config_path.parent if ctx.config_path else ctx.store.root.parent
    check = versions.validate(candidate, active_text(ctx), base, ctx.config)
    return _page(request, principal, {"candidate": candidate, "check": check, "comment": comment})


@router.post("/config/apply", summary="Apply a candidate", response_model=None)
def apply(
    request: Request,
    candidate: str = Form(...),
    comment: str = Form(""),
    principal: Principal = admin,
) -> Response:
    from dicomrouter.api.config_api import apply_config

    ctx = ctx_of(request)
    try:
        result = apply_config(ctx, candidate, principal, client_address(request), "api", comment)
    except HTTPException as exc:
        return _refused(request, principal, candidate, comment, exc)
    _applied(request, result)
    return RedirectResponse("/config", status_code=303)


@router.get("/config/versions/{version_id}", summary="One version", response_class=HTMLResponse)
def version_page(
    request: Request, version_id: RowId, principal: Principal = viewer
) -> HTMLResponse:
    ctx = ctx_of(request)
    found = versions.get_version(ctx.reader, version_id)
    if found is None:
        raise HTTPException(404, f"no configuration version {version_id}")
    change = versions.diff(found.yaml or "", active_text(ctx), f"version {version_id}", "active")
    values = {
        "title": f"Configuration version {version_id}",
        "v": found,
        "yaml_text": _redact(found.yaml or "", principal),
        "diff": _redact(change, principal),
    }
    return render(request, "config_version.html", values, principal=principal)


@router.post("/config/versions/{version_id}/rollback", summary="Roll back", response_model=None)
def rollback(request: Request, version_id: RowId, principal: Principal = admin) -> Response:
    from dicomrouter.api.config_api import apply_config

    ctx = ctx_of(request)
    old = versions.get_version(ctx.reader, version_id)
    if old is None:
        raise HTTPException(404, f"no configuration version {version_id}")
    try:
        result = apply_config(
            ctx,
            old.yaml or "",
            principal,
            client_address(request),
            "rollback",
            f"rollback to version {version_id}",
        )
    except HTTPException as exc:
        flash(request, f"rollback refused: {_reason(exc)}", "error")
        return RedirectResponse(f"/config/versions/{version_id}", status_code=303)
    _applied(request, result)
    return RedirectResponse("/config", status_code=303)


def _reason(exc: HTTPException) -> str:
    detail = exc.detail
    if isinstance(detail, dict):
        return "; ".join([str(detail.get("message", ""))] + list(detail.get("errors", [])))
    return str(detail)


def _refused(
    request: Request, principal: Principal, candidate: str, comment: str, exc: HTTPException
) -> HTMLResponse:
    errors = exc.detail.get("errors", []) if isinstance(exc.detail, dict) else [str(exc.detail)]
    check = versions.Validation(False, list(errors), [], "")
    extra = {"candidate": candidate, "check": check, "comment": comment, "refused": True}
    response = _page(request, principal, extra)
    response.status_code = exc.status_code
    return response


def _applied(request: Request, result: versions.ApplyResult) -> None:
    if not result.created:
        flash(request, f"identical to version {result.version_id}: nothing changed")
        return
    text = f"version {result.version_id} applied"
    if result.live:
        text += f"; live now: {', '.join(result.live)}"
    if result.restart_required:
        text += f"; after a restart: {', '.join(result.restart_required)}"
    flash(request, text, "warn" if result.restart_required else "ok")
