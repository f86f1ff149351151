"""Instances waiting to be planned again, for operators: what, why, and re-plan now.

The planner retries them by itself (see :mod:`dicomrouter.queue.unplanned`); an
operator who fixed the cause (freed disk, repaired the index) need not wait for the
next try. Re-planning is audited as ``instance.replan``.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine

from dicomrouter.queue import unplanned as queue_unplanned
from dicomrouter.queue.unplanned import UnplannedInstance, UnplannedSummary
from dicomrouter.store import audit

from .errors import NotFound

__all__ = ["UnplannedInstance", "UnplannedSummary", "replan", "summary"]


def summary(engine: Engine, limit: int = queue_unplanned.LISTED) -> UnplannedSummary:
    """How many instances wait to be planned again, and the oldest ``limit``."""
    return queue_unplanned.summary(engine, limit)


def replan(
    engine: Engine,
    instance_ids: Sequence[int] | None = None,
    *,
    actor: str = audit.SYSTEM,
    source: str = "",
) -> int:
    """Have the planner try these set-aside instances (None: all of them) on its next
    pass, within a second or so. Returns how many; :class:`NotFound` if none waits."""
    ids = list(dict.fromkeys(instance_ids)) if instance_ids is not None else None
    changed = queue_unplanned.replan_now(engine, ids)
    audit.record(
        engine,
        actor,
        "instance.replan",
        "all unplanned instances" if ids is None else f"{len(ids)} instance(s)",
        outcome="ok" if changed else "failed",
        source=source,
        detail={"ids": ids[:100] if ids is not None else None, "changed": changed},
    )
    if not changed:
        raise NotFound("no such instance waits to be planned")
    return changed
