"""``GET /api/v1/audit``: who did what, and when.

Admin only. The log holds failed logins (user names as typed, sometimes a
password typed into the wrong field), source addresses and configuration diffs:
what an administrator needs to review, not what a viewer or an operator needs to
do their job. Operators see the outcome of actions on the resources themselves.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from dicomrouter.edge.auth import admin, context
from dicomrouter.edge.params import Timestamp
from dicomrouter.security import Principal
from dicomrouter.store import audit

router = APIRouter(prefix="/api/v1", tags=["audit"])


@router.get(
    "/audit",
    summary="The audit log, newest first (admin)",
    description="Filters: `actor` (exact), `action` (a prefix: `job.` gives every job "
    "action), `outcome` (`ok`, `denied`, `failed`), `since` and `until` (POSIX "
    "seconds or ISO 8601, `since` inclusive). Paginated with `limit` and `offset`.",
)
def audit_log(
    request: Request,
    actor: str | None = None,
    action: Annotated[str | None, Query(description="prefix, e.g. `config.`")] = None,
    outcome: str | None = None,
    since: Timestamp | None = None,
    until: Timestamp | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    principal: Principal = admin,
) -> dict[str, Any]:
    total, items = audit.query(
        context(request).reader,
        actor=actor,
        action=action,
        outcome=outcome,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    return {"total": total, "limit": limit, "offset": offset, "items": items}
