"""The durable job queue: one job per (resource, destination), delivery state per instance.

Workers claim jobs under a lease (owner + expiry). A worker that dies simply stops
renewing; its jobs go back to ``pending`` when the lease expires, or at once when
the same node restarts. Every state change is one short transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, and_, bindparam, case, func, select, update

from dicomrouter.config import BaseDestinationConfig
from dicomrouter.store.schema import attempts, instances, job_instances, jobs

from . import states as S

log = logging.getLogger(__name__)

#: Interrupted deliveries in a row (the dispatch process died mid-send) before a job
#: fails instead of being claimed again: see JobStore.recover.
MAX_INTERRUPTIONS = 3
_INTERRUPTED = "delivery interrupted: the dispatch process stopped while sending"
#: How long a job held by transforms that cannot run waits before it is tried again.
HOLD_DELAY = 60.0


@dataclass(frozen=True)
class QueuedInstance:
    job_id: int
    instance_id: int
    path: str  # relative to the object store
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    received_at: float = 0.0  # for the delivery latency metric
    transform: str = ""  # the job's route pipeline ("" for none)
    calling_ae: str = ""  # how it arrived: what transforms' templates and rules read
    called_ae: str = ""
    source_address: str = ""


@dataclass
class Claim:
    """Jobs one worker holds, and the instances still to send for them."""

    destination: str
    owner: str
    job_ids: list[int]
    items: list[QueuedInstance] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)


@dataclass
class Delivery:
    """What the planner decided to send to one destination for one resource."""

    destination: str
    config: BaseDestinationConfig
    level: str  # instance | series | study | patient
    resource_uid: str
    study_uid: str
    routes: set[str] = field(default_factory=set)
    members: dict[int, int] = field(default_factory=dict)  # instance id -> generation
    transform: str = ""
    """The routes' pipeline (``routes[].transform``); "" for none."""
    priority: int = 0
    """The highest of its routes' priorities (:data:`PRIORITY`)."""
    via_group: str | None = None
    """The group (``type: group``) that chose this destination; None: named directly."""


#: ``routes[].priority`` as the job's priority: claimed highest first.
PRIORITY = {"urgent": 10, "normal": 0, "low": -10}


def _chunks(values: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _waiting_key(plan: Delivery) -> tuple[str, str, str, str | None]:
    """The waiting job a planned delivery joins: same resource, pipeline and group."""
    return (plan.level, plan.resource_uid, plan.transform, plan.via_group)


@dataclass(frozen=True)
class ItemResult:
    job_id: int
    instance_id: int
    state: str  # ITEM_COMPLETED | ITEM_WARNING | ITEM_FAILED | ITEM_SKIPPED | ITEM_PENDING
    status: int | None
    message: str
    sent_as: str | None = None
    """How it went out (pipelines and versions, transfer syntax); None: as received."""
    sent_uid: str | None = None
    """The SOP Instance UID sent, when a transform changed it."""


def initial_state(dest: BaseDestinationConfig, now: float) -> tuple[str, float]:
    """``scheduled`` until the send window opens, else ``pending`` now."""
    if dest.send_window is None:
        return S.PENDING, now
    moment = datetime.fromtimestamp(now)
    if dest.send_window.contains(moment):
        return S.PENDING, now
    return S.SCHEDULED, dest.send_window.next_open(moment).timestamp()


class JobStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    # -- creation ---------------------------------------------------------------
    def enqueue_many(self, conn: Connection, plans: Sequence[Delivery], now: float) -> list[int]:
        """Queue each planned delivery, in bulk (one short write transaction per batch).

        Instances already queued or delivered to a destination (same generation) are
        skipped: two routes, or a follow-up, never send an instance twice. New
        instances join a waiting job for the same (destination, resource), or start a
        follow-up job. Returns the ids of the jobs that received instances.
        """
        touched: list[int] = []
        by_dest: dict[str, list[Delivery]] = {}
        for plan in plans:
            by_dest.setdefault(plan.destination, []).append(plan)
        for dest_name, dest_plans in by_dest.items():
            touched += self._enqueue_for(conn, dest_name, dest_plans, now)
        return touched

    def _enqueue_for(
        self, conn: Connection, dest_name: str, plans: list[Delivery], now: float
    ) -> list[int]:
        ids = sorted({i for plan in plans for i in plan.members})
        already: set[tuple[int, int, str]] = set()
        for chunk in _chunks(ids):
            already.update(
                (row.instance_id, row.generation, row.transform)
                for row in conn.execute(
                    select(
                        job_instances.c.instance_id,
                        job_instances.c.generation,
                        job_instances.c.transform,
                    ).where(
                        job_instances.c.destination == dest_name,
                        job_instances.c.instance_id.in_(chunk),
                    )
                )
            )
        fresh_plans: list[tuple[Delivery, list[tuple[int, int]]]] = []
        for plan in plans:
            fresh = [
                (i, g) for i, g in plan.members.items() if (i, g, plan.transform) not in already
            ]
            # Routes at different levels may name the same instance in one batch: the
            # first plan takes it, so it is queued once per destination (and pipeline).
            already.update((i, g, plan.transform) for i, g in fresh)
            if fresh:
                fresh_plans.append((plan, fresh))
        # A job planned through a group is joined only by work of that group (its
        # waiting work may move to another member), a direct one only by direct work.
        waiting: dict[tuple[str, str, str, str | None], Row] = {}
        for chunk in _chunks(sorted({plan.resource_uid for plan in plans})):
            for row in conn.execute(
                select(
                    jobs.c.id,
                    jobs.c.level,
                    jobs.c.resource_uid,
                    jobs.c.routes,
                    jobs.c.transform,
                    jobs.c.priority,
                    jobs.c.via_group,
                ).where(
                    jobs.c.destination == dest_name,
                    jobs.c.resource_uid.in_(chunk),
                    jobs.c.state.in_(S.WAITING_STATES),
                )
            ):
                waiting[(row.level, row.resource_uid, row.transform, row.via_group)] = row
        self._raise_priorities(conn, plans, waiting)
        if not fresh_plans:
            return []
        dest = fresh_plans[0][0].config
        state, next_at = initial_state(dest, now)
        new_plans = [(p, f) for p, f in fresh_plans if _waiting_key(p) not in waiting]
        touched: list[int] = []
        if new_plans:
            rows = [
                {
                    "destination": dest_name,
                    "level": plan.level,
                    "resource_uid": plan.resource_uid,
                    "study_instance_uid": plan.study_uid,
                    "routes": ",".join(sorted(plan.routes)),
                    "transform": plan.transform,
                    "state": state,
                    "priority": plan.priority,
                    "via_group": plan.via_group,
                    "attempts": 0,
                    "next_attempt_at": next_at,
                    "created_at": now,
                    "updated_at": now,
                }
                for plan, _ in new_plans
            ]
            inserted = conn.execute(
                jobs.insert().returning(jobs.c.id, sort_by_parameter_order=True), rows
            ).scalars()
            new_ids = iter(inserted.all())
        items: list[dict[str, object]] = []
        for plan, fresh in fresh_plans:
            existing = waiting.get(_waiting_key(plan))
            if existing is None:
                job_id = next(new_ids)
            else:
                job_id = int(existing.id)
                merged = sorted(set(filter(None, existing.routes.split(","))) | plan.routes)
                # New instances joined the job: its clock restarts (give_up_after
                # counts how long a job waited untouched, not how old it is).
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(routes=",".join(merged), updated_at=now)
                )
                fresh = self._refresh_members(conn, job_id, fresh, now)
            if job_id not in touched:
                touched.append(job_id)
            items += [
                {
                    "job_id": job_id,
                    "instance_id": instance_id,
                    "destination": dest_name,
                    "generation": generation,
                    "transform": plan.transform,
                    "state": S.ITEM_PENDING,
                    "updated_at": now,
                }
                for instance_id, generation in fresh
            ]
        if items:
            conn.execute(job_instances.insert(), items)
        return touched

    @staticmethod
    def _raise_priorities(
        conn: Connection,
        plans: list[Delivery],
        waiting: dict[tuple[str, str, str, str | None], Row],
    ) -> None:
        """A more urgent route that names what a waiting job already holds makes
        that job as urgent (even when it adds no instance to it)."""
        for plan in plans:
            row = waiting.get(_waiting_key(plan))
            if row is not None and plan.priority > int(row.priority):
                conn.execute(update(jobs).where(jobs.c.id == row.id).values(priority=plan.priority))

    @staticmethod
    def _refresh_members(
        conn: Connection, job_id: int, fresh: list[tuple[int, int]], now: float
    ) -> list[tuple[int, int]]:
        """An instance received again while its older copy still waits in this job:
        the job sends the newer copy once, instead of both. Returns the rest."""
        in_job = {
            row.instance_id
            for row in conn.execute(
                select(job_instances.c.instance_id).where(
                    job_instances.c.job_id == job_id,
                    job_instances.c.instance_id.in_([i for i, _ in fresh]),
                )
            )
        }
        for instance_id, generation in fresh:
            if instance_id in in_job:
                conn.execute(
                    update(job_instances)
                    .where(
                        job_instances.c.job_id == job_id,
                        job_instances.c.instance_id == instance_id,
                    )
                    .values(generation=generation, state=S.ITEM_PENDING, updated_at=now)
                )
        return [(i, g) for i, g in fresh if i not in in_job]

    # -- claiming -----------------------------------------------------------------
    def claim(
        self,
        dest_name: str,
        owner: str,
        lease: float,
        max_jobs: int = 200,
        max_items: int = 5000,
        now: float | None = None,
    ) -> Claim | None:
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            candidates = [
                row.id
                for row in conn.execute(
                    select(jobs.c.id)
                    .where(
                        jobs.c.destination == dest_name,
                        jobs.c.state.in_(S.WAITING_STATES),
                        jobs.c.next_attempt_at <= now,
                    )
                    .order_by(jobs.c.priority.desc(), jobs.c.id)
                    .limit(max_jobs)
                    # PostgreSQL: jobs another transaction is claiming are passed
                    # over, not waited for (SQLite: no-op, its write lock serialises).
                    .with_for_update(skip_locked=True)
                )
            ]
            if not candidates:
                return None
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(candidates), jobs.c.state.in_(S.WAITING_STATES))
                .values(
                    state=S.IN_PROGRESS,
                    lease_owner=owner,
                    lease_expires_at=now + lease,
                    updated_at=now,
                )
            )
            claimed = [
                row.id
                for row in conn.execute(
                    select(jobs.c.id).where(jobs.c.id.in_(candidates), jobs.c.lease_owner == owner)
                )
            ]
            claim = Claim(dest_name, owner, claimed, started_at=now)
            rows = conn.execute(
                select(
                    job_instances.c.job_id,
                    instances.c.id,
                    instances.c.path,
                    instances.c.sop_class_uid,
                    instances.c.sop_instance_uid,
                    instances.c.transfer_syntax_uid,
                    instances.c.received_at,
                    job_instances.c.transform,
                    instances.c.calling_ae,
                    instances.c.called_ae,
                    instances.c.source_address,
                    instances.c.purged_at,
                )
                .join(instances, instances.c.id == job_instances.c.instance_id)
                .join(jobs, jobs.c.id == job_instances.c.job_id)
                .where(
                    job_instances.c.job_id.in_(claimed),
                    job_instances.c.state == S.ITEM_PENDING,
                )
                # The candidates' order: the item limit cuts the least urgent jobs.
                .order_by(jobs.c.priority.desc(), job_instances.c.job_id, instances.c.id)
                .limit(max_items)
            ).all()
            claim.items = [QueuedInstance(*row[:-1]) for row in rows if row.purged_at is None]
            purged = [row for row in rows if row.purged_at is not None]
            if purged:
                self._fail_purged(conn, purged, now)
            # Keep only the jobs this claim will work on: those with instances loaded
            # (the item limit may cut the list) and those with nothing left to send
            # (settled by finish). The rest go straight back, untouched.
            loaded = {item.job_id for item in claim.items}
            with_pending = {
                row.job_id
                for row in conn.execute(
                    select(job_instances.c.job_id)
                    .where(
                        job_instances.c.job_id.in_(claimed),
                        job_instances.c.state == S.ITEM_PENDING,
                    )
                    .distinct()
                )
            }
            unloaded = [j for j in claimed if j in with_pending and j not in loaded]
            if unloaded:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(unloaded))
                    .values(state=S.PENDING, lease_owner=None, lease_expires_at=None)
                )
            claim.job_ids = [j for j in claimed if j not in unloaded]
        return claim

    def renew(self, claim: Claim, lease: float) -> set[int]:
        """Extend the lease. Returns the jobs this worker must stop sending: canceled
        meanwhile, or no longer ours (the lease expired and was recovered)."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(claim.job_ids), jobs.c.lease_owner == claim.owner)
                .values(lease_expires_at=now + lease)
            )
            still_ours = {
                row.id
                for row in conn.execute(
                    select(jobs.c.id).where(
                        jobs.c.id.in_(claim.job_ids),
                        jobs.c.lease_owner == claim.owner,
                        jobs.c.state != S.CANCELED,
                    )
                )
            }
        return set(claim.job_ids) - still_ours

    def record_results(self, results: Sequence[ItemResult]) -> None:
        """Persist per-instance outcomes. A transient result keeps the instance
        pending (with the reason); a canceled instance is never overwritten."""
        if not results:
            return
        now = time.time()
        statement = (
            update(job_instances)
            .where(
                job_instances.c.job_id == bindparam("b_job"),
                job_instances.c.instance_id == bindparam("b_instance"),
                job_instances.c.state == S.ITEM_PENDING,
            )
            .values(
                state=bindparam("b_state"),
                status=bindparam("b_status"),
                message=bindparam("b_message"),
                sent_as=bindparam("b_sent_as"),
                sent_uid=bindparam("b_sent_uid"),
                updated_at=now,
            )
        )
        rows = [
            {
                "b_job": r.job_id,
                "b_instance": r.instance_id,
                "b_state": r.state,
                "b_status": r.status,
                "b_message": r.message[:1000],
                "b_sent_as": r.sent_as[:1000] if r.sent_as else None,
                "b_sent_uid": r.sent_uid,
            }
            for r in results
        ]
        with self.engine.begin() as conn:
            conn.execute(statement, rows)

    def finish(
        self,
        claim: Claim,
        dest: BaseDestinationConfig,
        count_attempt: bool,
        unavailable_delay: float,
        message: str,
        outcome: str,
        sent: int,
        failed: int,
        job_messages: dict[int, str] | None = None,
        transient_jobs: set[int] | None = None,
        job_counts: dict[int, tuple[int, int]] | None = None,
    ) -> None:
        """Settle each claimed job from its instances' states.

        ``message`` applies to every job of the claim (e.g. the destination was
        unreachable); ``job_messages`` holds per-job errors and takes precedence.
        ``transient_jobs`` are the jobs that met a transient failure: only they use
        up an attempt and back off. A job with instances left for another reason
        (the batch was cut short, stopped, or its job was canceled alongside)
        continues at once. ``job_counts`` gives each job's (sent, failed) for its
        attempt record; ``sent``/``failed`` apply to jobs without an entry.

        ``count_attempt`` is False when the destination could not be reached at all:
        an unreachable destination is paused and probed, and its jobs wait without
        using up ``retry.max_attempts`` (a peer may be down for a week); such a try
        counts as a connection failure (``jobs.connection_failures``) instead.
        """
        now = time.time()
        with self.engine.begin() as conn:
            counts = {
                (row.job_id, row.state): row.n
                for row in conn.execute(
                    select(job_instances.c.job_id, job_instances.c.state, func.count().label("n"))
                    .where(job_instances.c.job_id.in_(claim.job_ids))
                    .group_by(job_instances.c.job_id, job_instances.c.state)
                )
            }
            current = {
                row.id: row
                for row in conn.execute(
                    select(
                        jobs.c.id,
                        jobs.c.state,
                        jobs.c.attempts,
                        jobs.c.connection_failures,
                        jobs.c.lease_owner,
                        jobs.c.next_attempt_at,
                        jobs.c.finished_at,
                        jobs.c.last_error,
                    ).where(jobs.c.id.in_(claim.job_ids))
                )
            }
            history: list[dict[str, object]] = []
            settled: list[dict[str, object]] = []
            canceled: list[int] = []
            exhausted: list[int] = []
            for job_id in claim.job_ids:
                row = current.get(job_id)
                if row is None or row.lease_owner != claim.owner:
                    continue  # lease lost: someone else owns it now
                job_message = (job_messages or {}).get(job_id, message)
                history.append(
                    {
                        "job_id": job_id,
                        "started_at": claim.started_at,
                        "ended_at": now,
                        "outcome": outcome,
                        "sent": (job_counts or {}).get(job_id, (sent, failed))[0],
                        "failed": (job_counts or {}).get(job_id, (sent, failed))[1],
                        "message": job_message[:2000] if job_message else None,
                    }
                )
                pending = counts.get((job_id, S.ITEM_PENDING), 0)
                failed_n = counts.get((job_id, S.ITEM_FAILED), 0)
                warned = counts.get((job_id, S.ITEM_WARNING), 0)
                values: dict[str, object] = {
                    "b_id": job_id,
                    "b_state": row.state,
                    "b_attempts": row.attempts,
                    "b_connection_failures": row.connection_failures,
                    "b_next": row.next_attempt_at,
                    "b_finished": row.finished_at,
                    "b_error": row.last_error,
                }
                if row.state == S.CANCELED:
                    canceled.append(job_id)
                    values["b_finished"] = now
                elif pending == 0:
                    values["b_state"] = (
                        S.FAILED if failed_n else S.WARNING if warned else S.COMPLETED
                    )
                    values["b_finished"] = now
                    values["b_error"] = (
                        f"{failed_n} instance(s) refused permanently: {job_message}"
                        if failed_n
                        else None
                    )
                elif count_attempt and transient_jobs is not None and job_id not in transient_jobs:
                    values["b_state"], window_at = initial_state(dest, now)
                    values["b_next"] = window_at
                else:
                    tries = row.attempts + (1 if count_attempt else 0)
                    values["b_attempts"] = tries
                    if not count_attempt:
                        values["b_connection_failures"] = row.connection_failures + 1
                    values["b_error"] = job_message or None
                    if tries >= dest.retry.max_attempts:
                        exhausted.append(job_id)
                        values["b_state"] = S.FAILED
                        values["b_finished"] = now
                    else:
                        state, window_at = initial_state(dest, now)
                        values["b_state"] = state
                        delay = (
                            S.retry_delay(dest.retry, tries) if count_attempt else unavailable_delay
                        )
                        values["b_next"] = max(window_at, now + delay)
                settled.append(values)
            if canceled:
                self._cancel_items(conn, canceled, now)
            if exhausted:
                conn.execute(
                    update(job_instances)
                    .where(
                        job_instances.c.job_id.in_(exhausted),
                        job_instances.c.state == S.ITEM_PENDING,
                    )
                    .values(state=S.ITEM_FAILED, updated_at=now)
                )
            if history:
                conn.execute(attempts.insert(), history)
            if settled:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == bindparam("b_id"))
                    .values(
                        state=bindparam("b_state"),
                        attempts=bindparam("b_attempts"),
                        connection_failures=bindparam("b_connection_failures"),
                        next_attempt_at=bindparam("b_next"),
                        finished_at=bindparam("b_finished"),
                        last_error=bindparam("b_error"),
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=now,
                    ),
                    settled,
                )

    def release(self, claim: Claim) -> None:
        """Give jobs back untouched (shutdown or window closed)."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(
                    jobs.c.id.in_(claim.job_ids),
                    jobs.c.lease_owner == claim.owner,
                    jobs.c.state == S.IN_PROGRESS,
                )
                .values(state=S.PENDING, lease_owner=None, lease_expires_at=None, updated_at=now)
            )

    def hold(
        self,
        claim: Claim,
        reasons: dict[int, str],
        dest: BaseDestinationConfig,
        now: float | None = None,
    ) -> None:
        """Give jobs back without using up an attempt, to be tried again in
        :data:`HOLD_DELAY` at most: their transforms cannot run now (a secret missing
        from the environment, a pipeline no longer configured). They wait, with the
        reason, as long as it takes; they are never sent untransformed."""
        now = time.time() if now is None else now
        state, window_at = initial_state(dest, now)
        delay = min(HOLD_DELAY, dest.retry.max_delay)
        with self.engine.begin() as conn:
            for job_id, reason in reasons.items():
                conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.id == job_id,
                        jobs.c.lease_owner == claim.owner,
                        jobs.c.state == S.IN_PROGRESS,
                    )
                    .values(
                        state=state,
                        lease_owner=None,
                        lease_expires_at=None,
                        next_attempt_at=max(window_at, now + delay),
                        last_error=reason[:2000],
                        updated_at=now,
                    )
                )

    # -- recovery -------------------------------------------------------------------
    def recover(self, owner_prefix: str | None = None, now: float | None = None) -> int:
        """Return expired leases (and, at start-up, this node's own) to ``pending``.

        A lease is only ever left behind by a delivery that did not finish: a
        graceful stop releases its claims. So each recovered job gets an
        ``interrupted`` attempt, and a job interrupted ``MAX_INTERRUPTIONS`` times in
        a row fails instead: an object that kills the dispatch process (a decoder
        crash, memory exhausted by a huge conversion) would otherwise be claimed
        again after every restart and hold every destination up for ever."""
        now = time.time() if now is None else now
        condition = and_(jobs.c.state == S.IN_PROGRESS, jobs.c.lease_expires_at < now)
        if owner_prefix is not None:
            condition = and_(
                jobs.c.state == S.IN_PROGRESS,
                # Escaped: ``_`` in a node name is a LIKE wildcard; "a_b:" must not
                # take node "axb"'s leases.
                (jobs.c.lease_expires_at < now)
                | jobs.c.lease_owner.startswith(owner_prefix, autoescape=True),
            )
        with self.engine.begin() as conn:
            stuck = [row.id for row in conn.execute(select(jobs.c.id).where(condition))]
            if not stuck:
                return 0
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(stuck), jobs.c.state == S.IN_PROGRESS)
                .values(
                    state=S.PENDING,
                    lease_owner=None,
                    lease_expires_at=None,
                    attempts=jobs.c.attempts + 1,
                    last_error=_INTERRUPTED,
                    updated_at=now,
                )
            )
            conn.execute(
                attempts.insert(),
                [
                    {
                        "job_id": job_id,
                        "started_at": now,
                        "ended_at": now,
                        "outcome": "interrupted",
                        "sent": 0,
                        "failed": 0,
                        "message": _INTERRUPTED,
                    }
                    for job_id in stuck
                ],
            )
            poisoned = [job_id for job_id in stuck if self._interrupted_in_a_row(conn, job_id)]
            if poisoned:
                reason = (
                    f"delivery interrupted {MAX_INTERRUPTIONS} times in a row: the dispatch "
                    "process stopped while sending this job (see its log for a crash or an "
                    "out-of-memory kill); retry by hand once the cause is fixed"
                )
                self._end_jobs(conn, poisoned, S.FAILED, S.ITEM_FAILED, reason, now)
                log.error("job(s) %s failed: %s", ", ".join(str(j) for j in poisoned), reason)
        return len(stuck)

    @staticmethod
    def _interrupted_in_a_row(conn: Connection, job_id: int) -> bool:
        outcomes = conn.execute(
            select(attempts.c.outcome)
            .where(attempts.c.job_id == job_id)
            .order_by(attempts.c.id.desc())
            .limit(MAX_INTERRUPTIONS)
        ).scalars()
        return [*outcomes] == ["interrupted"] * MAX_INTERRUPTIONS

    # -- manual actions ---------------------------------------------------------------
    def retry(self, job_ids: Sequence[int]) -> int:
        """Send again what did not arrive: failed/canceled instances become pending."""
        now = time.time()
        with self.engine.begin() as conn:
            eligible = [
                row.id
                for row in conn.execute(
                    select(jobs.c.id).where(
                        jobs.c.id.in_(job_ids),
                        jobs.c.state.in_((S.FAILED, S.CANCELED, S.PENDING, S.SCHEDULED, S.WARNING)),
                        # A canceled job a worker still holds is retried once the
                        # worker lets go; retrying now could send it twice at once.
                        jobs.c.lease_owner.is_(None),
                    )
                )
            ]
            if not eligible:
                return 0
            conn.execute(
                update(job_instances)
                .where(
                    job_instances.c.job_id.in_(eligible),
                    job_instances.c.state.in_((S.ITEM_FAILED, S.ITEM_CANCELED)),
                )
                .values(state=S.ITEM_PENDING, updated_at=now)
            )
            # What retention deleted cannot be sent again: it fails at once, saying so.
            purged = conn.execute(
                select(job_instances.c.job_id, instances.c.id, instances.c.purged_at)
                .join(instances, instances.c.id == job_instances.c.instance_id)
                .where(
                    job_instances.c.job_id.in_(eligible),
                    job_instances.c.state == S.ITEM_PENDING,
                    instances.c.purged_at.is_not(None),
                )
            ).all()
            if purged:
                self._fail_purged(conn, purged, now)
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(eligible))
                .values(
                    state=case(
                        (
                            select(func.count())
                            .where(
                                job_instances.c.job_id == jobs.c.id,
                                job_instances.c.state == S.ITEM_PENDING,
                            )
                            .scalar_subquery()
                            > 0,
                            S.PENDING,
                        ),
                        else_=jobs.c.state,
                    ),
                    attempts=0,
                    connection_failures=0,
                    next_attempt_at=now,
                    finished_at=None,
                    updated_at=now,
                )
            )
        return len(eligible)

    @staticmethod
    def _fail_purged(conn: Connection, rows: Sequence[Any], now: float) -> None:
        """Fail deliveries of instances retention deleted (rows: job id, instance id,
        purged_at), with the date, so the job settles instead of sending nothing."""
        conn.execute(
            update(job_instances)
            .where(
                job_instances.c.job_id == bindparam("b_job"),
                job_instances.c.instance_id == bindparam("b_instance"),
                job_instances.c.state == S.ITEM_PENDING,
            )
            .values(state=S.ITEM_FAILED, message=bindparam("b_message"), updated_at=now),
            [
                {
                    "b_job": row[0],
                    "b_instance": row[1],
                    "b_message": S.purged_message(row.purged_at),
                }
                for row in rows
            ],
        )

    def cancel(self, job_ids: Sequence[int]) -> int:
        now = time.time()
        with self.engine.begin() as conn:
            eligible = [
                row.id
                for row in conn.execute(
                    select(jobs.c.id).where(jobs.c.id.in_(job_ids), jobs.c.state.in_(S.OPEN_STATES))
                )
            ]
            if not eligible:
                return 0
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(eligible))
                .values(state=S.CANCELED, finished_at=now, updated_at=now)
            )
            self._cancel_items(conn, eligible, now)
        return len(eligible)

    @staticmethod
    def _end_jobs(
        conn: Connection,
        job_ids: Sequence[int],
        job_state: str,
        item_state: str,
        reason: str,
        now: float,
    ) -> int:
        """Finish these jobs in ``job_state`` and their still-pending instances in
        ``item_state``, with ``reason`` on both (what the trace and ``queue show``
        say). Returns how many instances were still pending."""
        pending = conn.execute(
            update(job_instances)
            .where(job_instances.c.job_id.in_(job_ids), job_instances.c.state == S.ITEM_PENDING)
            .values(state=item_state, message=reason, updated_at=now)
        ).rowcount
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(job_ids))
            .values(state=job_state, finished_at=now, last_error=reason, updated_at=now)
        )
        return int(pending or 0)

    @staticmethod
    def _cancel_items(conn: Connection, job_ids: Sequence[int], now: float) -> None:
        conn.execute(
            update(job_instances)
            .where(job_instances.c.job_id.in_(job_ids), job_instances.c.state == S.ITEM_PENDING)
            .values(state=S.ITEM_CANCELED, updated_at=now)
        )

    def give_up(self, dest_name: str, waiting_since: float, reason: str) -> tuple[list[int], int]:
        """Fail the jobs of an unreachable destination that have been waiting, untouched,
        since before ``waiting_since`` (``give_up_after``). A job's ``updated_at`` moves
        with every attempt and every manual action, so this counts the time spent
        stuck behind the outage, and a retry by hand starts the clock again. Their
        undelivered instances become failed and an attempt records why. Returns the
        failed jobs and how many instances they left undelivered."""
        now = time.time()
        with self.engine.begin() as conn:
            stale = [
                row.id
                for row in conn.execute(
                    select(jobs.c.id).where(
                        jobs.c.destination == dest_name,
                        jobs.c.state.in_(S.WAITING_STATES),
                        jobs.c.updated_at < waiting_since,
                    )
                )
            ]
            if not stale:
                return [], 0
            undelivered = self._end_jobs(conn, stale, S.FAILED, S.ITEM_FAILED, reason[:2000], now)
            conn.execute(
                attempts.insert(),
                [
                    {
                        "job_id": job_id,
                        "started_at": now,
                        "ended_at": now,
                        "outcome": "failed",
                        "sent": 0,
                        "failed": 0,
                        "message": reason[:2000],
                    }
                    for job_id in stale
                ],
            )
        return stale, int(undelivered or 0)

    def move(
        self, job_ids: Sequence[int], dest_name: str, dest: BaseDestinationConfig
    ) -> tuple[list[int], list[int]]:
        """Hand waiting jobs over to another destination (e.g. theirs was removed from
        the configuration). Each job's instances still to send are queued for
        ``dest_name`` as the planner would queue them (what it already has, queued or
        delivered, is not sent twice), and the job is canceled with a note saying
        where its instances went: its history, and what its old destination did
        receive, stay true. Jobs a worker holds are left alone. Returns (moved job
        ids, the target's jobs that received instances)."""
        now = time.time()
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(
                    jobs.c.id,
                    jobs.c.level,
                    jobs.c.resource_uid,
                    jobs.c.study_instance_uid,
                    jobs.c.routes,
                    jobs.c.transform,
                    jobs.c.priority,
                ).where(
                    jobs.c.id.in_(list(job_ids)),
                    jobs.c.state.in_(S.WAITING_STATES),
                    jobs.c.lease_owner.is_(None),
                    jobs.c.destination != dest_name,
                )
            ).all()
            if not rows:
                return [], []
            moved = [row.id for row in rows]
            members: dict[int, dict[int, int]] = {job_id: {} for job_id in moved}
            for chunk in _chunks(moved):
                for item in conn.execute(
                    select(
                        job_instances.c.job_id,
                        job_instances.c.instance_id,
                        job_instances.c.generation,
                    ).where(
                        job_instances.c.job_id.in_(chunk),
                        job_instances.c.state == S.ITEM_PENDING,
                    )
                ):
                    members[item.job_id][item.instance_id] = item.generation
            plans = [
                Delivery(
                    dest_name,
                    dest,
                    row.level,
                    row.resource_uid,
                    row.study_instance_uid,
                    routes=set(filter(None, (row.routes or "").split(","))),
                    members=members[row.id],
                    transform=row.transform,
                    priority=row.priority,
                )
                for row in rows
                if members[row.id]
            ]
            touched = self.enqueue_many(conn, plans, now) if plans else []
            note = f"moved to destination {dest_name}"
            for chunk in _chunks(moved):
                self._end_jobs(conn, chunk, S.CANCELED, S.ITEM_CANCELED, note, now)
        return moved, touched

    def open_jobs_by_destination(self) -> dict[str, int]:
        """Jobs not yet finished, per destination."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs.c.destination, func.count())
                .where(jobs.c.state.in_(S.OPEN_STATES))
                .group_by(jobs.c.destination)
            ).all()
        return {row[0]: int(row[1]) for row in rows}

    def defer_to_window(self, dest_name: str, dest: BaseDestinationConfig, now: float) -> int:
        """The destination's send window is closed: its ``pending`` jobs (a retry that
        fell due after the window closed, a claim stopped at closing time) become
        ``scheduled`` for the next opening, so that the queue says what they wait
        for and nothing reads them as stuck."""
        if dest.send_window is None:
            return 0
        moment = datetime.fromtimestamp(now)
        if dest.send_window.contains(moment):
            return 0
        opens = dest.send_window.next_open(moment).timestamp()
        with self.engine.begin() as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.destination == dest_name, jobs.c.state == S.PENDING)
                .values(
                    state=S.SCHEDULED,
                    next_attempt_at=case(  # the later of the two (portable, unlike max())
                        (jobs.c.next_attempt_at > opens, jobs.c.next_attempt_at), else_=opens
                    ),
                    updated_at=now,
                )
            )
        return int(result.rowcount or 0)

    def wake_destination(self, dest_name: str, dest: BaseDestinationConfig) -> int:
        """A paused destination answered again: its queue resumes now, not after backoff."""
        now = time.time()
        state, at = initial_state(dest, now)
        with self.engine.begin() as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.destination == dest_name, jobs.c.state.in_(S.WAITING_STATES))
                .values(next_attempt_at=at, state=state, updated_at=now)
            )
        return int(result.rowcount or 0)
