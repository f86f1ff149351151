"""``/api/v1/studies``: search received studies, and trace where one of them went.

Thin edge over :mod:`dicomrouter.control.studies`; viewers may read both.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from dicomrouter.control import studies
from dicomrouter.edge.auth import context, viewer
from dicomrouter.security import Principal

router = APIRouter(prefix="/api/v1", tags=["studies"])

_DATE = r"^\d{8}$"


@router.get(
    "/studies",
    summary="Search received studies",
    description="Every filter is optional and they combine with AND; a study matches "
    "when any of its instances does. Patient ID, patient name, accession number and "
    "calling AE take DICOM wildcards (`*`, `?`); without one they are exact. Newest "
    "reception first.",
)
def search(
    request: Request,
    patient_id: str | None = None,
    patient_name: Annotated[str | None, Query(description="e.g. `DOE^*`")] = None,
    accession_number: str | None = None,
    study_date_from: Annotated[
        str | None, Query(pattern=_DATE, description="YYYYMMDD, inclusive")
    ] = None,
    study_date_to: Annotated[
        str | None, Query(pattern=_DATE, description="YYYYMMDD, inclusive")
    ] = None,
    modality: Annotated[str | None, Query(description="e.g. `CT`")] = None,
    calling_ae: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
    principal: Principal = viewer,
) -> dict[str, Any]:
    total, items = studies.search_studies(
        context(request).reader,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_date_from=study_date_from,
        study_date_to=study_date_to,
        modality=modality,
        calling_ae=calling_ae,
        limit=limit,
        offset=offset,
    )
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get(
    "/studies/{uid}/trace",
    summary="Where did this study go? Receptions, route matches and deliveries",
    description="One timeline (`events`, oldest first): when each instance was received "
    "and from whom (per series and sender for big studies), which routes matched and "
    "why (re-explained on a stored header with the current rule), every job, attempt "
    "and outcome. `deliveries` has one entry per job. 404 if the study was never "
    "received.",
)
def trace(uid: str, request: Request, principal: Principal = viewer) -> dict[str, Any]:
    result = studies.study_trace(context(request), uid)
    if result is None:
        raise HTTPException(404, f"no study {uid} was received")
    return result
