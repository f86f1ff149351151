"""Retention as operators see it: what is stored, eligible, purged, kept; purge by hand.

The status, the dashboard, ``/metrics`` and ``dicomrouter purge`` all read and act
through here. Counts that need a scan of every stored object's deliveries
(eligible, kept because undelivered) are the ones the last purge run recorded, so
reading them costs one indexed row; the time of that run is shown beside them.
What is stored is counted now, from an index that covers it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, func, select

from dicomrouter.config import RouterConfig
from dicomrouter.retention import Purger, PurgeReport
from dicomrouter.retention.sweeper import record
from dicomrouter.store import ObjectStore
from dicomrouter.store.schema import instances, purge_runs


@dataclass(frozen=True)
class LastRun:
    started_at: float
    ended_at: float | None
    actor: str
    purged: int
    purged_bytes: int
    evicted: int
    orphans: int
    error: str | None


@dataclass(frozen=True)
class RetentionStatus:
    """``stored``: now. Eligible and kept: as of the last completed purge run
    (``as_of``; None: no run yet)."""

    as_of: float | None
    stored: int
    stored_bytes: int
    eligible: int
    eligible_bytes: int
    kept_undelivered: int
    kept_undelivered_bytes: int
    #: Totals over the purge runs still in history (``keep_history``).
    purged: int
    purged_bytes: int
    last_run: LastRun | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def retention_status(engine: Engine) -> RetentionStatus:
    """Stored objects and bytes now (read from ``ix_instances_live`` alone); eligible
    and kept as the last run recorded them; purged totals over the runs kept."""
    with engine.connect() as conn:
        stored = conn.execute(
            select(func.count(), func.coalesce(func.sum(instances.c.size), 0)).where(
                instances.c.purged_at.is_(None)
            )
        ).one()
        snapshot = conn.execute(
            select(purge_runs)
            .where(purge_runs.c.ended_at.is_not(None), purge_runs.c.error.is_(None))
            .order_by(purge_runs.c.id.desc())
            .limit(1)
        ).first()
        last = conn.execute(select(purge_runs).order_by(purge_runs.c.id.desc()).limit(1)).first()
        totals = conn.execute(
            select(
                func.coalesce(func.sum(purge_runs.c.purged), 0),
                func.coalesce(func.sum(purge_runs.c.purged_bytes), 0),
            )
        ).one()
    last_run = (
        None
        if last is None
        else LastRun(
            started_at=last.started_at,
            ended_at=last.ended_at,
            actor=last.actor,
            purged=last.purged,
            purged_bytes=last.purged_bytes,
            evicted=last.evicted,
            orphans=last.orphans,
            error=last.error,
        )
    )
    if snapshot is None:
        return RetentionStatus(
            None,
            int(stored[0]),
            int(stored[1]),
            0,
            0,
            0,
            0,
            int(totals[0]),
            int(totals[1]),
            last_run,
        )
    return RetentionStatus(
        as_of=snapshot.ended_at,
        stored=int(stored[0]),
        stored_bytes=int(stored[1]),
        eligible=snapshot.eligible,
        eligible_bytes=snapshot.eligible_bytes,
        kept_undelivered=snapshot.undelivered,
        kept_undelivered_bytes=snapshot.undelivered_bytes,
        purged=int(totals[0]),
        purged_bytes=int(totals[1]),
        last_run=last_run,
    )


def purge(
    config: RouterConfig,
    engine: Engine,
    store: ObjectStore,
    *,
    actor: str,
    source: str,
    dry_run: bool = False,
) -> PurgeReport:
    """Run a retention pass now (every step, orphans included), audited as ``actor``.
    Raises ``retention.PurgeBusy`` while another pass runs."""
    purger = Purger(config, engine, store)
    try:
        report = purger.run(dry_run=dry_run, actor=actor, scan_orphans=True)
    finally:
        purger.close()
    record(engine, report, actor, source)
    return report
