"""Studies: search what was received, and trace where one study went."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from dicomrouter.control.studies import search_studies, series_deliveries, study_trace
from dicomrouter.security import Principal

from .common import ctx_of, render, templates, viewer
from .trace_view import plural, short_uid, timeline

router = APIRouter(include_in_schema=False)
templates.env.filters.update(short_uid=short_uid, plural=plural)

PAGE = 50
FIELDS = (
    "patient_id",
    "patient_name",
    "accession_number",
    "study_date_from",
    "study_date_to",
    "modality",
    "calling_ae",
)


def _dicom_date(value: str) -> str:
    """``2024-05-01`` from a date input, as DICOM's ``20240501``."""
    return value.replace("-", "")


@router.get("/studies", summary="Study search", response_class=HTMLResponse)
def studies(request: Request, offset: int = 0, principal: Principal = viewer) -> HTMLResponse:
    params = {k: v for k, v in request.query_params.items() if k in FIELDS and v}
    filters: dict[str, Any] = {
        k: _dicom_date(v) if k.startswith("study_date") else v for k, v in params.items()
    }
    total, rows = search_studies(ctx_of(request).reader, **filters, limit=PAGE, offset=offset)
    values = {
        "title": "Studies",
        "rows": rows,
        "total": total,
        "offset": offset,
        "page": PAGE,
        "filters": params,
    }
    return render(request, "studies.html", values, principal=principal)


@router.get("/studies/{uid}", summary="Where did this study go", response_class=HTMLResponse)
def trace(request: Request, uid: str, principal: Principal = viewer) -> HTMLResponse:
    ctx = ctx_of(request)
    result = study_trace(ctx, uid)
    if result is None:
        raise HTTPException(404, f"no study {uid}")
    values = {
        "title": "Study trace",
        "uid": uid,
        "t": result,
        "timeline": timeline(result),
        "groups": series_deliveries(ctx, uid),
    }
    return render(request, "trace.html", values, principal=principal)
