"""Received studies: search them, and trace where one of them went.

The trace answers the on-call question "where did this study go, when, and did it
arrive?" in one timeline: receptions (per instance, or per series and sender for a
big study), route matches with the reason (re-explained on one stored header),
every job queued for it, each delivery attempt and the final outcome.

Everything is aggregated in SQL (GROUP BY study, series, route, job), so a 3000-
instance study costs a handful of queries and one header read per matched route;
no query here scales with the number of instance files on disk.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, func, select

from dicomrouter.queue import states as S
from dicomrouter.store.dialect import like_any_case
from dicomrouter.store.schema import attempts, instances, job_instances, jobs, route_matches

from .loops import trace_events as loop_trace_events
from .routes import NodeContext, explain_match, newest_keys

#: Up to this many instances, the trace lists each reception; above, one event per
#: (series, sender) with counts and first/last times keeps the timeline readable.
PER_INSTANCE_EVENTS = 100
#: Likewise for jobs: a study routed instance by instance has one job per instance;
#: above this many, its job events are grouped per destination and kind.
PER_JOB_EVENTS = 100

_DELIVERED = (S.ITEM_COMPLETED, S.ITEM_WARNING)
_FINAL_KIND = {
    S.COMPLETED: "delivered",
    S.WARNING: "delivered",
    S.FAILED: "failed",
    S.CANCELED: "canceled",
}
# Events at the same instant read in pipeline order.
EVENT_ORDER = {
    "received": 0,
    "matched": 1,
    "loop": 1,
    "queued": 2,
    "attempt": 3,
    "delivered": 4,
    "failed": 4,
    "canceled": 4,
    "purged": 5,
}


def _like_pattern(value: str) -> str | None:
    """A SQL LIKE pattern for a DICOM wildcard value (``*`` any run, ``?`` one
    character), or None when ``value`` has no wildcard (then it is an equality)."""
    if "*" not in value and "?" not in value:
        return None
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _text_filter(column: Any, value: str) -> ColumnElement[bool]:
    pattern = _like_pattern(value.strip())
    if pattern is None:
        return column == value.strip()  # type: ignore[no-any-return]
    return like_any_case(column, pattern)  # letters in any case, on both databases


def _study_filters(
    patient_id: str | None,
    patient_name: str | None,
    accession_number: str | None,
    study_date_from: str | None,
    study_date_to: str | None,
    modality: str | None,
    calling_ae: str | None,
) -> list[ColumnElement[bool]]:
    """Conditions on instances; a study matches when any of its instances does."""
    conditions: list[ColumnElement[bool]] = []
    if patient_id:
        conditions.append(_text_filter(instances.c.patient_id, patient_id))
    if patient_name:
        conditions.append(_text_filter(instances.c.patient_name, patient_name))
    if accession_number:
        conditions.append(_text_filter(instances.c.accession_number, accession_number))
    if study_date_from:
        conditions.append(instances.c.study_date >= study_date_from)
    if study_date_to:
        conditions.append(instances.c.study_date <= study_date_to)
    if study_date_from or study_date_to:
        conditions.append(instances.c.study_date != "")
    if modality:
        conditions.append(instances.c.modality == modality.strip().upper())
    if calling_ae:
        conditions.append(_text_filter(instances.c.calling_ae, calling_ae))
    return conditions


def search_studies(
    engine: Engine,
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
    accession_number: str | None = None,
    study_date_from: str | None = None,
    study_date_to: str | None = None,
    modality: str | None = None,
    calling_ae: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[int, list[dict[str, Any]]]:
    """Received studies matching every given filter, most recently received first.

    Text filters take DICOM wildcards (``DOE^*``, ``?123``); without one they are
    exact. Dates are ``YYYYMMDD`` bounds on the Study Date, both inclusive. Returns
    ``(total, page)``; each item is a study summary (see :func:`_summaries`).

    The page's study UIDs come from walking instances newest first
    (``ix_instances_received_at``, :func:`~.routes.newest_keys`); only those
    studies are then aggregated. A selective filter (accession, patient ID) is
    served by its own index instead, and a walk that does not settle within its
    budget falls back to grouping every matching row.
    """
    conditions = _study_filters(
        patient_id,
        patient_name,
        accession_number,
        study_date_from,
        study_date_to,
        modality,
        calling_ae,
    )
    uid = instances.c.study_instance_uid
    with engine.connect() as conn:
        # Exact, and ~10x cheaper than counting the grouped studies: it reads the
        # study UID index only (~30 ms on 1M instances without a filter).
        total = conn.execute(select(func.count(uid.distinct())).where(*conditions)).scalar_one()
        newest = newest_keys(
            conn,
            select(instances.c.received_at, uid)
            .where(*conditions)
            .order_by(instances.c.received_at.desc()),
            offset + limit,
        )
        if newest is not None:
            page = [key for key, _ in newest[offset:]]
        else:  # the walk did not settle the page: group every matching row
            last = func.max(instances.c.received_at)
            page = list(
                conn.execute(
                    select(uid)
                    .where(*conditions)
                    .group_by(uid)
                    .order_by(last.desc(), uid)
                    .limit(limit)
                    .offset(offset)
                ).scalars()
            )
        summaries = _summaries(conn, page)
    return int(total), [summaries[u] for u in page if u in summaries]


def study_summary(engine: Engine, study_uid: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        return _summaries(conn, [study_uid]).get(study_uid)


def _summaries(conn: Connection, study_uids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per study: identity (from its latest instance), modalities, senders, counts,
    first/last reception and jobs by state. Four grouped queries for the whole page."""
    if not study_uids:
        return {}
    uid = instances.c.study_instance_uid
    in_page = uid.in_(list(study_uids))
    result: dict[str, dict[str, Any]] = {}
    for row in conn.execute(
        select(
            uid,
            func.count().label("instances"),
            func.count(instances.c.series_instance_uid.distinct()).label("series"),
            func.min(instances.c.received_at).label("first"),
            func.max(instances.c.received_at).label("last"),
            func.max(instances.c.id).label("latest_id"),
            func.count(instances.c.purged_at).label("purged"),
            func.max(instances.c.purged_at).label("purged_at"),
        )
        .where(in_page)
        .group_by(uid)
    ):
        result[row.study_instance_uid] = {
            "study_instance_uid": row.study_instance_uid,
            "instances": row.instances,
            "series": row.series,
            "first_received_at": row.first,
            "last_received_at": row.last,
            # Instances whose stored copy retention deleted, and when it last did.
            "purged": row.purged,
            "purged_at": row.purged_at,
            "modalities": [],
            "calling_aes": [],
            "deliveries": {},
            "_latest": row.latest_id,
        }
    latest = {entry.pop("_latest"): entry for entry in result.values()}
    for row in conn.execute(
        select(
            instances.c.id,
            instances.c.patient_id,
            instances.c.patient_name,
            instances.c.accession_number,
            instances.c.study_date,
            instances.c.study_description,
        ).where(instances.c.id.in_(list(latest)))
    ):
        latest[row.id].update(
            patient_id=row.patient_id,
            patient_name=row.patient_name,
            accession_number=row.accession_number,
            study_date=row.study_date,
            study_description=row.study_description,
        )
    for column, key in (
        (instances.c.modality, "modalities"),
        (instances.c.calling_ae, "calling_aes"),
    ):
        for row in conn.execute(
            select(uid, column).where(in_page).group_by(uid, column).order_by(uid, column)
        ):
            if row[1]:
                result[row[0]][key].append(row[1])
    for row in conn.execute(
        select(jobs.c.study_instance_uid, jobs.c.state, func.count().label("n"))
        .where(jobs.c.study_instance_uid.in_(list(study_uids)))
        .group_by(jobs.c.study_instance_uid, jobs.c.state)
    ):
        if row.study_instance_uid in result:
            result[row.study_instance_uid]["deliveries"][row.state] = row.n
    return result


# -- the trace ----------------------------------------------------------------------


def study_trace(ctx: NodeContext, study_uid: str) -> dict[str, Any] | None:
    """Where this study went: ``{study, events, deliveries, routes}``, or None when
    no instance of it was ever received.

    ``events`` are ordered by time (``at``, POSIX seconds); each has a ``kind``:
    ``received``, ``matched`` (with ``reason``), ``queued``, ``attempt``, one of
    ``delivered``/``failed``/``canceled`` per finished job, ``loop`` where a loop
    guard held instances or did not send them back to their sender, and ``purged``
    (when retention deleted the stored copies, how many, and why: one event per reason).
    ``deliveries`` has one entry per job with its instance counts and attempts.
    """
    engine = ctx.reader
    with engine.connect() as conn:
        summary = _summaries(conn, [study_uid]).get(study_uid)
        if summary is None:
            return None
        events = _received_events(conn, study_uid, summary["instances"])
        matches = _match_groups(conn, study_uid)
        deliveries = _deliveries(conn, study_uid)
        loop_decisions = loop_trace_events(conn, study_uid)
        events.extend(_purge_events(conn, study_uid))
    for match in matches:
        explanation = explain_match(ctx.config, ctx.store, match.pop("_sample"), match["route"])
        match.update(explanation)
        events.append(match)
    job_events = [event for job in deliveries for event in _job_events(job)]
    events.extend(group_job_events(job_events) if len(deliveries) > PER_JOB_EVENTS else job_events)
    events.extend(loop_decisions)
    events.sort(key=lambda e: (e["at"], EVENT_ORDER[e["kind"]]))
    return {"study": summary, "events": events, "deliveries": deliveries}


def series_deliveries(ctx: NodeContext, study_uid: str) -> list[dict[str, Any]]:
    """The study's deliveries per series and destination, for a trace a person reads
    (a 1000-instance study routed instance by instance has a thousand jobs): each
    ``{series_instance_uid, modality, destination, instances, delivered, warning,
    failed, pending, canceled, skipped, sent_as, jobs, last_at, errors,
    instance_rows}``, where ``instance_rows`` has one row per instance and delivery
    (SOP Instance UID, job, state, DIMSE status, message, when, how it was sent and
    under which UID), ``sent_as`` the distinct ways it was sent (pipelines and
    versions), and ``errors`` the distinct failure messages
    (at most 5). The same whatever the jobs' level: counts come from the per-instance
    rows, in one query."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    query = (
        select(
            instances.c.series_instance_uid,
            instances.c.modality,
            instances.c.sop_instance_uid,
            job_instances.c.job_id,
            job_instances.c.destination,
            job_instances.c.state,
            job_instances.c.status,
            job_instances.c.message,
            job_instances.c.updated_at,
            job_instances.c.sent_as,
            job_instances.c.sent_uid,
            job_instances.c.commitment,
        )
        .join(instances, instances.c.id == job_instances.c.instance_id)
        .where(instances.c.study_instance_uid == study_uid)
        .order_by(
            instances.c.series_instance_uid,
            job_instances.c.destination,
            instances.c.received_at,
            instances.c.id,
            job_instances.c.job_id,
        )
    )
    with ctx.reader.connect() as conn:
        for row in conn.execute(query):
            key = (row.series_instance_uid, row.destination)
            group = groups.get(key)
            if group is None:
                group = groups[key] = {
                    "series_instance_uid": row.series_instance_uid,
                    "modality": row.modality,
                    "destination": row.destination,
                    "instances": 0,
                    **{state: 0 for state in ("delivered", "warning", "failed", "pending")},
                    "canceled": 0,
                    "skipped": 0,
                    "sent_as": set(),
                    "jobs": set(),
                    "last_at": row.updated_at,
                    "errors": [],
                    "instance_rows": [],
                }
            group["instances"] += 1
            if row.state in _DELIVERED:
                group["delivered"] += 1
            if row.state == S.ITEM_WARNING:
                group["warning"] += 1
            elif row.state in (S.ITEM_FAILED, S.ITEM_PENDING, S.ITEM_CANCELED, S.ITEM_SKIPPED):
                group[row.state] += 1
            if row.sent_as:
                group["sent_as"].add(row.sent_as)
            errors, message = group["errors"], row.message
            if row.state == S.ITEM_FAILED and message and message not in errors[:5]:
                errors.append(message)
            group["jobs"].add(row.job_id)
            group["last_at"] = max(group["last_at"], row.updated_at)
            group["instance_rows"].append(
                {
                    "sop_instance_uid": row.sop_instance_uid,
                    "job_id": row.job_id,
                    "state": row.state,
                    "status": row.status,
                    "message": row.message,
                    "updated_at": row.updated_at,
                    "sent_as": row.sent_as,
                    "sent_uid": row.sent_uid,
                    "commitment": row.commitment,
                }
            )
    result = list(groups.values())
    for group in result:
        group["jobs"] = sorted(group["jobs"])
        group["sent_as"] = sorted(group["sent_as"])
        group["errors"] = group["errors"][:5]
    return result


def _received_events(conn: Connection, study_uid: str, count: int) -> list[dict[str, Any]]:
    where = instances.c.study_instance_uid == study_uid
    if count <= PER_INSTANCE_EVENTS:
        return [
            {
                "at": row.received_at,
                "kind": "received",
                "sop_instance_uid": row.sop_instance_uid,
                "series_instance_uid": row.series_instance_uid,
                "modality": row.modality,
                "calling_ae": row.calling_ae,
                "called_ae": row.called_ae,
                "source_address": row.source_address,
                "generation": row.generation,
                "size": row.size,
            }
            for row in conn.execute(
                select(instances).where(where).order_by(instances.c.received_at, instances.c.id)
            )
        ]
    sender = (
        instances.c.series_instance_uid,
        instances.c.modality,
        instances.c.calling_ae,
        instances.c.called_ae,
        instances.c.source_address,
    )
    return [
        {
            "at": row.first,
            "kind": "received",
            "series_instance_uid": row.series_instance_uid,
            "modality": row.modality,
            "calling_ae": row.calling_ae,
            "called_ae": row.called_ae,
            "source_address": row.source_address,
            "instances": row.n,
            "bytes": row.bytes,
            "first_at": row.first,
            "last_at": row.last,
        }
        for row in conn.execute(
            select(
                *sender,
                func.count().label("n"),
                func.sum(instances.c.size).label("bytes"),
                func.min(instances.c.received_at).label("first"),
                func.max(instances.c.received_at).label("last"),
            )
            .where(where)
            .group_by(*sender)
        )
    ]


def _purge_events(conn: Connection, study_uid: str) -> list[dict[str, Any]]:
    """One ``purged`` event per reason: the study's history stays after its files go."""
    return [
        {
            "at": row.first,
            "kind": "purged",
            "instances": row.n,
            "bytes": row.bytes,
            "reason": row.purge_reason,
            "first_at": row.first,
            "last_at": row.last,
        }
        for row in conn.execute(
            select(
                instances.c.purge_reason,
                func.count().label("n"),
                func.sum(instances.c.size).label("bytes"),
                func.min(instances.c.purged_at).label("first"),
                func.max(instances.c.purged_at).label("last"),
            )
            .where(instances.c.study_instance_uid == study_uid, instances.c.purged_at.is_not(None))
            .group_by(instances.c.purge_reason)
        )
    ]


def _match_groups(conn: Connection, study_uid: str) -> list[dict[str, Any]]:
    """One ``matched`` event per route: how many instances, when, and one sample
    instance row whose stored header will explain the match."""
    rows = conn.execute(
        select(
            route_matches.c.route,
            func.count().label("n"),
            func.min(route_matches.c.matched_at).label("first"),
            func.max(route_matches.c.matched_at).label("last"),
            func.min(instances.c.id).label("sample"),
        )
        .join(instances, instances.c.id == route_matches.c.instance_id)
        .where(instances.c.study_instance_uid == study_uid)
        .group_by(route_matches.c.route)
    ).all()
    samples = {
        row.id: row
        for row in conn.execute(
            select(instances).where(instances.c.id.in_([r.sample for r in rows]))
        )
    }
    return [
        {
            "at": row.first,
            "kind": "matched",
            "route": row.route,
            "instances": row.n,
            "first_at": row.first,
            "last_at": row.last,
            "_sample": samples[row.sample],
        }
        for row in rows
    ]


def _deliveries(conn: Connection, study_uid: str) -> list[dict[str, Any]]:
    job_rows = conn.execute(
        select(jobs).where(jobs.c.study_instance_uid == study_uid).order_by(jobs.c.id)
    ).all()
    ids = [row.id for row in job_rows]
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    tries: dict[int, list[dict[str, Any]]] = defaultdict(list)
    sent_as: dict[int, list[str]] = defaultdict(list)
    for chunk in _chunks(ids):
        for row in conn.execute(
            select(job_instances.c.job_id, job_instances.c.state, func.count().label("n"))
            .where(job_instances.c.job_id.in_(chunk))
            .group_by(job_instances.c.job_id, job_instances.c.state)
        ):
            counts[row.job_id][row.state] = row.n
        for row in conn.execute(
            select(job_instances.c.job_id, job_instances.c.sent_as)
            .where(job_instances.c.job_id.in_(chunk), job_instances.c.sent_as.is_not(None))
            .group_by(job_instances.c.job_id, job_instances.c.sent_as)
        ):
            sent_as[row.job_id].append(row.sent_as)
        for row in conn.execute(
            select(attempts).where(attempts.c.job_id.in_(chunk)).order_by(attempts.c.id)
        ):
            tries[row.job_id].append(dict(row._mapping))
    deliveries = []
    for row in job_rows:
        by_state = counts[row.id]
        deliveries.append(
            {
                "job_id": row.id,
                "destination": row.destination,
                "routes": [r for r in (row.routes or "").split(",") if r],
                "level": row.level,
                "resource_uid": row.resource_uid,
                "state": row.state,
                "priority": row.priority,
                "transform": row.transform or None,
                "via_group": row.via_group,
                "sent_as": sorted(sent_as[row.id]),
                "created_at": row.created_at,
                "updated_at": row.updated_at,
                "finished_at": row.finished_at,
                "last_error": row.last_error,
                "instances": sum(by_state.values()),
                "delivered": sum(by_state.get(s, 0) for s in _DELIVERED),
                "warning": by_state.get(S.ITEM_WARNING, 0),
                "failed": by_state.get(S.ITEM_FAILED, 0),
                "pending": by_state.get(S.ITEM_PENDING, 0),
                "canceled": by_state.get(S.ITEM_CANCELED, 0),
                "skipped": by_state.get(S.ITEM_SKIPPED, 0),
                "attempts": tries[row.id],
            }
        )
    return deliveries


def _job_events(job: dict[str, Any]) -> list[dict[str, Any]]:
    common = {
        "job_id": job["job_id"],
        "destination": job["destination"],
        "via_group": job["via_group"],  # the group that chose this destination, if any
    }
    events: list[dict[str, Any]] = [
        {
            "at": job["created_at"],
            "kind": "queued",
            **common,
            "routes": job["routes"],
            "level": job["level"],
            "instances": job["instances"],
            "transform": job["transform"],
        }
    ]
    for attempt in job["attempts"]:
        events.append(
            {
                "at": attempt["started_at"],
                "kind": "attempt",
                **common,
                "ended_at": attempt["ended_at"],
                "outcome": attempt["outcome"],
                "sent": attempt["sent"],
                "failed": attempt["failed"],
                "message": attempt["message"],
            }
        )
    kind = _FINAL_KIND.get(job["state"])
    if kind is not None:
        events.append(
            {
                "at": job["finished_at"] or job["updated_at"],
                "kind": kind,
                **common,
                "state": job["state"],
                "delivered": job["delivered"],
                "failed": job["failed"],
                "skipped": job["skipped"],
                "sent_as": job["sent_as"],
                "message": job["last_error"],
            }
        )
    return events


def group_job_events(job_events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One event per (kind, destination, outcome or state): how many jobs, instances
    and when (first/last), so a 3000-job study stays a readable timeline."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for event in job_events:
        key = (event["kind"], event["destination"], event.get("outcome") or event.get("state", ""))
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "at": event["at"],
                "kind": event["kind"],
                "destination": event["destination"],
                "via_group": event.get("via_group"),
                "jobs": 0,
                "first_at": event["at"],
                "last_at": event["at"],
                "job_ids": [],
            }
            for name in ("outcome", "state", "message", "level", "routes"):
                if name in event:
                    group[name] = event[name]
        group["jobs"] += 1
        group["at"] = group["first_at"] = min(group["first_at"], event["at"])
        group["last_at"] = max(group["last_at"], event["at"])
        if len(group["job_ids"]) < 20:
            group["job_ids"].append(event["job_id"])
        for count in ("instances", "delivered", "failed", "sent"):
            if count in event:
                group[count] = group.get(count, 0) + (event[count] or 0)
    return list(groups.values())


def _chunks(values: Sequence[int], size: int = 500) -> Iterable[Sequence[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
