"""``/api/v1/loops``: instances held as routing loops, and releasing them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from dicomrouter.control import loops as control
from dicomrouter.edge.auth import client_address, context, operator, viewer
from dicomrouter.security import Principal

router = APIRouter(prefix="/api/v1/loops", tags=["loops"])


class ReleaseBody(BaseModel):
    """Which holds to release: their ids, or every one with ``"all": true``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    ids: list[int] | None = Field(None, description="Ids of holds (from GET /api/v1/loops)")
    all_held: bool = Field(False, alias="all", description="Every held instance")


@router.get("", summary="Instances held because they came back from a destination")
def list_held(
    request: Request,
    released: Annotated[bool, Query(description="Include released holds")] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    who: Principal = viewer,
) -> dict[str, Any]:
    events = control.held(context(request).reader, include_released=released, limit=limit)
    return {"held": [event.as_dict() for event in events]}


@router.post(
    "/release",
    summary="Route held instances after all (operator)",
    description="422 without `ids` or `all`. Returns the holds released.",
)
def release(body: ReleaseBody, request: Request, who: Principal = operator) -> dict[str, Any]:
    if not body.ids and not body.all_held:
        raise HTTPException(422, "name the holds to release in 'ids', or give 'all': true")
    released = control.release(
        context(request).engine,
        None if body.all_held else body.ids,
        actor=who.name,
        source=client_address(request),
    )
    return {"released": [event.as_dict() for event in released]}
