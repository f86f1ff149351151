"""Instances the planner could not plan, and when it tries each of them again.

An instance the receiver acknowledged must reach its destinations even when its plan
could not be written (the index was full, the database refused, the header could
not be read). A plan that another planner (another node) wrote first is not a
failure: the planner skips what is planned already (``Planner._still_unplanned``), so
concurrent planners never set an instance aside. Retry times are in the database's
clock, which every node shares. The planner sets such an instance aside (``instances.routed = -1``)
so that it does not hold up the ones behind it, and records it here with a retry
time: 5 s after the first failure, doubling up to 5 min. The planner's loop picks
due ones up again; :func:`replan_now` brings them forward (the operator's re-plan).
Nothing here waits for a restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, func, select, update

from dicomrouter.store.dialect import database_now
from dicomrouter.store.schema import instances, unplanned

#: Delay before the first retry, doubled after each failed one, up to the cap.
FIRST_DELAY = 5.0
MAX_DELAY = 300.0
#: Instances listed in a summary (the count says how many there are in all).
LISTED = 20


def retry_delay(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones."""
    return float(min(FIRST_DELAY * 2 ** max(attempts - 1, 0), MAX_DELAY))


def error_text(exc: BaseException) -> str:
    """The reason, without the SQL statement SQLAlchemy appends to database errors."""
    cause = getattr(exc, "orig", None) or exc
    return f"{type(cause).__name__}: {cause}"[:2000]


@dataclass(frozen=True)
class UnplannedInstance:
    instance_id: int
    sop_instance_uid: str
    study_instance_uid: str
    attempts: int
    first_failed_at: float
    next_attempt_at: float
    last_error: str


@dataclass(frozen=True)
class UnplannedSummary:
    """How many instances wait to be planned again, the oldest failure, and the first
    few (oldest first)."""

    count: int
    oldest_failed_at: float | None
    items: list[UnplannedInstance]


def set_aside(
    conn: Connection, instance_id: int, generation: int, error: str, now: float
) -> float | None:
    """Record a failed plan of this generation of the instance; returns when it is
    tried again, or None when the instance was received again meanwhile (the new
    generation is planned as any new instance)."""
    changed = conn.execute(
        update(instances)
        .where(instances.c.id == instance_id, instances.c.generation == generation)
        .values(routed=-1)
    ).rowcount
    if not changed:
        return None
    previous = conn.execute(
        select(unplanned.c.attempts, unplanned.c.generation, unplanned.c.first_failed_at).where(
            unplanned.c.instance_id == instance_id
        )
    ).first()
    same = previous is not None and previous.generation == generation
    attempts = previous.attempts + 1 if same and previous is not None else 1
    next_at = now + retry_delay(attempts)
    values = {
        "generation": generation,
        "attempts": attempts,
        "next_attempt_at": next_at,
        "last_error": error,
        "first_failed_at": previous.first_failed_at if same and previous is not None else now,
    }
    if previous is None:
        conn.execute(unplanned.insert().values(instance_id=instance_id, **values))
    else:
        conn.execute(
            update(unplanned).where(unplanned.c.instance_id == instance_id).values(**values)
        )
    return next_at


def due(engine: Engine, now: float | None, limit: int) -> list[int]:
    """Set-aside instances whose retry time has come (at ``now``, by default the
    database's), longest waiting first."""
    with engine.connect() as conn:
        now = database_now(conn) if now is None else now
        return list(
            conn.execute(
                select(unplanned.c.instance_id)
                .join(instances, instances.c.id == unplanned.c.instance_id)
                .where(unplanned.c.next_attempt_at <= now, instances.c.routed == -1)
                .order_by(unplanned.c.next_attempt_at)
                .limit(limit)
            ).scalars()
        )


def summary(engine: Engine, limit: int = LISTED) -> UnplannedSummary:
    """What waits to be planned again (cheap: the table holds only those)."""
    with engine.connect() as conn:
        count, oldest = conn.execute(
            select(func.count(), func.min(unplanned.c.first_failed_at))
        ).one()
        rows = conn.execute(
            select(
                unplanned.c.instance_id,
                instances.c.sop_instance_uid,
                instances.c.study_instance_uid,
                unplanned.c.attempts,
                unplanned.c.first_failed_at,
                unplanned.c.next_attempt_at,
                unplanned.c.last_error,
            )
            .join(instances, instances.c.id == unplanned.c.instance_id)
            .order_by(unplanned.c.first_failed_at, unplanned.c.instance_id)
            .limit(max(0, limit))
        ).all()
    items = [UnplannedInstance(*row) for row in rows]
    return UnplannedSummary(int(count or 0), oldest, items)


def replan_now(engine: Engine, instance_ids: Sequence[int] | None = None) -> int:
    """Make set-aside instances (all, or these) due now; the planner takes them on
    its next pass. Returns how many."""
    with engine.begin() as conn:
        statement = update(unplanned).values(next_attempt_at=database_now(conn))
        if instance_ids is not None:
            statement = statement.where(unplanned.c.instance_id.in_(list(instance_ids)))
        return int(conn.execute(statement).rowcount or 0)
