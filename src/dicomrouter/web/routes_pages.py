"""Routes: the rules as readable text with hit counters, and a rule tester.

The tester has two halves: drop DICOM files to see where each would go (a dry run
of the current rules on their headers), or write a candidate rule to see which
stored studies of the last days it would have matched. Both only read, but they
cost CPU and read uploads: like the API, they need the operator role and are
recorded in the audit log.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from dicomrouter.config import ConfigError, load_yaml
from dicomrouter.control.errors import ControlError
from dicomrouter.control.routes import (
    Pretend,
    audited_backtest,
    audited_dry_run,
    route_history,
    route_summaries,
)
from dicomrouter.edge.auth import client_address
from dicomrouter.edge.uploads import uploaded_files
from dicomrouter.security import Principal, Role

from .common import ctx_of, operator, render, viewer

router = APIRouter(include_in_schema=False)

MAX_FILES = 20
EXAMPLE_RULE = """name: candidate
trigger: study
when:
  Modality: CT
to: [pacs]
"""


def _page(
    request: Request, principal: Principal, extra: dict[str, Any] | None = None
) -> HTMLResponse:
    values: dict[str, Any] = {
        "title": "Routes",
        "routes": route_summaries(ctx_of(request)),
        "dry_run": None,
        "backtest": None,
        "candidate": EXAMPLE_RULE,
        "days": 7,
        "calling_ae": "",
        "error": None,
        "transform": "",
        "transforms": sorted(ctx_of(request).config.transforms),
        "tester_error": None,
    }
    values.update(extra or {})
    return render(request, "routes.html", values, principal=principal)


@router.get("/routes", summary="Routes", response_class=HTMLResponse)
def routes(request: Request, principal: Principal = viewer) -> HTMLResponse:
    return _page(request, principal)


@router.get("/routes/{name}", summary="One route's history", response_class=HTMLResponse)
def route(request: Request, name: str, principal: Principal = viewer) -> HTMLResponse:
    ctx = ctx_of(request)
    summary = next((r for r in route_summaries(ctx) if r["name"] == name), None)
    if summary is None:
        raise HTTPException(404, f"no route {name}")
    history = route_history(ctx.reader, name, 100)
    values = {"title": f"Route {name}", "r": summary, "history": history}
    return render(request, "route.html", values, principal=principal)


@router.post("/routes/test", summary="Where would these files go", response_class=HTMLResponse)
async def test_files(request: Request, principal: Principal = operator) -> HTMLResponse:
    ctx = ctx_of(request)
    async with uploaded_files(request, MAX_FILES) as (uploads, form):
        # Conditions on the sender (calling_ae: ...) need to know who it would be.
        calling_ae = str(form.get("calling_ae") or "").strip()
        transform = str(form.get("transform") or "").strip() or None
        sources = [(f.filename or f"file {i + 1}", f.file) for i, f in enumerate(uploads)]
        try:
            results = await run_in_threadpool(
                audited_dry_run,
                ctx,
                sources,
                Pretend(calling_ae=calling_ae),
                actor=principal.name,
                source=client_address(request),
                transform=transform,
                keyed_allowed=principal.may(Role.admin),
            )
        except ControlError as exc:
            return _page(request, principal, {"tester_error": str(exc), "calling_ae": calling_ae})
    values = {"dry_run": results, "calling_ae": calling_ae, "transform": transform or ""}
    return _page(request, principal, values)


@router.post(
    "/routes/backtest", summary="What would a rule have matched", response_class=HTMLResponse
)
def test_rule(
    request: Request,
    candidate: str = Form(...),
    days: float = Form(7),
    principal: Principal = operator,
) -> HTMLResponse:
    # Shown back as typed: 7, not 7.0.
    extra: dict[str, Any] = {
        "candidate": candidate,
        "days": int(days) if days.is_integer() else days,
    }
    try:
        rule = load_yaml(candidate, "the candidate rule")
        if not isinstance(rule, dict):
            raise ValueError("write the rule as a mapping, like a routes: entry")
        extra["backtest"] = audited_backtest(
            ctx_of(request),
            rule,
            days,
            200,
            actor=principal.name,
            source=client_address(request),
        )
    except ConfigError as exc:
        extra["error"] = "; ".join(exc.errors)
    except (ValueError, ControlError) as exc:
        extra["error"] = str(exc)
    return _page(request, principal, extra)
