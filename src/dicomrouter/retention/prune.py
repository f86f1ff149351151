"""History and audit pruning: the rows retention deletes once their time is up.

History (``keep_history``, counted from the purge): the tombstone of a purged
instance, its route matches, deliveries, loop decisions and re-plan row, then its
jobs left with no delivery and their attempts, fired triggers of its series and
study with no instance left, and old purge records.
Audit (``keep_audit``): audit log rows older than that.

The audit log is append-only: on SQLite two triggers refuse any UPDATE or DELETE
(``store/database.py``). Pruning drops the DELETE trigger, deletes, and creates it
again, all in one transaction (SQLite DDL is transactional): no other connection
ever sees the log without its guard, and a crash rolls all three back together.
On PostgreSQL the trigger lets a DELETE through only in a transaction that set
``dicomrouter.prune_audit`` (``SET LOCAL``: it ends with the transaction). Where the
application role may not DELETE from the log at all (docs/deployment.md), pruning
is refused by the database: it is logged, and the rest of the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, delete, exists, select
from sqlalchemy.exc import DBAPIError

from dicomrouter.queue import states as S
from dicomrouter.store.database import APPEND_ONLY_DELETE_TRIGGER, AUDIT_PRUNE_SETTING
from dicomrouter.store.dialect import sqlstate
from dicomrouter.store.schema import (
    attempts,
    audit_log,
    instances,
    job_instances,
    jobs,
    loop_events,
    purge_runs,
    route_matches,
    triggers,
    unplanned,
)

_CHUNK = 500
#: PostgreSQL's insufficient_privilege: the role may not DELETE from the audit log.
_NOT_ALLOWED = "42501"

log = logging.getLogger("dicomrouter.retention")


def prune_history(engine: Engine, cutoff: float) -> int:
    """Delete the history of objects purged before ``cutoff``. Returns rows deleted.

    Driven by the tombstones it deletes (bounded work per run, whatever the size of
    the index): their jobs, once left empty and finished, and the fired triggers of
    their series and studies, once nothing live is left in them."""
    deleted = 0
    while True:
        with engine.begin() as conn:
            gone = conn.execute(
                select(
                    instances.c.id,
                    instances.c.series_instance_uid,
                    instances.c.study_instance_uid,
                )
                .where(instances.c.purged_at.is_not(None), instances.c.purged_at < cutoff)
                .limit(_CHUNK)
                # PostgreSQL: the receiver may make a tombstone live again (the same
                # SOP Instance UID received again) between this read and the DELETE
                # below; the row lock makes it wait for this transaction instead.
                # (SQLite's write lock already keeps the receiver out; no-op there.)
                .with_for_update()
            ).all()
            if not gone:
                break
            ids = [row.id for row in gone]
            held_by = list(
                conn.execute(
                    select(job_instances.c.job_id)
                    .where(job_instances.c.instance_id.in_(ids))
                    .distinct()
                ).scalars()
            )
            deleted += conn.execute(
                delete(route_matches).where(route_matches.c.instance_id.in_(ids))
            ).rowcount
            deleted += conn.execute(
                delete(job_instances).where(job_instances.c.instance_id.in_(ids))
            ).rowcount
            # Loop decisions and a pending re-plan of a purged instance go with it
            # (``unplanned`` refers to the row by foreign key).
            deleted += conn.execute(
                delete(loop_events).where(loop_events.c.instance_id.in_(ids))
            ).rowcount
            deleted += conn.execute(
                delete(unplanned).where(unplanned.c.instance_id.in_(ids))
            ).rowcount
            deleted += conn.execute(delete(instances).where(instances.c.id.in_(ids))).rowcount
            deleted += _empty_jobs(conn, held_by)
            deleted += _idle_triggers(conn, gone)
    with engine.begin() as conn:
        deleted += conn.execute(delete(purge_runs).where(purge_runs.c.started_at < cutoff)).rowcount
    return int(deleted)


def _empty_jobs(conn: Connection, job_ids: list[int]) -> int:
    """Delete the finished jobs among ``job_ids`` that no longer hold any instance."""
    if not job_ids:
        return 0
    empty = list(
        conn.execute(
            select(jobs.c.id).where(
                jobs.c.id.in_(job_ids),
                jobs.c.state.in_(S.FINAL_STATES),
                ~exists().where(job_instances.c.job_id == jobs.c.id),
            )
        ).scalars()
    )
    if not empty:
        return 0
    count = conn.execute(delete(attempts).where(attempts.c.job_id.in_(empty))).rowcount
    return int(count) + int(conn.execute(delete(jobs).where(jobs.c.id.in_(empty))).rowcount)


def _idle_triggers(conn: Connection, gone: Sequence[Any]) -> int:
    """Delete fired triggers of these series and studies with nothing left in them."""
    scopes = [("series", row.series_instance_uid) for row in gone]
    scopes += [("study", row.study_instance_uid) for row in gone]
    count = 0
    for level, uid in sorted(set(scopes)):
        column = (
            instances.c.series_instance_uid if level == "series" else instances.c.study_instance_uid
        )
        count += conn.execute(
            delete(triggers).where(
                triggers.c.level == level,
                triggers.c.uid == uid,
                triggers.c.pending == 0,
                ~exists().where(column == uid),
            )
        ).rowcount
    return count


def prune_audit(engine: Engine, cutoff: float) -> int:
    """Delete audit rows older than ``cutoff``, keeping the log append-only for every
    other writer (see the module docstring). Returns rows deleted."""
    sqlite = engine.dialect.name == "sqlite"
    try:
        with engine.begin() as conn:
            old = select(audit_log.c.id).where(audit_log.c.at < cutoff).limit(1)
            if not conn.execute(old).first():
                return 0
            if sqlite:
                conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_log_no_delete")
            else:
                conn.exec_driver_sql(f"SET LOCAL {AUDIT_PRUNE_SETTING} = 'on'")
            deleted = conn.execute(delete(audit_log).where(audit_log.c.at < cutoff)).rowcount
            if sqlite:
                conn.exec_driver_sql(APPEND_ONLY_DELETE_TRIGGER)
    except DBAPIError as exc:
        if sqlstate(exc) != _NOT_ALLOWED:
            raise
        log.warning(
            "audit log entries older than retention.keep_audit were kept: this role may "
            "not delete them (%s); prune them as the table's owner",
            str(exc.orig).strip(),
        )
        return 0
    return int(deleted or 0)
