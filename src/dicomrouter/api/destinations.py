"""Destinations: live state and queue, and the operator's actions (echo, pause, resume)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from dicomrouter.control import destinations as control
from dicomrouter.edge.auth import client_address, context, operator, viewer
from dicomrouter.security import Principal

from .control_errors import http_errors

router = APIRouter(prefix="/api/v1/destinations", tags=["destinations"])


@router.get(
    "",
    summary="Every destination: state, queue by state, oldest pending job, failure rate",
)
def list_destinations(request: Request, _: Principal = viewer) -> list[dict[str, Any]]:
    return control.destination_summaries(context(request))


@router.get("/{name}", summary="One destination", responses={404: {"description": "Unknown"}})
def get_destination(name: str, request: Request, _: Principal = viewer) -> dict[str, Any]:
    detail = control.destination_detail(context(request), name)
    if detail is None:
        raise HTTPException(404, f"no destination {name!r}")
    return detail


@router.post(
    "/{name}/echo",
    summary="Probe the destination now: DICOM C-ECHO, a folder's test write... (operator)",
    description="Returns `ok`, the round trip in `ms`, and the `error` if it failed. "
    "A failed echo is still a 200: the answer is in the body.",
    responses={404: {"description": "Unknown destination"}},
)
def echo_destination(
    name: str, request: Request, principal: Principal = operator
) -> dict[str, Any]:
    with http_errors():
        return control.echo(
            context(request), name, actor=principal.name, source=client_address(request)
        )


@router.post(
    "/{name}/pause",
    summary="Stop sending to the destination until resumed (operator)",
    description="Workers stop claiming its jobs within a second; a batch already on "
    "the wire finishes. Jobs keep queueing. 409 if it is already paused.",
    responses={404: {"description": "Unknown destination"}, 409: {"description": "Paused"}},
)
def pause_destination(
    name: str, request: Request, principal: Principal = operator
) -> dict[str, Any]:
    with http_errors():
        return control.pause(context(request), name, principal.name, client_address(request))


@router.post(
    "/{name}/resume",
    summary="Resume a destination paused by an operator (operator)",
    description="Its waiting jobs are due at once (retry delays are skipped). 409 if "
    "it was not paused by an operator; an automatic pause (`probing`) ends by itself "
    "at the first answer to its probe (DICOM: C-ECHO).",
    responses={404: {"description": "Unknown destination"}, 409: {"description": "Not paused"}},
)
def resume_destination(
    name: str, request: Request, principal: Principal = operator
) -> dict[str, Any]:
    with http_errors():
        return control.resume(context(request), name, principal.name, client_address(request))
