"""What would otherwise be lost quietly: instances not planned, jobs without a destination.

- ``GET /api/v1/unplanned``: acknowledged instances whose plan could not be written;
  the planner retries them with backoff, ``POST /api/v1/unplanned/replan`` now.
- ``GET /api/v1/jobs/orphaned``: open jobs of destinations no longer configured;
  ``POST /api/v1/jobs/move`` hands them to another destination, and bulk cancel
  (``POST /api/v1/jobs/cancel`` with ``destination``) drops them.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from dicomrouter.control import jobs as control_jobs
from dicomrouter.control import unplanned as control_unplanned
from dicomrouter.edge.auth import client_address, context, operator, viewer
from dicomrouter.security import Principal

from .control_errors import http_errors

router = APIRouter(prefix="/api/v1", tags=["recovery"])


class ReplanBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int] | None = Field(
        None, description="Instance ids (from GET /api/v1/unplanned); unset: all of them"
    )


class MoveBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    source: str = Field(alias="from", min_length=1, description="Destination the jobs are for")
    target: str = Field(alias="to", min_length=1, description="A configured destination")


@router.get("/unplanned", summary="Acknowledged instances waiting to be planned again")
def list_unplanned(
    request: Request,
    limit: Annotated[int, Query(ge=0, le=1000)] = 100,
    _: Principal = viewer,
) -> dict[str, Any]:
    return asdict(control_unplanned.summary(context(request).reader, limit))


@router.post(
    "/unplanned/replan",
    summary="Plan set-aside instances now instead of at their next retry (operator)",
    responses={404: {"description": "No such instance waits to be planned"}},
)
def replan(body: ReplanBody, request: Request, who: Principal = operator) -> dict[str, Any]:
    with http_errors():
        changed = control_unplanned.replan(
            context(request).engine, body.ids, actor=who.name, source=client_address(request)
        )
    return {"action": "replan", "changed": changed}


@router.get("/jobs/orphaned", summary="Open jobs of destinations no longer configured")
def orphaned(request: Request, _: Principal = viewer) -> list[dict[str, Any]]:
    ctx = context(request)
    return [asdict(q) for q in control_jobs.orphaned_queues(ctx.reader, ctx.config.destinations)]


@router.post(
    "/jobs/move",
    summary="Send a destination's open jobs to another destination (operator)",
    description="Each waiting job's undelivered instances are queued for `to` (what `to` "
    "already has is not sent twice) and the job is canceled with a note naming `to`. "
    "Jobs a worker still holds are left (`left`). 422 if `to` is not configured, "
    "404 if `from` has no open jobs.",
)
def move(body: MoveBody, request: Request, who: Principal = operator) -> dict[str, Any]:
    ctx = context(request)
    with http_errors():
        result = control_jobs.move_jobs(
            ctx.engine,
            ctx.config.destinations,
            body.source,
            body.target,
            actor=who.name,
            source=client_address(request),
        )
    return asdict(result)
