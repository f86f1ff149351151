"""Instances the loop guards stopped (see ``queue/loops.py``): list, count, release.

A *held* instance came back from a destination we had just sent it to; it is not
routed until someone releases it here (CLI ``dicomrouter loops``, status, trace).
Releasing marks the hold and hands the instance back to the planner, which then
routes that copy as any other (the guard lets a released generation through).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from dicomrouter.queue.loops import HELD, NOT_SENT_BACK
from dicomrouter.store import audit
from dicomrouter.store.schema import instances, loop_events


@dataclass(frozen=True)
class LoopEvent:
    """One decision of a loop guard about one instance."""

    id: int
    kind: str  # held | not_sent_back
    instance_id: int
    generation: int
    sop_instance_uid: str
    study_instance_uid: str
    destination: str
    at: float
    reason: str
    released_at: float | None
    released_by: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def held(engine: Engine, include_released: bool = False, limit: int = 100) -> list[LoopEvent]:
    """Held instances, newest first (released ones too when asked)."""
    query = select(loop_events).where(loop_events.c.kind == HELD)
    if not include_released:
        query = query.where(loop_events.c.released_at.is_(None))
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(loop_events.c.id.desc()).limit(limit)).all()
    return [LoopEvent(**row._mapping) for row in rows]


def held_count(engine: Engine) -> int:
    """Instances held now (not released)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    loop_events.c.kind == HELD, loop_events.c.released_at.is_(None)
                )
            ).scalar_one()
        )


def release(
    engine: Engine, ids: Sequence[int] | None, actor: str, source: str = ""
) -> list[LoopEvent]:
    """Release holds (``ids`` of their events; None: every hold) and route those
    instances again. A hold whose instance was received again since (another
    generation) is released without routing the old copy. Audited as
    ``loop.release``. Returns the holds released."""
    now = time.time()
    query = select(loop_events).where(
        loop_events.c.kind == HELD, loop_events.c.released_at.is_(None)
    )
    if ids is not None:
        query = query.where(loop_events.c.id.in_(list(ids)))
    with engine.begin() as conn:
        rows = conn.execute(query).all()
        for row in rows:
            conn.execute(
                update(loop_events)
                .where(loop_events.c.id == row.id)
                .values(released_at=now, released_by=actor[:128])
            )
            conn.execute(
                update(instances)
                .where(instances.c.id == row.instance_id, instances.c.generation == row.generation)
                .values(routed=0)
            )
    released = [
        LoopEvent(**{**row._mapping, "released_at": now, "released_by": actor}) for row in rows
    ]
    if released:
        audit.record(
            engine,
            actor,
            "loop.release",
            ",".join(str(event.id) for event in released)[:256],
            source=source,
            detail={"instances": [event.sop_instance_uid for event in released[:100]]},
        )
    return released


def trace_events(conn: Connection, study_uid: str) -> list[dict[str, Any]]:
    """The study's loop decisions for its trace: one ``loop`` event per decision
    (``held`` / ``not_sent_back``) and destination, with counts and the first
    reason."""
    rows = conn.execute(
        select(
            loop_events.c.kind,
            loop_events.c.destination,
            func.count().label("n"),
            func.count(loop_events.c.released_at).label("released"),
            func.min(loop_events.c.at).label("first"),
            func.max(loop_events.c.at).label("last"),
            func.min(loop_events.c.reason).label("reason"),
        )
        .where(loop_events.c.study_instance_uid == study_uid)
        .group_by(loop_events.c.kind, loop_events.c.destination)
    ).all()
    return [
        {
            "at": row.first,
            "kind": "loop",
            "decision": row.kind,
            "destination": row.destination,
            "instances": row.n,
            "released": row.released if row.kind == HELD else None,
            "first_at": row.first,
            "last_at": row.last,
            "message": row.reason,
        }
        for row in rows
    ]


__all__ = ["HELD", "NOT_SENT_BACK", "LoopEvent", "held", "held_count", "release", "trace_events"]
