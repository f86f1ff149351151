"""The audit trail: an append-only record of who did what, and when.

Every process writes here (the receiver for rejected associations, the HTTP service
for logins, manual actions and configuration changes, the alerter for alerts). A
failure to write an audit row is logged but never fails the action it describes:
a full audit table must not stop a modality from sending.

It sits in ``store``, beside the table it writes, so the receiver, the retention
sweeper, the alerter and ``control`` all record through it without depending on each
other (docs/architecture.md, *Layers*).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, func, select

from dicomrouter.observe.logs import escape_controls
from dicomrouter.store.schema import audit_log

log = logging.getLogger("dicomrouter.audit")

SYSTEM = "system"


def record(
    engine: Engine,
    actor: str,
    action: str,
    target: str = "",
    *,
    outcome: str = "ok",
    source: str = "",
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit row. ``action`` is a dotted verb such as ``job.retry``.

    Control characters in the text columns (a user name or AE title chosen by
    whoever connected) are written as escapes, as in the log (``observe.logs``);
    ``detail`` is JSON, which escapes them itself."""
    try:
        with engine.begin() as conn:
            conn.execute(
                audit_log.insert().values(
                    at=time.time(),
                    actor=escape_controls(actor)[:128],
                    source=escape_controls(source)[:64],
                    action=escape_controls(action)[:64],
                    target=escape_controls(target)[:256],
                    outcome=escape_controls(outcome)[:16],
                    detail=json.dumps(dict(detail or {}), default=str, sort_keys=True),
                )
            )
    except Exception:
        log.exception("cannot write audit record %s %s %s", actor, action, target)


def query(
    engine: Engine,
    *,
    actor: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[int, list[dict[str, Any]]]:
    """Newest first. ``action`` matches a prefix (``job.`` gives every job action)."""
    conditions = []
    if actor:
        conditions.append(audit_log.c.actor == actor)
    if action:
        conditions.append(audit_log.c.action.startswith(action, autoescape=True))
    if outcome:
        conditions.append(audit_log.c.outcome == outcome)
    if since is not None:
        conditions.append(audit_log.c.at >= since)
    if until is not None:
        conditions.append(audit_log.c.at < until)
    with engine.connect() as conn:
        total = conn.execute(
            select(func.count()).select_from(audit_log).where(*conditions)
        ).scalar_one()
        rows = conn.execute(
            select(audit_log)
            .where(*conditions)
            .order_by(audit_log.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        entries = []
        for row in rows:
            entry = dict(row._mapping)
            entry["detail"] = json.loads(entry["detail"] or "{}")
            entries.append(entry)
    return int(total), entries
