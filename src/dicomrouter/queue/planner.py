"""From rules to jobs: the stage between the index and the queue.

It reads instances the receiver committed (``routed = 0``), evaluates every route
once per instance, and either queues deliveries at once (``trigger: instance``) or
arms a series/study trigger that fires when the series or study has been quiet for
``stable_after``. Everything one pass decides is written in one transaction, so a
crash re-plans the batch rather than half-planning it.

Every node sharing a PostgreSQL index plans, so planners run concurrently. A pass
reads its batch (and headers) before taking the write lock, so another planner may
plan the same instances meanwhile; under the lock the pass keeps only those still
unplanned at the generation it read, and plans nothing twice. A trigger is claimed
(``pending`` 1 -> 0 at the ``last_arrival`` read) before its plan is written, so it
fires once. Quiet times (``stable_after``) and due times are measured in the
database's clock (:func:`~dicomrouter.store.dialect.database_now`), which every
node shares.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import Connection, Engine, Row, and_, bindparam, delete, select, update

from dicomrouter.config import RouteConfig, RouterConfig
from dicomrouter.rules import Condition, InstanceFacts, compile_condition
from dicomrouter.store import ObjectStore, create_index_engine, read_header
from dicomrouter.store.dialect import database_now
from dicomrouter.store.schema import instances, route_matches, triggers
from dicomrouter.store.schema import unplanned as set_aside_rows

from . import groups, unplanned
from .groups import GroupChooser
from .jobs import PRIORITY, Delivery, JobStore
from .loops import LoopGuard

log = logging.getLogger("dicomrouter.planner")

_LEVEL_COLUMN = {
    "series": instances.c.series_instance_uid,
    "study": instances.c.study_instance_uid,
    "patient": instances.c.patient_id,
}


@dataclass
class CompiledRoute:
    config: RouteConfig
    condition: Condition | None  # None: matches everything, no header needed

    @property
    def name(self) -> str:
        return self.config.name


Plans = dict[tuple[str, str, str, str, str | None], Delivery]
"""Deliveries decided in one pass, merged per (destination, level, resource uid,
route pipeline, group that chose the destination)."""

#: Instances planned per transaction. Small enough that the receiver, which needs the
#: same write lock to commit each C-STORE, never waits long behind the planner.
PLAN_BATCH = 100


def indexed_facts(row: Row[Any], dataset: Dataset) -> InstanceFacts:
    """What the rules see of an indexed instance: its header and how it arrived. The
    planner and every explanation after the fact (trace, backtest) build it here, so
    they cannot disagree."""
    return InstanceFacts(
        dataset=dataset,
        calling_ae=row.calling_ae,
        called_ae=row.called_ae,
        source_address=row.source_address,
        received_at=datetime.fromtimestamp(row.received_at),
    )


def compile_routes(config: RouterConfig) -> list[CompiledRoute]:
    return [
        CompiledRoute(route, compile_condition(route.when) if route.when else None)
        for route in config.routes
        if route.enabled
    ]


class Planner:
    def __init__(self, config: RouterConfig, engine: Engine, store: ObjectStore):
        self.config = config
        self.engine = engine
        self.store = store
        self.jobs = JobStore(engine)
        # Reads that must not hold the write lock: a reader engine (SQLite: WAL readers
        # beside the writer; PostgreSQL: no advisory lock, which every transaction of
        # the writer engine takes, reads included).
        self.reader = create_index_engine(
            engine.url.render_as_string(hide_password=False), create=False, writer=False
        )
        self.routes = compile_routes(config)
        self._needs_header = any(route.condition is not None for route in self.routes)
        self.loops = LoopGuard(config)
        self._group_names = set(config.groups)
        # Chooses the members of groups inside the pass's transaction (set by each
        # pass that plans, see _groups_for).
        self._groups: GroupChooser | None = None

    def apply(self, config: RouterConfig) -> None:
        """Route with a new configuration from the next pass on. Call it between
        passes (the dispatcher's plan loop does): a pass reads ``routes`` and
        ``config`` several times and must see one version. What was planned stays
        planned; armed triggers of a removed route are dropped when they would fire."""
        routes = compile_routes(config)
        self.config = config
        self.routes = routes
        self._needs_header = any(route.condition is not None for route in routes)
        self._group_names = set(config.groups)
        self.loops.apply(config)

    # -- instance arrival ---------------------------------------------------------
    def route_new_instances(self, limit: int = PLAN_BATCH) -> int:
        """Plan the next batch of received instances. Returns how many were planned
        or set aside.

        If a batch cannot be planned, its instances are planned one by one, and one
        that still fails is set aside (``routed = -1``, see :mod:`.unplanned`) so that
        it can never hold up the instances behind it; :meth:`retry_unplanned` plans
        it again later. If even setting it aside fails (nothing can be written), the
        error propagates and the instances stay to be planned on the next pass.

        Instances another planner (another node) planned meanwhile are left to it and
        not counted, so two planners together plan each instance once.
        """
        try:
            return self._route_batch(limit)
        except Exception as exc:
            log.warning(
                "planning a batch failed (%s); planning its instances one by one",
                unplanned.error_text(exc),
            )
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(instances.c.id, instances.c.generation)
                .where(instances.c.routed == 0, instances.c.purged_at.is_(None))
                .order_by(instances.c.id)
                .limit(limit)
            ).all()
        for row in rows:
            self._plan_one(row.id, row.generation, retry=False)
        return len(rows)

    def retry_unplanned(self, now: float | None = None, limit: int = PLAN_BATCH) -> int:
        """Plan again the set-aside instances whose retry time has come, one by one
        (one that fails again waits longer; the others are not held up). Returns how
        many were planned. (``now``: the database's, by default.)"""
        planned = 0
        for instance_id in unplanned.due(self.reader, now, limit):
            if self._plan_one(instance_id, None, retry=True):
                planned += 1
        return planned

    def _plan_one(self, instance_id: int, generation: int | None, retry: bool) -> bool:
        try:
            planned = self._route_batch(1, only=instance_id, retry=retry)
        except Exception as exc:
            failure = exc
        else:
            if retry and planned:
                log.info("instance %s planned after an earlier failure", instance_id)
            return planned > 0
        error = unplanned.error_text(failure)
        with self.engine.begin() as conn:
            if generation is None:
                generation = conn.execute(
                    select(instances.c.generation).where(instances.c.id == instance_id)
                ).scalar()
            now = database_now(conn)
            next_at = (
                unplanned.set_aside(conn, instance_id, generation, error, now)
                if generation is not None
                else None
            )
        if next_at is not None:
            log.error(
                "cannot plan instance %s (%s); set aside, trying again in %.0f s",
                instance_id,
                error,
                next_at - now,
                exc_info=failure if not retry else None,
            )
        return False

    def _route_batch(self, limit: int, only: int | None = None, retry: bool = False) -> int:
        # Read the batch and its headers before taking the write lock: the receiver
        # needs that lock for every C-STORE, so only the writes happen under it.
        # Not a copy the receiver retracted (a purge took its file before it answered):
        # it was never acknowledged, and there is no file to send.
        query = select(instances).where(
            instances.c.routed == (-1 if retry else 0), instances.c.purged_at.is_(None)
        )
        if only is not None:
            query = query.where(instances.c.id == only)
        with self.reader.connect() as reader:
            batch = reader.execute(query.order_by(instances.c.id).limit(limit)).all()
        if not batch:
            if retry and only is not None:
                # Set aside, then purged (or its copy retracted): nothing to plan, and
                # nothing to keep retrying.
                with self.engine.begin() as conn:
                    conn.execute(delete(set_aside_rows).where(set_aside_rows.c.instance_id == only))
            return 0
        facts = {row.id: self._facts(row) for row in batch} if self.routes else {}
        self.loops.prepare({row.calling_ae for row in batch})
        with self.engine.begin() as conn:
            now = database_now(conn)
            batch, retracted = self._still_unplanned(conn, batch, -1 if retry else 0)
            if not batch and not retracted:
                return 0  # another planner (another node) planned all of it meanwhile
            plans: Plans = {}
            self.loops.begin()
            self._groups = GroupChooser(conn, self.config, now)
            matches: list[dict[str, object]] = []
            for row in batch:
                self._plan_instance(conn, row, facts.get(row.id), plans, matches, now)
            if matches:
                conn.execute(
                    delete(route_matches).where(
                        route_matches.c.instance_id == bindparam("b_instance"),
                        route_matches.c.route == bindparam("b_route"),
                    ),
                    [{"b_instance": m["instance_id"], "b_route": m["route"]} for m in matches],
                )
                conn.execute(route_matches.insert(), matches)
            self._commit_plans(conn, plans, now)
            if batch:
                conn.execute(
                    update(instances)
                    .where(
                        instances.c.id == bindparam("b_id"),
                        instances.c.generation == bindparam("b_gen"),
                    )
                    .values(routed=1),
                    [{"b_id": row.id, "b_gen": row.generation} for row in batch],
                )
            # An earlier generation may have been set aside: planned now, it is done
            # (a retracted copy too: there is nothing left to plan for it).
            done = [row.id for row in batch] + sorted(retracted)
            conn.execute(delete(set_aside_rows).where(set_aside_rows.c.instance_id.in_(done)))
        groups.log_moves(self._groups.moves)
        return len(batch)

    @staticmethod
    def _still_unplanned(
        conn: Connection, batch: Sequence[Row], routed: int
    ) -> tuple[list[Row], set[int]]:
        """Under the write lock: the rows of ``batch`` still to plan (``routed`` as
        read, same generation, not purged), and the ids whose copy was retracted.
        The batch was read before the lock; another planner may have planned some of
        it since, or the instance been received again (its new generation is planned
        on a later pass)."""
        now_in_index = {
            row.id: row
            for row in conn.execute(
                select(
                    instances.c.id,
                    instances.c.generation,
                    instances.c.routed,
                    instances.c.purged_at,
                ).where(instances.c.id.in_([row.id for row in batch]))
            )
        }
        retracted = {i for i, row in now_in_index.items() if row.purged_at is not None}
        still = [
            row
            for row in batch
            if (current := now_in_index.get(row.id)) is not None
            and current.purged_at is None
            and current.routed == routed
            and current.generation == row.generation
        ]
        return still, retracted

    def _facts(self, row: Row) -> InstanceFacts | None:
        """What the rules see. A header that cannot be read (the file was validated
        at receive, so an I/O error or damaged storage) raises: the instance is set
        aside and tried again, visibly, rather than planned as if no conditional
        route matched it."""
        dataset = Dataset()
        if self._needs_header:
            try:
                dataset = read_header(self.store.absolute(row.path))
            except Exception as exc:
                raise OSError(f"cannot re-read {row.sop_instance_uid} for routing: {exc}") from exc
        return indexed_facts(row, dataset)

    def _plan_instance(
        self,
        conn: Connection,
        row: Row,
        facts: InstanceFacts | None,
        plans: Plans,
        matches: list[dict[str, object]],
        now: float,
    ) -> None:
        if self.loops.hold_echo(conn, row, now):
            return  # came back from where we just sent it: a loop (see queue/loops.py)
        for route in self.routes:
            if route.condition is None:
                matched = True
            else:
                matched = facts is not None and route.condition.evaluate(facts)
            if matched:
                matches.append(
                    {
                        "instance_id": row.id,
                        "route": route.name,
                        "generation": row.generation,
                        "matched_at": now,
                    }
                )
            trigger = route.config.trigger
            if trigger == "instance":
                if matched:
                    self._plan_forward(conn, route, row, "instance", row.sop_instance_uid, plans)
                continue
            uid = row.series_instance_uid if trigger == "series" else row.study_instance_uid
            self._arm_trigger(conn, route, trigger, uid, row.study_instance_uid, matched, now)

    def _arm_trigger(
        self,
        conn: Connection,
        route: CompiledRoute,
        level: str,
        uid: str,
        study_uid: str,
        matched: bool,
        now: float,
    ) -> None:
        existing = conn.execute(
            select(triggers.c.id).where(
                triggers.c.route == route.name, triggers.c.level == level, triggers.c.uid == uid
            )
        ).first()
        if existing is None:
            if matched:
                conn.execute(
                    triggers.insert().values(
                        route=route.name,
                        level=level,
                        uid=uid,
                        study_instance_uid=study_uid,
                        last_arrival=now,
                        pending=1,
                    )
                )
            return
        # Any new instance restarts the quiet period. After a route fired, a new
        # instance re-arms it: the follow-up sends only what was not sent yet.
        values: dict[str, object] = {"last_arrival": now}
        if matched or route.config.forward_level not in ("matched", "instance"):
            values["pending"] = 1
        conn.execute(update(triggers).where(triggers.c.id == existing.id).values(**values))

    # -- stable series/studies --------------------------------------------------------
    def fire_stable_triggers(self, now: float | None = None) -> int:
        """Fire armed triggers whose series/study has been quiet for ``stable_after``
        (``now`` is the clock the quiet time is measured against: the database's,
        unless given).

        Every node runs this. Each trigger is claimed before its plan is written:
        ``pending`` goes from 1 to 0 only where it is still 1 at the ``last_arrival``
        read, so a trigger another node fired meanwhile, or that a new arrival re-armed,
        is left alone (the write lock already serialises firers; the claim does not
        rely on it)."""
        by_name = {route.name: route for route in self.routes}
        fired = 0
        self.loops.prepare()
        with self.engine.begin() as conn:
            db_now = database_now(conn)
            now = db_now if now is None else now
            armed = conn.execute(select(triggers).where(triggers.c.pending == 1)).all()
            plans: Plans = {}
            self.loops.begin()
            self._groups = GroupChooser(conn, self.config, now)
            for trig in armed:
                route = by_name.get(trig.route)
                if route is None:  # route removed or disabled since
                    conn.execute(delete(triggers).where(triggers.c.id == trig.id))
                    continue
                if now - trig.last_arrival < route.config.stable_after:
                    continue
                claimed = conn.execute(
                    update(triggers)
                    .where(
                        triggers.c.id == trig.id,
                        triggers.c.pending == 1,
                        triggers.c.last_arrival == trig.last_arrival,
                    )
                    .values(pending=0, fired_at=now)
                ).rowcount
                if not claimed:
                    continue
                self._plan_trigger(conn, route, trig, plans)
                fired += 1
            # Due now in the database's time, even when a test moved ``now`` ahead.
            self._commit_plans(conn, plans, db_now)
        groups.log_moves(self._groups.moves)
        return fired

    def _plan_trigger(
        self,
        conn: Connection,
        route: CompiledRoute,
        trig: Row,
        plans: Plans,
    ) -> None:
        column = _LEVEL_COLUMN[trig.level]
        # Never what retention purged: its file is gone (a late instance re-arming a
        # study trigger must not queue the members deleted since).
        scope = conn.execute(
            select(instances)
            .where(column == trig.uid, instances.c.purged_at.is_(None))
            .order_by(instances.c.id)
        ).all()
        if not scope:
            return
        self._plan_forward(conn, route, scope[0], trig.level, trig.uid, plans, scope=scope)

    # -- what to send ----------------------------------------------------------------
    def _plan_forward(
        self,
        conn: Connection,
        route: CompiledRoute,
        row: Row,
        trigger_level: str,
        trigger_uid: str,
        plans: Plans,
        scope: Sequence[Row] | None = None,
    ) -> None:
        """Expand the route's ``forward`` into instances and merge them into ``plans``."""
        forward = route.config.forward_level
        members: Sequence[Row]
        if forward in ("matched", "instance"):
            if scope is None:
                members = [row]
            else:
                matched_ids = self._matched_ids(conn, route.name, [r.id for r in scope])
                members = [r for r in scope if (r.id, r.generation) in matched_ids]
            level, uid = trigger_level, trigger_uid
        elif forward == "series" and trigger_level == "study" and scope is not None:
            matched_ids = self._matched_ids(conn, route.name, [r.id for r in scope])
            wanted = {r.series_instance_uid for r in scope if (r.id, r.generation) in matched_ids}
            for series_uid in sorted(wanted):
                members = [r for r in scope if r.series_instance_uid == series_uid]
                self._merge(plans, route, "series", series_uid, row.study_instance_uid, members)
            return
        else:
            if forward == "patient" and not row.patient_id:
                forward = "study"  # no Patient ID: the study is the widest safe scope
            level = forward
            uid = {
                "series": row.series_instance_uid,
                "study": row.study_instance_uid,
                "patient": row.patient_id,
            }[forward]
            if scope is not None and level == trigger_level:
                members = scope
            else:
                members = list(
                    conn.execute(
                        select(
                            instances.c.id,
                            instances.c.generation,
                            instances.c.sop_instance_uid,
                            instances.c.calling_ae,
                            instances.c.source_address,
                        ).where(_LEVEL_COLUMN[level] == uid, instances.c.purged_at.is_(None))
                    ).all()
                )
        self._merge(plans, route, level, uid, row.study_instance_uid, members)

    @staticmethod
    def _matched_ids(conn: Connection, route: str, ids: list[int]) -> set[tuple[int, int]]:
        found: set[tuple[int, int]] = set()
        for start in range(0, len(ids), 500):
            found.update(
                (r.instance_id, r.generation)
                for r in conn.execute(
                    select(route_matches.c.instance_id, route_matches.c.generation).where(
                        and_(
                            route_matches.c.route == route,
                            route_matches.c.instance_id.in_(ids[start : start + 500]),
                        )
                    )
                )
            )
        return found

    def _merge(
        self,
        plans: Plans,
        route: CompiledRoute,
        level: str,
        uid: str,
        study_uid: str,
        members: Iterable[Row],
    ) -> None:
        transform = route.config.transform or ""
        priority = PRIORITY[route.config.priority]
        members = list(members)
        for named in route.config.to:
            dest, via = named, None
            if named in self._group_names:
                # A group: the study's member, chosen (or kept) in this transaction.
                assert self._groups is not None
                dest, via = self._groups.member(named, study_uid, len(members)), named
            key = (dest, level, uid, transform, via)
            plan = plans.get(key)
            if plan is None:
                dest_config = self.config.destinations[dest]
                plan = Delivery(dest, dest_config, level, uid, study_uid, transform=transform)
                plan.priority = priority
                plan.via_group = via
                plans[key] = plan
            plan.routes.add(route.name)
            plan.priority = max(plan.priority, priority)
            dest_config = self.config.destinations[dest]
            for member in self.loops.not_sent_back(dest, dest_config, study_uid, members):
                plan.members[member.id] = member.generation

    def _commit_plans(self, conn: Connection, plans: Plans, now: float) -> None:
        self.loops.record(conn, plans.values(), now)
        if plans:
            self.jobs.enqueue_many(conn, list(plans.values()), now)
