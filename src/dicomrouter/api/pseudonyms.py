"""``GET /api/v1/pseudonyms/{pseudonym}`` and ``GET /api/v1/pseudonyms?original=``:
re-identification, from the mapping de-identifying pipelines record when their step
has ``mapping`` (docs/transforms.md, "Re-identification").

Admin only, and every read is audited (``control.reidentify``, which also audits
refused reads: the route lets any signed-in caller in so that a viewer's or an
operator's attempt is on record, then answers 403).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from dicomrouter.control import reidentify as control
from dicomrouter.edge.auth import client_address, context, viewer
from dicomrouter.security import Principal

from .control_errors import http_errors

router = APIRouter(prefix="/api/v1", tags=["pseudonyms"])


@router.get(
    "/pseudonyms",
    summary="Re-identify by original: the pseudonyms recorded for it (admin, audited)",
    description="`original`: a Patient ID (with `issuer`, its Issuer of Patient ID, "
    "if it has one) or a study, series or instance UID. The audit row does not name it.",
)
def by_original(
    request: Request,
    original: Annotated[str, Query(min_length=1, max_length=256)],
    issuer: Annotated[str, Query(max_length=64)] = "",
    principal: Principal = viewer,
) -> dict[str, Any]:
    with http_errors():
        return control.reidentify_original(
            context(request),
            principal,
            original,
            issuer=issuer,
            source=client_address(request),
        )


@router.get(
    "/pseudonyms/{pseudonym}",
    summary="Re-identify a pseudonym: the originals recorded for it (admin, audited)",
    description="A pseudonymous Patient ID or UID made by a `deidentify` step with "
    "`mapping`. 404 when nothing is recorded for it; 503 when the key it was recorded "
    "with is not in the service's environment.",
)
def by_pseudonym(request: Request, pseudonym: str, principal: Principal = viewer) -> dict[str, Any]:
    with http_errors():
        return control.reidentify(
            context(request), principal, pseudonym, source=client_address(request)
        )
