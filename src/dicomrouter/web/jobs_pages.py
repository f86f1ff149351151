"""Jobs: a filterable list, one job in detail, retry/cancel one by one or in bulk."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from dicomrouter.control.errors import ControlError, Invalid
from dicomrouter.control.jobs import (
    JobFilter,
    bulk_action,
    cancel,
    job_detail,
    orphaned_queues,
    retry,
    search_jobs,
    set_priority,
)
from dicomrouter.edge.params import RowId
from dicomrouter.queue import states as S
from dicomrouter.security import Principal

from .common import actor, back, ctx_of, operator, parse_time, render, run_action, viewer

router = APIRouter(include_in_schema=False)

PAGE = 50
FILTER_FIELDS = ("state", "destination", "route", "study_uid", "patient_id", "accession_number")


def job_filter(values: dict[str, str]) -> JobFilter:
    """The filter form's fields (query string or hidden form fields) as a JobFilter."""

    def text(key: str) -> str | None:
        return values.get(key) or None

    return JobFilter(
        state=text("state"),
        destination=text("destination"),
        route=text("route"),
        study_uid=text("study_uid"),
        patient_id=text("patient_id"),
        accession_number=text("accession_number"),
        since=parse_time(values.get("since")),
        until=parse_time(values.get("until")),
    )


@router.get("/jobs", summary="Jobs", response_class=HTMLResponse)
def jobs_page(request: Request, offset: int = 0, principal: Principal = viewer) -> HTMLResponse:
    ctx = ctx_of(request)
    params = {k: v for k, v in request.query_params.items() if k != "offset"}
    error = None
    try:
        total, rows = search_jobs(ctx.reader, job_filter(params), limit=PAGE, offset=offset)
    except ControlError as exc:  # an invalid filter: say so, show nothing
        total, rows, error = 0, [], str(exc)
    values: dict[str, Any] = {
        "title": "Jobs",
        "rows": rows,
        "total": total,
        "offset": offset,
        "page": PAGE,
        "filters": params,
        "states": S.JOB_STATES,
        # Destinations removed from the configuration stay selectable while they have jobs.
        "destinations": sorted(
            set(ctx.config.destinations)
            | {q.destination for q in orphaned_queues(ctx.reader, ctx.config.destinations)}
        ),
        "routes": [r.name for r in ctx.config.routes],
        "error": error,
        "query": str(request.url.query),
    }
    return render(request, "jobs.html", values, principal=principal)


@router.get("/jobs/{job_id}", summary="One job", response_class=HTMLResponse)
def job_page(request: Request, job_id: RowId, principal: Principal = viewer) -> HTMLResponse:
    ctx = ctx_of(request)
    job = job_detail(ctx.reader, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    dest = ctx.config.destinations.get(job["destination"])
    values = {
        "title": f"Job {job_id}",
        "job": job,
        "max_attempts": dest.retry.max_attempts if dest is not None else None,
    }
    return render(request, "job.html", values, principal=principal)


@router.post("/jobs/{job_id}/retry", summary="Retry a job")
def retry_one(request: Request, job_id: RowId, principal: Principal = operator) -> RedirectResponse:
    def act() -> str:
        retry(ctx_of(request).engine, [job_id], **actor(principal, request))
        return f"job {job_id} queued again"

    run_action(request, act)
    return back(request, f"/jobs/{job_id}")


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job")
def cancel_one(
    request: Request, job_id: RowId, principal: Principal = operator
) -> RedirectResponse:
    def act() -> str:
        cancel(ctx_of(request).engine, [job_id], **actor(principal, request))
        return f"job {job_id} canceled"

    run_action(request, act)
    return back(request, f"/jobs/{job_id}")


@router.post("/jobs/{job_id}/priority", summary="Change a job's priority")
def priority(
    request: Request, job_id: RowId, value: int = Form(...), principal: Principal = operator
) -> RedirectResponse:
    def act() -> str:
        set_priority(ctx_of(request).engine, job_id, value, **actor(principal, request))
        return f"job {job_id} now has priority {value}"

    run_action(request, act)
    return back(request, f"/jobs/{job_id}")


@router.post("/jobs/bulk", summary="Retry or cancel several jobs")
async def bulk(request: Request, principal: Principal = operator) -> RedirectResponse:
    form = await request.form()
    action = str(form.get("action", ""))
    scope = str(form.get("scope", "selected"))
    who = actor(principal, request)
    engine = ctx_of(request).engine

    def act() -> str:
        if action not in ("retry", "cancel"):
            raise Invalid(f"unknown action {action!r}")
        if scope == "filter":
            f = job_filter({k: str(form.get(k) or "") for k in (*FILTER_FIELDS, "since", "until")})
            changed = bulk_action(engine, f, action, **who)  # type: ignore[arg-type]
            return f"{action}: {changed} job(s) matching the filter changed"
        ids = [int(str(v)) for v in form.getlist("ids") if str(v).isdigit()]
        if not ids:
            raise Invalid("select at least one job")
        do = retry if action == "retry" else cancel
        changed = do(engine, ids, **who)
        return f"{action}: {changed} of {len(ids)} selected job(s) changed"

    run_action(request, act)
    return back(request, "/jobs")
