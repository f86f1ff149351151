"""Configuration: view, validate with a diff preview, apply, history and rollback.

Applying goes through ``control.versions.apply_config`` (validate, write the file,
record a version, audit, reload the node), like the API, so the dashboard cannot take
a path the API does not. Everyone but admins sees the configuration redacted
(``versions.redact``: secrets masked, re-serialized without comments); admins see it
exactly, and only they may edit, apply and roll back.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dicomrouter.control import versions
from dicomrouter.control.errors import ControlError, NotFound
from dicomrouter.edge.auth import client_address
from dicomrouter.edge.context import AppContext
from dicomrouter.edge.params import RowId
from dicomrouter.security import Principal

from .common import admin, ctx_of, flash, render, viewer

router = APIRouter(include_in_schema=False)


def active_text(ctx: AppContext) -> str:
    return versions.active_text(ctx.config_path, ctx.config)


def _page(
    request: Request, principal: Principal, extra: dict[str, Any] | None = None
) -> HTMLResponse:
    ctx = ctx_of(request)
    text = active_text(ctx)
    total, history = versions.list_versions(ctx.reader, 50, 0)
    values: dict[str, Any] = {
        "title": "Configuration",
        "path": str(ctx.config_path) if ctx.config_path else None,
        "active": versions.redact(text, principal),
        "redaction": None if versions.sees_secrets(principal) else versions.REDACTION_NOTE,
        "candidate": text if versions.sees_secrets(principal) else None,
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
    candidate = versions.normalize(candidate)
    try:
        check = versions.validate(candidate, active_text(ctx), base, ctx.config)
    except ControlError as exc:
        return _refused(request, principal, candidate, comment, exc)
    return _page(request, principal, {"candidate": candidate, "check": check, "comment": comment})


@router.post("/config/apply", summary="Apply a candidate", response_model=None)
def apply(
    request: Request,
    candidate: str = Form(...),
    comment: str = Form(""),
    principal: Principal = admin,
) -> Response:
    ctx, address = ctx_of(request), client_address(request)
    try:
        result = versions.apply_config(ctx, candidate, principal, address, "api", comment)
    except ControlError as exc:
        return _refused(request, principal, versions.normalize(candidate), comment, exc)
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
    redacted = not versions.sees_secrets(principal)
    change = versions.diff(
        found.yaml or "", active_text(ctx), f"version {version_id}", "active", redacted=redacted
    )
    values = {
        "title": f"Configuration version {version_id}",
        "v": found,
        "yaml_text": versions.redact(found.yaml or "", principal),
        "diff": change,
        "redaction": versions.REDACTION_NOTE if redacted else None,
    }
    return render(request, "config_version.html", values, principal=principal)


@router.post("/config/versions/{version_id}/rollback", summary="Roll back", response_model=None)
def rollback(request: Request, version_id: RowId, principal: Principal = admin) -> Response:
    ctx, address = ctx_of(request), client_address(request)
    try:
        result = versions.rollback_config(ctx, version_id, principal, address)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except ControlError as exc:
        flash(request, f"rollback refused: {_reason(exc)}", "error")
        return RedirectResponse(f"/config/versions/{version_id}", status_code=303)
    _applied(request, result)
    return RedirectResponse("/config", status_code=303)


def _errors(exc: ControlError) -> list[str]:
    return list(exc.errors) if isinstance(exc, versions.InvalidConfig) else [str(exc)]


def _reason(exc: ControlError) -> str:
    if isinstance(exc, versions.InvalidConfig):
        return "; ".join([str(exc), *exc.errors])
    return str(exc)


def _refused(
    request: Request, principal: Principal, candidate: str, comment: str, exc: ControlError
) -> HTMLResponse:
    check = versions.Validation(False, _errors(exc), [], "")
    extra = {"candidate": candidate, "check": check, "comment": comment, "refused": True}
    response = _page(request, principal, extra)
    response.status_code = 422 if isinstance(exc, versions.InvalidConfig) else 409
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
