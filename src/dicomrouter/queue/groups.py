"""Groups (``type: group``): which member a study goes to, and moving a paused
member's waiting work.

A group is resolved when planning, never when sending: the planner asks
:class:`GroupChooser` for the member of each (group, study) and queues an ordinary
job for that member, with ``jobs.via_group`` naming the group. The member's own
workers, health, retries, send window and transforms then send it as they send
anything else.

A study keeps its member (``group_affinity``) while that member is up, so a study is
never split between two nodes. When a member is paused (unreachable, disabled, or by
an operator), :func:`move_waiting` (run by the dispatch process every few seconds)
hands the waiting jobs that came to it through the group to the member the strategy
chooses now, with the study's affinity; and so that the new member holds the whole
study, what the old member already received of it through the group is queued for the
new member too (the old one keeps its partial copy). The planner does the same when
a study whose member is down gets a late instance. Everything runs in the caller's
write transaction, so a choice and the jobs it makes are committed together.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Row, Select, delete, func, select, update

from dicomrouter.config import GroupDestinationConfig, RouterConfig
from dicomrouter.store.dialect import database_now
from dicomrouter.store.schema import (
    destination_state,
    group_affinity,
    group_rotation,
    instances,
    job_instances,
    jobs,
)

from . import states as S
from .jobs import Delivery, JobStore

log = logging.getLogger("dicomrouter.groups")


class GroupChooser:
    """Chooses members inside one transaction (``conn``): the planner makes one per
    planning pass, the mover one per group. It reads the members' state once, and
    counts what it assigns itself, so the choices of one pass are consistent."""

    def __init__(self, conn: Connection, config: RouterConfig, now: float) -> None:
        self.conn = conn
        self.config = config
        self.now = now
        self._up: set[str] | None = None
        self._queued: dict[str, int] | None = None
        self._assigned: dict[str, int] = {}  # instances this chooser sent to each member
        self._chosen: dict[tuple[str, str], str] = {}
        self.moves: list[GroupMove] = []  # studies moved while choosing

    # -- state of the members ----------------------------------------------------
    def up(self, group: GroupDestinationConfig) -> list[str]:
        """The members that are up, in ``members`` order: enabled, not paused by an
        operator, not paused as unreachable."""
        if self._up is None:
            senders = self.config.senders
            names = sorted({m for g in self.config.groups.values() for m in g.members})
            down = {
                row.name
                for row in self.conn.execute(
                    select(destination_state.c.name).where(
                        destination_state.c.name.in_(names),
                        (destination_state.c.state == "paused")
                        | (destination_state.c.admin_paused != 0),
                    )
                )
            }
            self._up = {n for n in names if n in senders and senders[n].enabled and n not in down}
        return [m for m in group.members if m in self._up]

    def _queue_depths(self, names: Sequence[str]) -> dict[str, int]:
        """Instances waiting to be sent (pending in an open job), per member."""
        if self._queued is None:
            members = sorted({m for g in self.config.groups.values() for m in g.members})
            counts = dict.fromkeys(members, 0)
            for name, count in self.conn.execute(
                select(jobs.c.destination, func.count())
                .select_from(jobs.join(job_instances, job_instances.c.job_id == jobs.c.id))
                .where(
                    jobs.c.destination.in_(members),
                    jobs.c.state.in_(S.OPEN_STATES),
                    job_instances.c.state == S.ITEM_PENDING,
                )
                .group_by(jobs.c.destination)
            ):
                counts[name] = int(count)
            self._queued = counts
        return {name: self._queued.get(name, 0) + self._assigned.get(name, 0) for name in names}

    # -- choosing ----------------------------------------------------------------
    def member(self, name: str, study_uid: str, count: int = 0) -> str:
        """The member of group ``name`` for ``study_uid``: the one it already has if
        that member is up (or if none is), else the strategy's choice among those up
        (or among all when none is up: the work waits there, and moves when another
        comes up). ``count`` instances are about to be queued for it.

        A study that leaves a member that is down takes along what that member had
        of it through the group (:func:`move_study`), so the new member gets it
        whole; unless a claim of it is on the wire to the old member: then it stays
        there for now, and :func:`move_waiting` moves it once the claim settles."""
        key = (name, study_uid)
        chosen = self._chosen.get(key)
        if chosen is None:
            group = self.config.groups[name]
            up = self.up(group)
            current = self.conn.execute(
                select(group_affinity.c.member).where(
                    group_affinity.c.group_name == name,
                    group_affinity.c.study_instance_uid == study_uid,
                )
            ).scalar()
            member = current if current in group.members else None
            if member is not None and (
                member in up
                or not up
                or _study_jobs(self.conn, name, study_uid, member)[1]  # a claim on the wire
            ):
                chosen = member
            else:
                chosen = self._strategy(name, group, up or list(group.members))
                self._assign(name, study_uid, chosen, current is not None)
                if member is not None:
                    self.moves.append(
                        move_study(
                            self.conn, self.config, name, study_uid, member, chosen, self.now
                        )
                    )
            self._chosen[key] = chosen
        # Queued at the end of the pass: counted now for the pass's next choices.
        self._assigned[chosen] = self._assigned.get(chosen, 0) + count
        return chosen

    def reassign(self, name: str, study_uid: str, source: str) -> str | None:
        """Move ``study_uid``'s affinity away from ``source`` to the strategy's choice
        among the other members that are up; None (nothing changes) if none is."""
        group = self.config.groups[name]
        candidates = [m for m in self.up(group) if m != source]
        if not candidates:
            return None
        target = self._strategy(name, group, candidates)
        self._assign(name, study_uid, target, True)
        self._chosen[(name, study_uid)] = target
        return target

    def _strategy(self, name: str, group: GroupDestinationConfig, candidates: list[str]) -> str:
        if group.strategy == "round_robin":
            return self._next_in_turn(name, group, candidates)
        if group.strategy == "least_queued":
            depth = self._queue_depths(candidates)
            return min(candidates, key=lambda m: (depth[m], group.members.index(m)))
        return candidates[0]  # failover: the first in members' order

    def _next_in_turn(self, name: str, group: GroupDestinationConfig, candidates: list[str]) -> str:
        start = self.conn.execute(
            select(group_rotation.c.next_index).where(group_rotation.c.group_name == name)
        ).scalar()
        count = len(group.members)
        index = (start or 0) % count
        while group.members[index] not in candidates:
            index = (index + 1) % count
        values = {"next_index": (index + 1) % count}
        if start is None:
            self.conn.execute(group_rotation.insert().values(group_name=name, **values))
        else:
            self.conn.execute(
                update(group_rotation).where(group_rotation.c.group_name == name).values(**values)
            )
        return group.members[index]

    def _assign(self, name: str, study_uid: str, member: str, exists: bool) -> None:
        if exists:
            self.conn.execute(
                update(group_affinity)
                .where(
                    group_affinity.c.group_name == name,
                    group_affinity.c.study_instance_uid == study_uid,
                )
                .values(member=member, assigned_at=self.now)
            )
        else:
            self.conn.execute(
                group_affinity.insert().values(
                    group_name=name,
                    study_instance_uid=study_uid,
                    member=member,
                    assigned_at=self.now,
                )
            )


@dataclass(frozen=True)
class GroupMove:
    """The waiting work of one study moved from one member to another."""

    group: str
    study_uid: str
    source: str
    target: str
    moved: int  # instances that waited for ``source``
    resent: int  # instances already sent (or tried) to ``source``, queued for ``target`` too
    jobs: list[int]  # ``target``'s jobs that received them


def move_waiting(
    engine: Engine, config: RouterConfig, now: float | None = None, reader: Engine | None = None
) -> list[GroupMove]:
    """Move the waiting work of paused members of every group (see the module
    docstring). Idempotent: a second run finds nothing left waiting for a paused
    member. A study with a job in flight to the paused member (claimed by a worker)
    waits for the next run, so that what that claim delivers is not left behind.

    Whether there is anything to move is read first through ``reader`` (which never
    takes the write lock the receiver needs for each C-STORE); only a group with work
    to move takes it. The moved jobs are due at ``now``: the database's, by default
    (another node's workers claim them)."""
    with (reader or engine).connect() as conn:
        chooser = GroupChooser(conn, config, database_now(conn) if now is None else now)
        busy = [name for name in sorted(config.groups) if _waiting_work(conn, chooser, name)]
    moves: list[GroupMove] = []
    for name in busy:
        with engine.begin() as conn:
            moves += _move_group(conn, config, name, database_now(conn) if now is None else now)
    log_moves(moves)
    return moves


def log_moves(moves: Sequence[GroupMove]) -> None:
    """One line per study moved (after its transaction committed)."""
    for move in moves:
        log.warning(
            "group %s: study %s moves from %s (down) to %s: %d waiting instance(s), "
            "%d already sent (or tried) to %s queued again",
            move.group,
            move.study_uid,
            move.source,
            move.target,
            move.moved,
            move.resent,
            move.source,
        )


def _waiting_query(name: str, down: Sequence[str]) -> Select[Any]:
    """(member, study) of the jobs that came through group ``name`` and wait for one
    of the ``down`` members, not held by a worker."""
    return (
        select(jobs.c.destination, jobs.c.study_instance_uid)
        .where(
            jobs.c.via_group == name,
            jobs.c.destination.in_(down),
            jobs.c.state.in_(S.WAITING_STATES),
            jobs.c.lease_owner.is_(None),
        )
        .distinct()
    )


def _down(chooser: GroupChooser, name: str) -> list[str] | None:
    """The members of ``name`` that are down, or None when none is, or none is up
    (then there is nowhere to move to)."""
    group = chooser.config.groups[name]
    up = chooser.up(group)
    down = [m for m in group.members if m not in up]
    return down if up and down else None


def _waiting_work(conn: Connection, chooser: GroupChooser, name: str) -> bool:
    down = _down(chooser, name)
    return (
        down is not None and conn.execute(_waiting_query(name, down).limit(1)).first() is not None
    )


def _move_group(conn: Connection, config: RouterConfig, name: str, now: float) -> list[GroupMove]:
    chooser = GroupChooser(conn, config, now)
    down = _down(chooser, name)
    if down is None:
        return []
    waiting = conn.execute(_waiting_query(name, down)).all()
    moves: list[GroupMove] = []
    for source, study_uid in sorted({(row[0], row[1]) for row in waiting}):
        if _study_jobs(conn, name, study_uid, source)[1]:
            continue  # a claim is on the wire to the source: move once it is settled
        target = chooser.reassign(name, study_uid, source)
        if target is None:
            break
        moves.append(move_study(conn, config, name, study_uid, source, target, now))
    return moves


def _study_jobs(
    conn: Connection, name: str, study_uid: str, member: str
) -> tuple[list[Row[Any]], bool]:
    """The jobs of ``study_uid`` that came to ``member`` through group ``name``, and
    whether a worker holds one of them (a claim on the wire)."""
    rows = list(
        conn.execute(
            select(jobs).where(
                jobs.c.via_group == name,
                jobs.c.destination == member,
                jobs.c.study_instance_uid == study_uid,
            )
        ).all()
    )
    return rows, any(row.state == S.IN_PROGRESS for row in rows)


def move_study(
    conn: Connection,
    config: RouterConfig,
    name: str,
    study_uid: str,
    source: str,
    target: str,
    now: float,
) -> GroupMove:
    """Hand what ``source`` has of ``study_uid`` through group ``name`` (waiting or
    delivered) to ``target``, in ``conn``'s transaction (see the module docstring)."""
    study_jobs, _ = _study_jobs(conn, name, study_uid, source)
    ids = [row.id for row in study_jobs]
    items = conn.execute(
        select(
            job_instances.c.job_id,
            job_instances.c.instance_id,
            job_instances.c.generation,
            job_instances.c.state,
        )
        .join(instances, instances.c.id == job_instances.c.instance_id)
        .where(job_instances.c.job_id.in_(ids), instances.c.purged_at.is_(None))
    ).all()
    waiting_jobs = {row.id for row in study_jobs if row.state in S.WAITING_STATES}
    members: dict[int, dict[int, int]] = {job_id: {} for job_id in ids}
    moved = resent = 0
    for item in items:
        waiting = item.job_id in waiting_jobs and item.state == S.ITEM_PENDING
        if item.state == S.ITEM_CANCELED:
            continue  # an operator canceled it: not sent anywhere
        # Delivered, failed or skipped there: the new member takes the whole study,
        # with a try of its own (its SOP class filter decides what it skips).
        slot = members[item.job_id]
        slot[item.instance_id] = max(item.generation, slot.get(item.instance_id, 0))
        moved += waiting
        resent += not waiting
    dest = config.destinations[target]
    plans = [
        Delivery(
            target,
            dest,
            row.level,
            row.resource_uid,
            study_uid,
            routes=set(filter(None, (row.routes or "").split(","))),
            members=members[row.id],
            transform=row.transform,
            priority=row.priority,
            via_group=name,
        )
        for row in study_jobs
        if members[row.id]
    ]
    touched = JobStore(conn.engine).enqueue_many(conn, plans, now) if plans else []
    # The waiting deliveries leave the source (deleted, not canceled: the study may
    # come back to this member one day, and must then be queued whole again). The
    # jobs end canceled with a note saying where their instances went.
    why = "paused" if config.destinations[source].enabled else "disabled"
    note = f"moved to {target} (group {name}: {source} is {why})"
    if waiting_jobs:
        conn.execute(
            delete(job_instances).where(
                job_instances.c.job_id.in_(sorted(waiting_jobs)),
                job_instances.c.state == S.ITEM_PENDING,
            )
        )
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(sorted(waiting_jobs)))
            .values(state=S.CANCELED, finished_at=now, last_error=note, updated_at=now)
        )
    return GroupMove(name, study_uid, source, target, moved, resent, touched)
