"""The audit log: who did what, when, from where (admins, as in the API)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from dicomrouter.control.errors import Invalid
from dicomrouter.security import Principal
from dicomrouter.store import audit

from .audit_text import describe
from .common import AUDIT_ROLE, ctx_of, page_role, parse_time, render

router = APIRouter(include_in_schema=False)
audit_viewer = Depends(page_role(AUDIT_ROLE))

PAGE = 100


@router.get("/audit", summary="Audit log", response_class=HTMLResponse)
def audit_page(
    request: Request,
    offset: int = 0,
    principal: Principal = audit_viewer,
) -> HTMLResponse:
    q = request.query_params
    filters = {k: q[k] for k in ("actor", "action", "outcome", "since", "until") if q.get(k)}
    error = None
    try:
        total, entries = audit.query(
            ctx_of(request).reader,
            actor=filters.get("actor"),
            action=filters.get("action"),
            outcome=filters.get("outcome"),
            since=parse_time(filters.get("since")),
            until=parse_time(filters.get("until")),
            limit=PAGE,
            offset=max(0, offset),
        )
    except Invalid as exc:  # a mistyped time: say so, show nothing
        total, entries, error = 0, [], str(exc)
    for entry in entries:
        entry["sentences"] = describe(entry["action"], entry["detail"])
    values = {
        "title": "Audit log",
        "entries": entries,
        "total": total,
        "offset": offset,
        "page": PAGE,
        "filters": filters,
        "error": error,
    }
    return render(request, "audit.html", values, principal=principal)
