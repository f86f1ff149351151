"""Overview actions on what would otherwise be lost quietly: re-plan the instances the
planner set aside, move or cancel the jobs of a destination no longer configured.
Operators only; audited by the control functions, like the API's."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse

from dicomrouter.control.jobs import JobFilter, bulk_action, move_jobs
from dicomrouter.control.unplanned import replan
from dicomrouter.queue import states as S
from dicomrouter.security import Principal

from .common import actor, back, ctx_of, operator, run_action

router = APIRouter(include_in_schema=False)


@router.post("/unplanned/replan", summary="Plan set-aside instances now")
def replan_all(request: Request, principal: Principal = operator) -> RedirectResponse:
    def act() -> str:
        changed = replan(ctx_of(request).engine, None, **actor(principal, request))
        return f"{changed} instance(s) will be planned again within seconds"

    run_action(request, act)
    return back(request, "/")


@router.post("/orphans/move", summary="Move a removed destination's jobs")
def move(
    request: Request,
    source: str = Form(...),
    target: str = Form(...),
    principal: Principal = operator,
) -> RedirectResponse:
    ctx = ctx_of(request)

    def act() -> str:
        result = move_jobs(
            ctx.engine, ctx.config.destinations, source, target, **actor(principal, request)
        )
        left = f"; {result.left} still held by a worker" if result.left else ""
        return f"{result.moved} job(s) of {source} moved to {target}{left}"

    run_action(request, act)
    return back(request, "/")


@router.post("/orphans/cancel", summary="Cancel a removed destination's jobs")
def cancel(
    request: Request, source: str = Form(...), principal: Principal = operator
) -> RedirectResponse:
    def act() -> str:
        f = JobFilter(destination=source, state=list(S.OPEN_STATES))
        who = actor(principal, request)
        engine = ctx_of(request).engine
        changed = bulk_action(engine, f, "cancel", actor=who["actor"], source=who["source"])
        return f"{changed} job(s) of {source} canceled"

    run_action(request, act)
    return back(request, "/")
