"""Which stored objects retention may delete: the eligibility rules, as SQL.

One copy of the rules, used by the purge (to choose, and again under the write lock
to confirm), by the dry run and by the status counts. An instance is:

- *delivered* when it was planned (``routed = 1``), at least one delivery holds it,
  every one of its deliveries is completed, warning or canceled (none pending,
  failed, or in any other state) and no series/study trigger of its series or
  study waits;
- *unrouted* when it was planned, no delivery holds it and no trigger waits;
- *undelivered* otherwise (not planned yet, set aside, a delivery pending or failed,
  a trigger waiting, held as a routing loop and not released): kept, unless
  ``delete_undelivered_after`` is set, and even then never while a worker is
  sending it (a delivery of it pending in a job claimed under a lease).

A live instance is one whose file retention has not deleted (``purged_at IS NULL``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, func, or_, select

from dicomrouter.config import RetentionConfig, format_duration
from dicomrouter.queue import states as S
from dicomrouter.store.schema import instances, job_instances, jobs, loop_events, triggers

DELIVERED = "delivered"
UNROUTED = "unrouted"
UNDELIVERED = "undelivered"
KINDS = (DELIVERED, UNROUTED, UNDELIVERED)

_ji = job_instances
live = instances.c.purged_at.is_(None)
_held = exists().where(_ji.c.instance_id == instances.c.id)
#: Any delivery not settled for good: listed by what *is* settled, so a delivery
#: state added later keeps its instance instead of letting it go.
_SETTLED = (S.ITEM_COMPLETED, S.ITEM_WARNING, S.ITEM_CANCELED, S.ITEM_SKIPPED)
_open = exists().where(_ji.c.instance_id == instances.c.id, _ji.c.state.not_in(_SETTLED))
_waited_for = exists().where(
    triggers.c.pending == 1,
    or_(
        and_(triggers.c.level == "series", triggers.c.uid == instances.c.series_instance_uid),
        and_(triggers.c.level == "study", triggers.c.uid == instances.c.study_instance_uid),
    ),
)
#: Held by a loop guard and not released: an operator still has to decide.
_loop_held = exists().where(
    loop_events.c.instance_id == instances.c.id,
    loop_events.c.generation == instances.c.generation,
    loop_events.c.kind == "held",
    loop_events.c.released_at.is_(None),
)
#: A delivery a worker holds right now (its job claimed under a lease, the instance
#: not sent yet): its file must stay until the send is over, whatever the policy.
_being_sent = exists().where(
    _ji.c.instance_id == instances.c.id,
    _ji.c.state == S.ITEM_PENDING,
    _ji.c.job_id == jobs.c.id,
    jobs.c.state == S.IN_PROGRESS,
)
_settled = and_(instances.c.routed == 1, ~_open, ~_waited_for, ~_loop_held)
is_delivered = and_(live, _settled, _held)
is_unrouted = and_(live, _settled, ~_held)
is_undelivered = and_(live, or_(instances.c.routed != 1, _open, _waited_for, _loop_held))
#: When the last of its deliveries settled (delivered instances only).
delivered_at = (
    select(func.max(_ji.c.updated_at)).where(_ji.c.instance_id == instances.c.id).scalar_subquery()
)
kind = case((_held, DELIVERED), else_=UNROUTED)


@dataclass(frozen=True)
class Cutoffs:
    """POSIX times: an object of a kind is due when its clock is at or before these."""

    delivered: float
    unrouted: float
    undelivered: float | None

    @classmethod
    def at(cls, policy: RetentionConfig, now: float) -> Cutoffs:
        undelivered = policy.delete_undelivered_after
        return cls(
            delivered=now - policy.delete_delivered_after,
            unrouted=now - policy.delete_unrouted_after,
            undelivered=None if undelivered is None else now - undelivered,
        )

    @property
    def latest(self) -> float:
        """No due object was received after this (every clock starts at reception)."""
        return max(c for c in (self.delivered, self.unrouted, self.undelivered) if c is not None)


def due(cutoffs: Cutoffs) -> ColumnElement[bool]:
    """Live instances whose time has come (by age)."""
    conditions: list[ColumnElement[bool]] = [
        and_(
            is_delivered,
            instances.c.received_at <= cutoffs.delivered,
            delivered_at <= cutoffs.delivered,
        ),
        and_(is_unrouted, instances.c.received_at <= cutoffs.unrouted),
    ]
    if cutoffs.undelivered is not None:
        # Never one the planner has not looked at yet: it is planned within seconds.
        conditions.append(
            and_(
                is_undelivered,
                instances.c.routed != 0,
                ~_being_sent,
                instances.c.received_at <= cutoffs.undelivered,
            )
        )
    return and_(live, instances.c.received_at <= cutoffs.latest, or_(*conditions))


def evictable() -> ColumnElement[bool]:
    """Live instances free space may take ahead of time: delivered or unrouted."""
    return and_(live, or_(is_delivered, is_unrouted))


def due_kind(cutoffs: Cutoffs) -> Any:
    """The kind of a due instance (for the reason recorded with it)."""
    if cutoffs.undelivered is None:
        return kind
    return case((is_undelivered, UNDELIVERED), else_=kind)


def reason(kind_name: str, policy: RetentionConfig, evicted: bool = False) -> str:
    """Why an object was deleted, as the trace shows it."""
    if evicted:
        return f"{kind_name}; evicted early: free space below retention.free_space_target"
    if kind_name == DELIVERED:
        age = format_duration(policy.delete_delivered_after)
        return f"delivered to every destination more than {age} ago (delete_delivered_after)"
    if kind_name == UNROUTED:
        age = format_duration(policy.delete_unrouted_after)
        return f"matched no route, received more than {age} ago (delete_unrouted_after)"
    age = format_duration(policy.delete_undelivered_after or 0)
    return f"not delivered, received more than {age} ago (delete_undelivered_after)"
