"""``GET /api/v1/status``: the node at a glance; and throughput for the overview chart."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from dicomrouter.control import status as control
from dicomrouter.edge.auth import context, viewer
from dicomrouter.edge.params import Timestamp
from dicomrouter.security import Principal

from .control_errors import http_errors

router = APIRouter(prefix="/api/v1", tags=["status"])


@router.get(
    "/status",
    summary="Version, uptime, counts, disk and a summary per destination",
)
def get_status(request: Request, _: Principal = viewer) -> dict[str, Any]:
    return control.node_status(context(request))


@router.get(
    "/status/throughput",
    summary="Instances received, delivered and failed per time bucket",
    description="Every bucket from `since` (rounded down to a whole bucket; default: "
    "six hours ago) to now, empty ones included. At most "
    f"{control.MAX_BUCKETS} buckets.",
)
def get_throughput(
    request: Request,
    since: Annotated[Timestamp | None, Query(description="POSIX seconds or ISO 8601")] = None,
    bucket_s: Annotated[int, Query(ge=1, le=86400, description="Bucket width (s)")] = 300,
    _: Principal = viewer,
) -> list[dict[str, Any]]:
    start = time.time() - 6 * 3600 if since is None else since
    with http_errors():
        return control.throughput(context(request).reader, start, bucket_s)
