"""The node at a glance: version, uptime, counts, disk, destinations, throughput.

This is what the overview page and ``GET /api/v1/status`` show first, so it stays
cheap: a handful of aggregate queries on the read-only engine.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

from sqlalchemy import Engine, func, select

from dicomrouter import __version__
from dicomrouter.queue import states as S
from dicomrouter.store import heartbeat
from dicomrouter.store.dialect import int_part
from dicomrouter.store.schema import instances, job_instances, jobs

from .destinations import destination_summaries, recently_touched_jobs
from .errors import Invalid
from .jobs import orphaned_queues
from .loops import held_count
from .retention import retention_status
from .unplanned import summary as unplanned_summary

MAX_BUCKETS = 2000


def disk_status(ctx: Any) -> dict[str, Any]:
    """Free and total bytes of the storage filesystem, against ``min_free_space``
    (below it the receiver refuses C-STOREs)."""
    watermark = int(ctx.config.storage.min_free_space)
    try:
        usage = shutil.disk_usage(ctx.store.root)
    except OSError as exc:
        return {
            "free_bytes": None,
            "total_bytes": None,
            "watermark_bytes": watermark,
            "ok": False,
            "error": str(exc),
        }
    return {
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "watermark_bytes": watermark,
        "ok": usage.free >= watermark,
    }


_V = TypeVar("_V")


class _Recent:
    """A few seconds' memory of expensive aggregates, for pages that refresh
    themselves: ten open dashboards then cost one count over the index, not ten.
    Only callers that ask (``max_age``) get a remembered value; the API stays exact."""

    def __init__(self) -> None:
        self._values: dict[tuple[Any, ...], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...], max_age: float, compute: Callable[[], _V]) -> _V:
        now = time.monotonic()
        if max_age > 0:
            with self._lock:
                found = self._values.get(key)
            if found is not None and now - found[0] <= max_age:
                return found[1]  # type: ignore[no-any-return]
        value = compute()
        with self._lock:
            if len(self._values) > 64:
                self._values.clear()
            self._values[key] = (now, value)
        return value


_recent = _Recent()


def node_status(ctx: Any, max_age: float = 0.0) -> dict[str, Any]:
    """{version, started_at, uptime_s, counts: {instances, studies, jobs: {state: n}},
    disk: {free_bytes, total_bytes, watermark_bytes, ok}, destinations: [...],
    unplanned: {count, oldest_failed_at, items: [...]}, orphaned: [{destination, jobs,
    total, oldest_created_at}], processes: [{role, ok, reason, pid, heartbeat_age_s}],
    loops: {held}, retention: {as_of, stored, stored_bytes, eligible, eligible_bytes,
    kept_undelivered, kept_undelivered_bytes, purged, purged_bytes, last_run} (see
    control/retention.py)}.

    ``max_age`` > 0 lets the counts (a scan of the index) be up to that many seconds
    old; disk and destinations are always read now."""
    now = time.time()
    counts = _recent.get(("counts", id(ctx.reader)), max_age, lambda: _counts(ctx.reader))
    unplanned = unplanned_summary(ctx.reader)
    return {
        "version": __version__,
        "started_at": ctx.started_at,
        "uptime_s": max(0.0, now - ctx.started_at),
        "counts": counts,
        "disk": disk_status(ctx),
        "destinations": destination_summaries(ctx),
        # Instances that came back from a destination and wait for a release.
        "loops": {"held": held_count(ctx.reader)},
        # Acknowledged instances not planned yet (retried automatically), and open
        # jobs whose destination is no longer configured (moved or canceled by hand).
        "unplanned": asdict(unplanned),
        "orphaned": [asdict(q) for q in orphaned_queues(ctx.reader, ctx.config.destinations)],
        "processes": [
            asdict(check)
            for check in heartbeat.check(
                ctx.reader,
                ctx.config.node.name,
                heartbeat.required_roles(ctx.config.dicom.process_count),
            )
        ],
        "retention": _recent.get(
            ("retention", id(ctx.reader)),
            max_age,
            lambda: retention_status(ctx.reader).as_dict(),
        ),
    }


def _counts(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        instance_count = conn.execute(select(func.count()).select_from(instances)).scalar_one()
        study_count = conn.execute(
            select(func.count(func.distinct(instances.c.study_instance_uid)))
        ).scalar_one()
        by_state = {
            row[0]: int(row[1])
            for row in conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))
        }
    return {
        "instances": int(instance_count),
        "studies": int(study_count),
        "jobs": {state: int(by_state.get(state, 0)) for state in S.JOB_STATES},
    }


def throughput(
    engine: Engine, since: float, bucket_s: int, now: float | None = None, max_age: float = 0.0
) -> list[dict[str, Any]]:
    """Instances received, delivered (completed or warning) and failed per time
    bucket. ``received`` counts distinct instances at their latest reception (an
    instance received again moves to its new bucket), unlike the C-STORE counter
    ``dicomrouter_received_instances_total``, which counts every copy stored.
    Buckets run from ``since`` (rounded down to a whole bucket) to now; every bucket
    is listed, empty ones with zeros, so a chart needs no gap handling.

    Returns [{"t": bucket start (POSIX s), "received": n, "delivered": n, "failed": n}].
    ``max_age`` > 0 accepts a series computed up to that many seconds ago for the
    same window (rounded to whole buckets).
    """
    if max_age > 0:
        window = ("throughput", id(engine), int(since // max(bucket_s, 1)), bucket_s)
        return _recent.get(window, max_age, lambda: throughput(engine, since, bucket_s, now))
    now = time.time() if now is None else now
    if bucket_s < 1:
        raise Invalid("bucket_s must be at least 1 second")
    start = float(int(since // bucket_s) * bucket_s)
    count = int((now - start) // bucket_s) + 1
    if count > MAX_BUCKETS:
        raise Invalid(f"too many buckets ({count}); use a larger bucket_s or a later since")
    series = [
        {"t": start + i * bucket_s, "received": 0, "delivered": 0, "failed": 0}
        for i in range(max(count, 0))
    ]

    def bucket(column: Any) -> Any:
        return int_part((column - start) / bucket_s).label("b")

    with engine.connect() as conn:
        received = select(bucket(instances.c.received_at), func.count()).where(
            instances.c.received_at >= start
        )
        for b, n in conn.execute(received.group_by("b")):
            if 0 <= b < len(series):
                series[b]["received"] += int(n)
        settled = select(
            bucket(job_instances.c.updated_at), job_instances.c.state, func.count()
        ).where(
            job_instances.c.job_id.in_(recently_touched_jobs(start)),
            job_instances.c.updated_at >= start,
            job_instances.c.state.in_((S.ITEM_COMPLETED, S.ITEM_WARNING, S.ITEM_FAILED)),
        )
        for b, state, n in conn.execute(settled.group_by("b", job_instances.c.state)):
            if 0 <= b < len(series):
                key = "failed" if state == S.ITEM_FAILED else "delivered"
                series[b][key] += int(n)
    return series
