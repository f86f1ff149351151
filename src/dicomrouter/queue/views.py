"""Read-only views of the queue, under the control plane's (``control.jobs``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, case, func, select

from dicomrouter.store.schema import attempts, instances, job_instances, jobs


def list_jobs(
    engine: Engine,
    state: str | None = None,
    destination: str | None = None,
    study_uid: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    counts = (
        select(
            job_instances.c.job_id,
            func.count().label("total"),
            func.sum(case((job_instances.c.state.in_(("completed", "warning")), 1), else_=0)).label(
                "delivered"
            ),
        )
        .group_by(job_instances.c.job_id)
        .subquery()
    )
    query = (
        select(jobs, counts.c.total, counts.c.delivered)
        .join(counts, counts.c.job_id == jobs.c.id, isouter=True)
        .order_by(jobs.c.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(jobs.c.state == state)
    if destination:
        query = query.where(jobs.c.destination == destination)
    if study_uid:
        query = query.where(jobs.c.study_instance_uid == study_uid)
    with engine.connect() as conn:
        return [_job_dict(row) for row in conn.execute(query)]


def job_detail(engine: Engine, job_id: int) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            return None
        detail = _job_dict(row)
        detail["instances"] = [
            dict(r._mapping)
            for r in conn.execute(
                select(
                    instances.c.sop_instance_uid,
                    instances.c.series_instance_uid,
                    job_instances.c.state,
                    job_instances.c.status,
                    job_instances.c.message,
                    job_instances.c.updated_at,
                    job_instances.c.sent_as,
                    job_instances.c.sent_uid,
                    job_instances.c.commitment,
                )
                .join(instances, instances.c.id == job_instances.c.instance_id)
                .where(job_instances.c.job_id == job_id)
                .order_by(instances.c.id)
            )
        ]
        detail["attempts"] = [
            dict(r._mapping)
            for r in conn.execute(
                select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.id)
            )
        ]
    return detail


def _job_dict(row: Any) -> dict[str, Any]:
    data = dict(row._mapping)
    data["routes"] = [r for r in (data.get("routes") or "").split(",") if r]
    return data
