"""History and audit pruning: the rows retention deletes once their time is up.

History (``keep_history``, counted from the purge): the tombstone of a purged
instance, its route matches and deliveries, then jobs left with no delivery and
their attempts, fired triggers with no live instance left, and old purge records.
Audit (``keep_audit``): audit log rows older than that.

The audit log is append-only: on SQLite two triggers refuse any UPDATE or DELETE
(``store/database.py``). Pruning drops the DELETE trigger, deletes, and creates it
again, all in one transaction (SQLite DDL is transactional): no other connection
ever sees the log without its guard, and a crash rolls all three back together.
"""

from __future__ import annotations

from sqlalchemy import Engine, and_, delete, exists, or_, select

from dicomrouter.queue import states as S
from dicomrouter.store.database import APPEND_ONLY_DELETE_TRIGGER
from dicomrouter.store.schema import (
    attempts,
    audit_log,
    instances,
    job_instances,
    jobs,
    purge_runs,
    route_matches,
    triggers,
)

_CHUNK = 500


def prune_history(engine: Engine, cutoff: float) -> int:
    """Delete the history of objects purged before ``cutoff``. Returns rows deleted."""
    deleted = 0
    while True:
        with engine.begin() as conn:
            gone = list(
                conn.execute(
                    select(instances.c.id)
                    .where(instances.c.purged_at.is_not(None), instances.c.purged_at < cutoff)
                    .limit(_CHUNK)
                ).scalars()
            )
            if not gone:
                break
            deleted += conn.execute(
                delete(route_matches).where(route_matches.c.instance_id.in_(gone))
            ).rowcount
            deleted += conn.execute(
                delete(job_instances).where(job_instances.c.instance_id.in_(gone))
            ).rowcount
            deleted += conn.execute(delete(instances).where(instances.c.id.in_(gone))).rowcount
    while True:
        with engine.begin() as conn:
            empty_jobs = list(
                conn.execute(
                    select(jobs.c.id)
                    .where(
                        jobs.c.state.in_(S.FINAL_STATES),
                        jobs.c.finished_at < cutoff,
                        ~exists().where(job_instances.c.job_id == jobs.c.id),
                    )
                    .limit(_CHUNK)
                ).scalars()
            )
            if not empty_jobs:
                break
            deleted += conn.execute(
                delete(attempts).where(attempts.c.job_id.in_(empty_jobs))
            ).rowcount
            deleted += conn.execute(delete(jobs).where(jobs.c.id.in_(empty_jobs))).rowcount
    in_scope = or_(
        and_(triggers.c.level == "series", instances.c.series_instance_uid == triggers.c.uid),
        and_(triggers.c.level == "study", instances.c.study_instance_uid == triggers.c.uid),
    )
    with engine.begin() as conn:
        deleted += conn.execute(
            delete(triggers).where(
                triggers.c.pending == 0,
                triggers.c.fired_at < cutoff,
                ~exists().where(in_scope),
            )
        ).rowcount
        deleted += conn.execute(delete(purge_runs).where(purge_runs.c.started_at < cutoff)).rowcount
    return int(deleted)


def prune_audit(engine: Engine, cutoff: float) -> int:
    """Delete audit rows older than ``cutoff``, keeping the log append-only for every
    other writer (see the module docstring). Returns rows deleted."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.begin() as conn:
        if not conn.execute(select(audit_log.c.id).where(audit_log.c.at < cutoff).limit(1)).first():
            return 0
        if sqlite:
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_log_no_delete")
        deleted = conn.execute(delete(audit_log).where(audit_log.c.at < cutoff)).rowcount
        if sqlite:
            conn.exec_driver_sql(APPEND_ONLY_DELETE_TRIGGER)
    return int(deleted or 0)
