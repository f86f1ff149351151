"""Destinations: live state, queue, failures; echo, pause and resume (operators)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from dicomrouter.control import destinations
from dicomrouter.control.errors import ControlError
from dicomrouter.control.jobs import JobFilter, search_jobs
from dicomrouter.security import Principal

from .common import actor, back, ctx_of, operator, render, run_action, viewer

router = APIRouter(include_in_schema=False)


class Unreachable(ControlError):
    """Shown as an error message: the echo itself worked, the peer did not answer."""


@router.get("/destinations", summary="Destinations", response_class=HTMLResponse)
def destinations_page(request: Request, principal: Principal = viewer) -> HTMLResponse:
    items = destinations.destination_summaries(ctx_of(request))
    return render(
        request,
        "destinations.html",
        {"title": "Destinations", "destinations": items},
        principal=principal,
    )


@router.get("/destinations/{name}", summary="One destination", response_class=HTMLResponse)
def destination(request: Request, name: str, principal: Principal = viewer) -> HTMLResponse:
    ctx = ctx_of(request)
    detail = destinations.destination_detail(ctx, name)
    if detail is None:
        raise HTTPException(404, f"no destination {name}")
    total, recent = search_jobs(ctx.reader, JobFilter(destination=name), limit=20)
    values = {"title": name, "d": detail, "jobs": recent, "jobs_total": total}
    return render(request, "destination.html", values, principal=principal)


@router.post("/destinations/{name}/echo", summary="Probe a destination (DICOM: C-ECHO)")
def echo(request: Request, name: str, principal: Principal = operator) -> RedirectResponse:
    def act() -> str:
        ctx = ctx_of(request)
        result = destinations.echo(ctx, name, **actor(principal, request))
        if not result["ok"]:
            dest = ctx.config.destinations.get(name)
            check = dest.probe_label if dest is not None else "the probe"
            raise Unreachable(f"{name} did not answer {check}: {result['error']}")
        note = f" ({result['error']})" if result.get("error") else ""
        return f"{name} answered in {float(result['ms']):.0f} ms{note}"

    run_action(request, act)
    return back(request, "/destinations")


@router.post("/destinations/{name}/pause", summary="Pause a destination")
def pause(request: Request, name: str, principal: Principal = operator) -> RedirectResponse:
    def act() -> str:
        destinations.pause(ctx_of(request), name, **actor(principal, request))
        return f"{name} paused: nothing is sent until it is resumed"

    run_action(request, act)
    return back(request, "/destinations")


@router.post("/destinations/{name}/resume", summary="Resume a destination")
def resume(request: Request, name: str, principal: Principal = operator) -> RedirectResponse:
    def act() -> str:
        destinations.resume(ctx_of(request), name, **actor(principal, request))
        return f"{name} resumed: its queue is sent now"

    run_action(request, act)
    return back(request, "/destinations")
