"""Jobs for operators: search with filters, one job in detail, and manual actions.

The queue itself (claiming, leases, settling) lives in :mod:`dicomrouter.queue`;
this module only reads it and calls :class:`~dicomrouter.queue.JobStore` for retry
and cancel, so a manual action follows exactly the rules a worker does (a job a
worker still holds is never retried under its feet). Every action is written to the
audit log with who asked and from where.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, Engine, case, func, literal, select, update

from dicomrouter.config import BaseDestinationConfig, GroupDestinationConfig
from dicomrouter.destinations import describe_status
from dicomrouter.observe.logs import find_control
from dicomrouter.queue import JobStore
from dicomrouter.queue import states as S
from dicomrouter.queue.views import job_detail as _queue_job_detail
from dicomrouter.store import audit
from dicomrouter.store.schema import instances, job_instances, jobs

from .errors import Conflict, Invalid, NotFound

Action = Literal["retry", "cancel"]

#: States ``JobStore.retry`` accepts (when no worker holds the job).
RETRYABLE = (S.FAILED, S.CANCELED, S.PENDING, S.SCHEDULED, S.WARNING)
#: States ``JobStore.cancel`` accepts.
CANCELABLE = S.OPEN_STATES
_CHUNK = 500


@dataclass
class JobFilter:
    """Which jobs: every field set narrows the selection (AND); unset fields match all.

    ``state`` is one state or a list of states; ``since``/``until`` bound
    ``jobs.created_at`` (POSIX seconds, ``until`` exclusive). Patient ID and accession
    number are looked up on the instances of the job's study.
    """

    state: str | Sequence[str] | None = None
    destination: str | None = None
    route: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    since: float | None = None
    until: float | None = None
    ids: Sequence[int] | None = None  # exactly these jobs (the dashboard's selection)

    def states(self) -> list[str]:
        if self.state is None:
            return []
        values = [self.state] if isinstance(self.state, str) else list(self.state)
        # "failed,canceled" is accepted too: it is what people type in a query string.
        return [part.strip() for v in values for part in v.split(",") if part.strip()]

    def is_empty(self) -> bool:
        return not (
            self.ids is not None
            or self.states()
            or self.destination
            or self.route
            or self.study_uid
            or self.patient_id
            or self.accession_number
            or self.since is not None
            or self.until is not None
        )

    def validate(self) -> None:
        """Raise :class:`Invalid` for a filter that can only be a mistake."""
        texts = {
            "state": ",".join(self.states()),
            "destination": self.destination,
            "route": self.route,
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "accession_number": self.accession_number,
        }
        for key, value in texts.items():
            found = find_control(value or "")
            if found is not None:
                raise Invalid(f"{key}: control character {found!r} not allowed in a filter")
        unknown = [s for s in self.states() if s not in S.JOB_STATES]
        if unknown:
            raise Invalid(
                f"unknown job state {', '.join(map(repr, unknown))}: "
                f"one of {', '.join(S.JOB_STATES)}"
            )
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise Invalid("'since' must be before 'until'")

    def conditions(self) -> list[ColumnElement[bool]]:
        self.validate()
        where: list[ColumnElement[bool]] = []
        if self.ids is not None:
            where.append(jobs.c.id.in_(list(self.ids)))
        if self.states():
            where.append(jobs.c.state.in_(self.states()))
        if self.destination:
            where.append(jobs.c.destination == self.destination)
        if self.route:
            # routes is a comma-separated list: match a whole name, not a substring.
            padded = literal(",") + jobs.c.routes + literal(",")
            where.append(padded.contains(f",{self.route},", autoescape=True))
        if self.study_uid:
            where.append(jobs.c.study_instance_uid == self.study_uid)
        study_facts = []
        if self.patient_id:
            study_facts.append(instances.c.patient_id == self.patient_id)
        if self.accession_number:
            study_facts.append(instances.c.accession_number == self.accession_number)
        if study_facts:
            where.append(
                jobs.c.study_instance_uid.in_(
                    select(instances.c.study_instance_uid).where(*study_facts).distinct()
                )
            )
        if self.since is not None:
            where.append(jobs.c.created_at >= self.since)
        if self.until is not None:
            where.append(jobs.c.created_at < self.until)
        return where


def _chunks(values: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _counts(conn: Any, job_ids: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """Per job: (instances, delivered, failed)."""
    delivered = func.sum(
        case((job_instances.c.state.in_((S.ITEM_COMPLETED, S.ITEM_WARNING)), 1), else_=0)
    )
    failed = func.sum(case((job_instances.c.state == S.ITEM_FAILED, 1), else_=0))
    counts: dict[int, tuple[int, int, int]] = {}
    for chunk in _chunks(job_ids):
        for row in conn.execute(
            select(job_instances.c.job_id, func.count(), delivered, failed)
            .where(job_instances.c.job_id.in_(chunk))
            .group_by(job_instances.c.job_id)
        ):
            counts[row[0]] = (int(row[1]), int(row[2] or 0), int(row[3] or 0))
    return counts


def _patients(conn: Any, study_uids: Iterable[str]) -> dict[str, tuple[str, str, str]]:
    """Per study: (patient ID, patient name, accession number) from its instances."""
    uids = sorted({u for u in study_uids if u})
    found: dict[str, tuple[str, str, str]] = {}
    for start in range(0, len(uids), _CHUNK):
        for row in conn.execute(
            select(
                instances.c.study_instance_uid,
                func.max(instances.c.patient_id),
                func.max(instances.c.patient_name),
                func.max(instances.c.accession_number),
            )
            .where(instances.c.study_instance_uid.in_(uids[start : start + _CHUNK]))
            .group_by(instances.c.study_instance_uid)
        ):
            found[row[0]] = (row[1] or "", row[2] or "", row[3] or "")
    return found


_JOB_COLUMNS = (
    jobs.c.id,
    jobs.c.destination,
    jobs.c.level,
    jobs.c.resource_uid,
    jobs.c.study_instance_uid,
    jobs.c.routes,
    jobs.c.transform,
    jobs.c.via_group,
    jobs.c.state,
    jobs.c.priority,
    jobs.c.attempts,
    jobs.c.connection_failures,
    jobs.c.created_at,
    jobs.c.updated_at,
    jobs.c.finished_at,
    jobs.c.next_attempt_at,
    jobs.c.last_error,
)


def _job_dicts(conn: Any, rows: Sequence[Any], now: float) -> list[dict[str, Any]]:
    counts = _counts(conn, [row.id for row in rows])
    patients = _patients(conn, (row.study_instance_uid for row in rows))
    result = []
    for row in rows:
        job = {column.name: getattr(row, column.name) for column in _JOB_COLUMNS}
        job["routes"] = [r for r in (row.routes or "").split(",") if r]
        job["total"], job["delivered"], job["failed"] = counts.get(row.id, (0, 0, 0))
        patient = patients.get(row.study_instance_uid, ("", "", ""))
        job["patient_id"], job["patient_name"], job["accession_number"] = patient
        job["age_s"] = max(0.0, now - row.created_at)
        result.append(job)
    return result


def search_jobs(
    engine: Engine, f: JobFilter | None = None, limit: int = 50, offset: int = 0
) -> tuple[int, list[dict[str, Any]]]:
    """Jobs matching ``f``, newest first: (total matching, one page of job dicts).

    A job dict has the job's columns (``routes`` as a list; ``attempts`` counts
    delivery attempts, which use up ``retry.max_attempts``, ``connection_failures``
    the times the destination could not be reached, which do not; ``via_group`` the
    group that chose the destination, or None), the instance counts
    ``total``/``delivered``/``failed``, the study's ``patient_id``, ``patient_name``
    and ``accession_number``, and ``age_s`` (seconds since it was created).
    """
    where = (f or JobFilter()).conditions()
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(jobs).where(*where)).scalar_one()
        rows = conn.execute(
            select(*_JOB_COLUMNS)
            .where(*where)
            .order_by(jobs.c.id.desc())
            .limit(max(0, limit))
            .offset(max(0, offset))
        ).all()
        return int(total), _job_dicts(conn, rows, time.time())


def job_detail(engine: Engine, job_id: int) -> dict[str, Any] | None:
    """One job as in :func:`search_jobs`, plus ``instances`` (each instance's delivery
    state, DIMSE ``status`` with ``status_text``, and message) and ``attempts`` (every
    attempt: started_at, ended_at, outcome, sent, failed, message; ``unavailable``
    is a connection failure), oldest first. The job's delivery attempt counter is
    ``attempt_count`` here (``connection_failures`` as in the list)."""
    detail = _queue_job_detail(engine, job_id)
    if detail is None:
        return None
    with engine.connect() as conn:
        row = conn.execute(select(*_JOB_COLUMNS).where(jobs.c.id == job_id)).one()
        (job,) = _job_dicts(conn, [row], time.time())
    for item in detail["instances"]:
        status = item["status"]
        item["status_text"] = describe_status(status) if status is not None else None
    job["instances"] = detail["instances"]
    # In the detail, "attempts" is the list of attempts; the counter moves aside.
    job["attempt_count"] = job["attempts"]
    job["attempts"] = [
        {key: a[key] for key in ("id", "started_at", "ended_at", "outcome", "sent", "failed")}
        | {"message": a["message"]}
        for a in detail["attempts"]
    ]
    return job


def _require_job(engine: Engine, job_id: int) -> Any:
    with engine.connect() as conn:
        row = conn.execute(
            select(jobs.c.id, jobs.c.state, jobs.c.lease_owner).where(jobs.c.id == job_id)
        ).first()
    if row is None:
        raise NotFound(f"no job {job_id}")
    return row


def _audit_jobs(
    engine: Engine, actor: str, source: str, action: str, ids: Sequence[int], changed: int
) -> None:
    target = f"job {ids[0]}" if len(ids) == 1 else f"{len(ids)} jobs"
    audit.record(
        engine,
        actor,
        f"job.{action}",
        target,
        outcome="ok" if changed else "failed",
        source=source,
        detail={"ids": list(ids[:100]), "requested": len(ids), "changed": changed},
    )


def _apply(engine: Engine, action: Action, ids: Sequence[int]) -> int:
    store = JobStore(engine)
    changed = 0
    for chunk in _chunks(list(ids)):
        changed += store.retry(chunk) if action == "retry" else store.cancel(chunk)
    return changed


def retry(
    engine: Engine, ids: Sequence[int], *, actor: str = audit.SYSTEM, source: str = ""
) -> int:
    """Send again what did not arrive (failed or canceled instances). Returns how
    many jobs changed. A single job that cannot be retried raises :class:`NotFound`
    or :class:`Conflict` with the reason."""
    return _act_on_ids(engine, "retry", ids, actor, source)


def cancel(
    engine: Engine, ids: Sequence[int], *, actor: str = audit.SYSTEM, source: str = ""
) -> int:
    """Stop open jobs: their unsent instances are canceled (a worker stops between
    instances). Returns how many jobs changed; errors as for :func:`retry`."""
    return _act_on_ids(engine, "cancel", ids, actor, source)


def _refusal(row: Any, action: Action) -> str | None:
    """Why ``action`` cannot apply to the job in ``row`` now, or None if it can."""
    allowed = RETRYABLE if action == "retry" else CANCELABLE
    if row.state not in allowed:
        return f"job {row.id} is {row.state}: nothing to {action}"
    if action == "retry" and row.lease_owner is not None:
        return f"job {row.id} is still held by a worker; retry it once the worker lets go"
    return None


def refusals(engine: Engine, action: Action, ids: Sequence[int]) -> dict[int, str]:
    """Per job id that ``action`` would not change now, why (no such job, already
    completed, held by a worker), in the words a single job's error uses."""
    ids = list(dict.fromkeys(ids))
    found: dict[int, Any] = {}
    with engine.connect() as conn:
        for chunk in _chunks(ids):
            for row in conn.execute(
                select(jobs.c.id, jobs.c.state, jobs.c.lease_owner).where(jobs.c.id.in_(chunk))
            ):
                found[row.id] = row
    reasons: dict[int, str] = {}
    for job_id in ids:
        job = found.get(job_id)
        reason = f"no job {job_id}" if job is None else _refusal(job, action)
        if reason is not None:
            reasons[job_id] = reason
    return reasons


def _act_on_ids(engine: Engine, action: Action, ids: Sequence[int], actor: str, source: str) -> int:
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise Invalid("no job ids given")
    if len(ids) == 1:
        reason = _refusal(_require_job(engine, ids[0]), action)
        if reason is not None:
            raise Conflict(reason)
    changed = _apply(engine, action, ids)
    _audit_jobs(engine, actor, source, action, ids, changed)
    if len(ids) == 1 and not changed:
        raise Conflict(f"job {ids[0]} changed meanwhile: nothing to {action}")
    return changed


def matching_ids(engine: Engine, f: JobFilter, states: Sequence[str] | None = None) -> list[int]:
    """The ids of the jobs matching ``f`` (and in one of ``states``), oldest first."""
    where = f.conditions()
    if states is not None:
        where.append(jobs.c.state.in_(states))
    with engine.connect() as conn:
        return [row.id for row in conn.execute(select(jobs.c.id).where(*where).order_by(jobs.c.id))]


def bulk_action(
    engine: Engine,
    f: JobFilter,
    action: Action,
    *,
    actor: str = audit.SYSTEM,
    source: str = "",
    allow_all: bool = False,
) -> int:
    """Retry or cancel every job matching ``f``; returns how many changed.

    An empty filter selects the whole queue, which is nearly always a mistake, so it
    is refused (:class:`Invalid`) unless ``allow_all`` is set.
    """
    if action not in ("retry", "cancel"):
        raise Invalid(f"unknown action {action!r}: retry or cancel")
    if f.is_empty() and not allow_all:
        raise Invalid("refusing to act on every job: give a filter, or set all")
    ids = matching_ids(engine, f, RETRYABLE if action == "retry" else CANCELABLE)
    changed = _apply(engine, action, ids) if ids else 0
    audit.record(
        engine,
        actor,
        f"job.bulk_{action}",
        f"{changed} jobs",
        source=source,
        detail={"filter": _filter_detail(f), "matched": len(ids), "changed": changed},
    )
    return changed


def _filter_detail(f: JobFilter) -> dict[str, Any]:
    values = {
        "ids": list(f.ids[:100]) if f.ids is not None else None,
        "state": f.states() or None,
        "destination": f.destination,
        "route": f.route,
        "study_uid": f.study_uid,
        "patient_id": f.patient_id,
        "accession_number": f.accession_number,
        "since": f.since,
        "until": f.until,
    }
    return {key: value for key, value in values.items() if value is not None}


def set_priority(
    engine: Engine, job_id: int, priority: int, *, actor: str = audit.SYSTEM, source: str = ""
) -> dict[str, Any]:
    """Change a job's priority (higher is claimed first). Only open jobs: a finished
    job has nothing left to order. Returns {id, priority, previous}."""
    now = time.time()
    with engine.begin() as conn:
        row = conn.execute(select(jobs.c.state, jobs.c.priority).where(jobs.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"no job {job_id}")
        if row.state not in S.OPEN_STATES:
            raise Conflict(f"job {job_id} is {row.state}: its priority no longer matters")
        conn.execute(
            update(jobs).where(jobs.c.id == job_id).values(priority=priority, updated_at=now)
        )
    audit.record(
        engine,
        actor,
        "job.priority",
        f"job {job_id}",
        source=source,
        detail={"priority": priority, "previous": row.priority},
    )
    return {"id": job_id, "priority": priority, "previous": row.priority}


# -- jobs whose destination is no longer configured ----------------------------------


@dataclass(frozen=True)
class OrphanedQueue:
    """Open jobs of a destination that the configuration no longer has: nothing
    sends them until they are moved to another destination or canceled."""

    destination: str
    jobs: dict[str, int]  # open state -> count
    total: int
    oldest_created_at: float | None


def orphaned_queues(engine: Engine, configured: Iterable[str]) -> list[OrphanedQueue]:
    """Open jobs per destination missing from ``configured`` (destination names)."""
    known = set(configured)
    found: dict[str, dict[str, int]] = {}
    oldest: dict[str, float] = {}
    with engine.connect() as conn:
        for name, state, count, first in conn.execute(
            select(jobs.c.destination, jobs.c.state, func.count(), func.min(jobs.c.created_at))
            .where(jobs.c.state.in_(S.OPEN_STATES))
            .group_by(jobs.c.destination, jobs.c.state)
        ):
            if name in known:
                continue
            found.setdefault(name, dict.fromkeys(S.OPEN_STATES, 0))[state] = int(count)
            oldest[name] = min(first, oldest.get(name, first))
    return [
        OrphanedQueue(name, counts, sum(counts.values()), oldest.get(name))
        for name, counts in sorted(found.items())
    ]


@dataclass(frozen=True)
class MoveResult:
    source: str
    target: str
    moved: int  # jobs handed over (each canceled with a note naming the target)
    left: int  # open jobs not moved: a worker still holds them
    target_jobs: list[int]  # the target's jobs that received their instances


def move_jobs(
    engine: Engine,
    destinations: Mapping[str, BaseDestinationConfig],
    source_destination: str,
    target: str,
    *,
    actor: str = audit.SYSTEM,
    source: str = "",
) -> MoveResult:
    """Send the waiting jobs of ``source_destination`` (typically one removed from the
    configuration) to ``target`` instead; ``destinations`` is the configuration's.
    Instances the target already has are not sent twice. Audited as ``job.move``."""
    if target not in destinations:
        known = ", ".join(sorted(destinations)) or "none configured"
        raise Invalid(f"destination {target!r} is not configured (known: {known})")
    if source_destination == target:
        raise Invalid(f"jobs of {target!r} are already for {target!r}")
    group = destinations[target]
    if isinstance(group, GroupDestinationConfig):
        raise Invalid(
            f"{target!r} is a group: move the jobs to one of its members "
            f"({', '.join(group.members)})"
        )
    with engine.connect() as conn:
        ids = list(
            conn.execute(
                select(jobs.c.id)
                .where(
                    jobs.c.destination == source_destination,
                    jobs.c.state.in_(S.OPEN_STATES),
                )
                .order_by(jobs.c.id)
            ).scalars()
        )
    if not ids:
        raise NotFound(f"no open jobs for destination {source_destination!r}")
    moved, touched = JobStore(engine).move(ids, target, destinations[target])
    result = MoveResult(source_destination, target, len(moved), len(ids) - len(moved), touched)
    audit.record(
        engine,
        actor,
        "job.move",
        f"{source_destination} -> {target}",
        outcome="ok" if moved else "failed",
        source=source,
        detail={
            "from": source_destination,
            "to": target,
            "moved": len(moved),
            "left": result.left,
            "ids": moved[:100],
            "target_jobs": touched[:100],
        },
    )
    return result
