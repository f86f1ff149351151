"""Jobs: search with filters, one job with its instances and attempts, manual actions.

Bulk retry and cancel take the same filters as the search, in a JSON body. An empty
filter would act on the whole queue, so it is refused unless ``"all": true`` is
given; unknown fields are refused too (a typo must not widen the selection).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from dicomrouter.control import jobs as control
from dicomrouter.edge.auth import client_address, context, operator, viewer
from dicomrouter.edge.params import RowId, Timestamp
from dicomrouter.security import Principal

from .control_errors import http_errors

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such job"}}


class JobFilterBody(BaseModel):
    """The filters of ``GET /api/v1/jobs``, for bulk actions."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    ids: list[int] | None = Field(
        None, description="Exactly these jobs (the other filters narrow them further)"
    )
    state: str | list[str] | None = None
    destination: str | None = None
    route: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    since: Timestamp | None = Field(None, description="created at or after (POSIX s or ISO 8601)")
    until: Timestamp | None = Field(None, description="created before (POSIX s or ISO 8601)")
    all_jobs: bool = Field(False, alias="all", description="Required with an empty filter")

    def to_filter(self) -> control.JobFilter:
        return control.JobFilter(
            state=self.state,
            destination=self.destination,
            route=self.route,
            study_uid=self.study_uid,
            patient_id=self.patient_id,
            accession_number=self.accession_number,
            since=self.since,
            until=self.until,
            ids=self.ids,
        )


_SINCE = "created at or after (POSIX s or ISO 8601)"
_UNTIL = "created before (POSIX s or ISO 8601)"


class PriorityBody(BaseModel):
    priority: int = Field(ge=-1000, le=1000, description="Higher is sent first; default 0")


@router.get("", summary="Search jobs (newest first, paginated)")
def list_jobs(
    request: Request,
    state: Annotated[list[str] | None, Query(description="Repeat for several")] = None,
    destination: str | None = None,
    route: str | None = None,
    study_uid: str | None = None,
    patient_id: str | None = None,
    accession_number: str | None = None,
    since: Annotated[
        Timestamp | None, Query(description="created at or after (POSIX s or ISO 8601)")
    ] = None,
    until: Annotated[
        Timestamp | None, Query(description="created before (POSIX s or ISO 8601)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
    _: Principal = viewer,
) -> dict[str, Any]:
    f = control.JobFilter(
        state=state,
        destination=destination,
        route=route,
        study_uid=study_uid,
        patient_id=patient_id,
        accession_number=accession_number,
        since=since,
        until=until,
    )
    with http_errors():
        total, items = control.search_jobs(context(request).reader, f, limit, offset)
    return {"total": total, "limit": limit, "offset": offset, "items": items}


def _bulk(action: control.Action, body: JobFilterBody, request: Request, who: Principal) -> Any:
    ctx = context(request)
    with http_errors():
        changed = control.bulk_action(
            ctx.engine,
            body.to_filter(),
            action,
            actor=who.name,
            source=client_address(request),
            allow_all=body.all_jobs,
        )
    return {"action": action, "changed": changed}


@router.post(
    "/retry",
    summary="Retry every job matching the filters (operator)",
    description="Failed or canceled instances of the matching jobs are sent again. "
    "Returns the number of jobs changed. 422 for an empty filter without `all`.",
)
def bulk_retry(body: JobFilterBody, request: Request, who: Principal = operator) -> Any:
    return _bulk("retry", body, request, who)


@router.post(
    "/cancel",
    summary="Cancel every open job matching the filters (operator)",
    description="Returns the number of jobs changed. 422 for an empty filter without `all`.",
)
def bulk_cancel(body: JobFilterBody, request: Request, who: Principal = operator) -> Any:
    return _bulk("cancel", body, request, who)


@router.get(
    "/{job_id}", summary="One job: per-instance states and every attempt", responses=_NOT_FOUND
)
def get_job(job_id: RowId, request: Request, _: Principal = viewer) -> dict[str, Any]:
    detail = control.job_detail(context(request).reader, job_id)
    if detail is None:
        raise HTTPException(404, f"no job {job_id}")
    return detail


def _one(action: control.Action, job_id: int, request: Request, who: Principal) -> Any:
    ctx = context(request)
    act = control.retry if action == "retry" else control.cancel
    with http_errors():
        changed = act(ctx.engine, [job_id], actor=who.name, source=client_address(request))
    return {"action": action, "changed": changed, "job": control.job_detail(ctx.reader, job_id)}


@router.post(
    "/{job_id}/retry",
    summary="Send again what did not arrive (operator)",
    responses={**_NOT_FOUND, 409: {"description": "Nothing to retry (e.g. completed)"}},
)
def retry_job(job_id: RowId, request: Request, who: Principal = operator) -> Any:
    return _one("retry", job_id, request, who)


@router.post(
    "/{job_id}/cancel",
    summary="Cancel an open job (operator)",
    responses={**_NOT_FOUND, 409: {"description": "The job is already finished"}},
)
def cancel_job(job_id: RowId, request: Request, who: Principal = operator) -> Any:
    return _one("cancel", job_id, request, who)


_PRIORITY_SUMMARY = "Change an open job's priority (operator)"
_PRIORITY_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_NOT_FOUND,
    409: {"description": "The job is already finished"},
}


@router.put(
    "/{job_id}/priority",
    operation_id="put_job_priority",
    summary=_PRIORITY_SUMMARY,
    responses=_PRIORITY_RESPONSES,
)
@router.post(
    "/{job_id}/priority",
    operation_id="post_job_priority",
    summary=_PRIORITY_SUMMARY,
    responses=_PRIORITY_RESPONSES,
)
def set_priority(
    job_id: RowId, body: PriorityBody, request: Request, who: Principal = operator
) -> dict[str, Any]:
    with http_errors():
        return control.set_priority(
            context(request).engine,
            job_id,
            body.priority,
            actor=who.name,
            source=client_address(request),
        )
