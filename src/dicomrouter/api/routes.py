"""``/api/v1/routes``: rules as text with hit counters, history, and dry runs.

Two dry runs, both operator+ (they read files and cost CPU; they change nothing,
but they are recorded in the audit log as ``route.test`` / ``route.backtest``):

- ``POST /api/v1/routes/test`` with ``multipart/form-data`` (field ``files``, one or
  more DICOM files): which routes and destinations each file would take, and why.
  Uploads are parsed from Starlette's spooled temporary files (header only) and
  deleted when the request ends. A file that is not DICOM gets an ``error`` entry;
  the others are still answered.
- ``POST /api/v1/routes/backtest`` with JSON ``{"route": {...}, "days": N}``: which
  stored studies of the last N days a candidate rule would have matched. The same
  JSON body is also accepted by ``POST /api/v1/routes/test`` (the path the issue
  names for both), dispatched on the request's content type.

An invalid candidate rule gives 422 with ``detail.errors`` as ``key.path: reason``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from dicomrouter.control import routes as control
from dicomrouter.control.errors import Forbidden, Invalid, NotFound
from dicomrouter.edge.auth import client_address, context, operator, viewer
from dicomrouter.edge.uploads import uploaded_files
from dicomrouter.security import Principal, Role

router = APIRouter(prefix="/api/v1", tags=["routes"])

MAX_FILES = 100


class Backtest(BaseModel):
    """A candidate rule to try on the studies received in the last ``days``."""

    route: dict[str, Any] = Field(
        ...,
        description="A route as in the YAML file (`when`, `to`, `trigger`...); "
        "`name` defaults to `candidate`.",
        examples=[{"name": "ct-head", "when": {"Modality": "CT"}, "to": ["pacs"]}],
    )
    days: float = Field(7.0, gt=0, le=366, description="How far back to look.")
    limit: int = Field(
        control.BACKTEST_LIMIT,
        ge=1,
        le=100_000,
        description="Stored headers read at most (newest first); beyond it `truncated`.",
    )


@router.get("/routes", summary="Routes as readable text, with hit counters and jobs by state")
def list_routes(request: Request, principal: Principal = viewer) -> dict[str, Any]:
    return {"items": control.route_summaries(context(request))}


@router.get(
    "/routes/{name}",
    summary="One route: counters and its recent matches (one entry per study)",
    description="A route that is no longer configured but matched in the past is "
    "still shown, with `configured: false`. 404 if it is unknown either way.",
)
def get_route(
    name: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    principal: Principal = viewer,
) -> dict[str, Any]:
    ctx = context(request)
    summary = next((r for r in control.route_summaries(ctx) if r["name"] == name), None)
    history = control.route_history(ctx.reader, name, limit)
    if summary is None and not history:
        raise HTTPException(404, f"no route {name!r} in the configuration or its history")
    return {**(summary or {"name": name}), "configured": summary is not None, "history": history}


_TEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": f"DICOM files (at most {MAX_FILES}).",
                        },
                        "calling_ae": {"type": "string", "description": "Pretend sender AE."},
                        "called_ae": {"type": "string", "description": "Pretend called AE."},
                        "source_address": {"type": "string", "description": "Pretend IP."},
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/Backtest"}},
        },
    }
}


@router.post(
    "/routes/test",
    summary="Dry run: where uploaded DICOM files would go (or backtest a rule)",
    description="`multipart/form-data` with one or more `files`: for each file, every "
    "enabled route with `matched`, its `destinations` and the `explanation`; a file "
    "that is not DICOM gets an `error` entry instead. Optional form fields "
    "`calling_ae`, `called_ae`, `source_address` pretend how it arrived; `transform` "
    "(a pipeline's name) adds each file's tag-level diff through it as `transform` "
    "(404 for an unknown pipeline; 403 unless admin for a pipeline keyed by a secret, "
    "whose preview shows real pseudonyms). Sends and stores nothing. With a JSON body, the "
    "same as `POST /api/v1/routes/backtest`.",
    openapi_extra=_TEST_BODY,
)
async def test_route(request: Request, principal: Principal = operator) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = Backtest.model_validate(await request.json())
        except ValueError as exc:  # ValidationError, or a body that is not JSON
            if isinstance(exc, ValidationError):
                raise RequestValidationError(exc.errors()) from None
            invalid = {"type": "json_invalid", "loc": ["body"], "msg": str(exc)}
            raise RequestValidationError([invalid]) from None
        return await run_in_threadpool(_backtest, request, body, principal)
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(415, "send multipart/form-data files, or a JSON candidate rule")
    ctx = context(request)
    async with uploaded_files(request, MAX_FILES) as (uploads, form):
        pretend = control.Pretend(
            calling_ae=str(form.get("calling_ae") or ""),
            called_ae=str(form.get("called_ae") or "") or None,
            source_address=str(form.get("source_address") or "127.0.0.1"),
        )
        sources = [(u.filename or f"file{i + 1}", u.file) for i, u in enumerate(uploads)]
        transform = str(form.get("transform") or "").strip() or None
        try:
            report = await run_in_threadpool(
                control.audited_dry_run,
                ctx,
                sources,
                pretend,
                actor=principal.name,
                source=client_address(request),
                transform=transform,
                keyed_allowed=principal.may(Role.admin),
            )
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except Invalid as exc:
            raise HTTPException(422, str(exc)) from None
        except Forbidden as exc:
            raise HTTPException(403, str(exc)) from None
    return {"files": report}


@router.post(
    "/routes/backtest",
    summary="Backtest a candidate rule on the studies received in the last N days",
    description="Evaluates the rule newest first on stored headers; once a study "
    "matched, its other instances are skipped. At most `limit` headers are read: "
    "`truncated` says some instances of the window were not evaluated, and "
    "`evaluated_since` how far back it got. 422 with `detail.errors` (key paths) for an "
    "invalid rule.",
)
def backtest_route(
    body: Backtest, request: Request, principal: Principal = operator
) -> dict[str, Any]:
    return _backtest(request, body, principal)


def _backtest(request: Request, body: Backtest, principal: Principal) -> dict[str, Any]:
    try:
        return control.audited_backtest(
            context(request),
            body.route,
            body.days,
            body.limit,
            actor=principal.name,
            source=client_address(request),
        )
    except control.CandidateError as exc:
        raise HTTPException(
            422, {"message": "the candidate route is invalid", "errors": exc.errors}
        ) from None
