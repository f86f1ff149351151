"""Destinations for operators: live state, queue depth, failure rate; pause, resume, echo.

The live state combines three sources, in this order of precedence:

- ``disabled``: ``enabled: false`` in the configuration (its queue stays unsent);
- ``paused``: paused by an operator (``destination_state.admin_paused``); the
  dispatch process stops claiming its jobs within a second and does not probe it;
- ``probing``: paused automatically after failed connections, probed (C-ECHO, a test write...)
  (``destination_state.state == "paused"``, see :mod:`dicomrouter.dispatch.health`);
- ``ok`` otherwise.

The naming itself is :func:`dicomrouter.queue.states.destination_state`, the one
the metrics and the CLI use too.

Numbers are computed from the index on each call, so the API, the dashboard and the
CLI agree with what the dispatcher actually did.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, case, func, or_, select, update

from dicomrouter.config import DicomDestinationConfig, GroupDestinationConfig
from dicomrouter.destinations import SenderOptions, VerificationNotSupported, create_sender
from dicomrouter.queue import JobStore
from dicomrouter.queue import states as S
from dicomrouter.store import audit
from dicomrouter.store.dialect import database_now
from dicomrouter.store.schema import attempts, destination_state, job_instances, jobs

from .errors import Conflict, Invalid, NotFound

DestinationState = S.DestinationState
OK = DestinationState.OK
PAUSED = DestinationState.PAUSED
PROBING = DestinationState.PROBING
DISABLED = DestinationState.DISABLED
HOUR = 3600.0
_ERROR_OUTCOMES = ("retry", "failed", "unavailable")


def recently_touched_jobs(since: float) -> Any:
    """Ids of jobs whose instances may have changed since ``since``.

    ``job_instances.updated_at`` has no index, but a job's own ``updated_at`` moves
    on every settle, release, recovery or manual action, which always follow its
    instances' updates; only a job still in progress may hold newer instance rows.
    """
    return select(jobs.c.id).where(or_(jobs.c.updated_at >= since, jobs.c.state == S.IN_PROGRESS))


def _queues(conn: Connection) -> dict[str, dict[str, int]]:
    queues: dict[str, dict[str, int]] = {}
    for row in conn.execute(
        select(jobs.c.destination, jobs.c.state, func.count()).group_by(
            jobs.c.destination, jobs.c.state
        )
    ):
        queues.setdefault(row[0], {})[row[1]] = int(row[2])
    return queues


def _group_queues(conn: Connection, groups: Any) -> dict[str, dict[str, int]]:
    """A group's queue: the jobs its members have through it (``via_group``)."""
    queues: dict[str, dict[str, int]] = {name: {} for name in groups}
    for row in conn.execute(
        select(jobs.c.via_group, jobs.c.state, func.count())
        .where(jobs.c.via_group.in_(list(groups)))
        .group_by(jobs.c.via_group, jobs.c.state)
    ):
        queues[row[0]][row[1]] = int(row[2])
    return queues


def _group_state(
    config: Any, group: GroupDestinationConfig, health: dict[str, Any]
) -> S.DestinationState:
    """A group is ``ok`` while one of its members is; else the most hopeful state of
    its members: ``probing`` (one comes back by itself), ``paused``, ``disabled``."""
    states = {
        S.destination_state(bool(config.destinations[m].enabled), health.get(m))
        for m in group.members
    }
    for state in (S.DestinationState.OK, S.DestinationState.PROBING, S.DestinationState.PAUSED):
        if state in states:
            return state
    return S.DestinationState.DISABLED


def _oldest_pending(conn: Connection) -> dict[str, float]:
    """Per destination, when its oldest late job (:data:`~dicomrouter.queue.states.LATE_STATES`:
    pending or in progress, not waiting for a send window) was created."""
    return {
        row[0]: float(row[1])
        for row in conn.execute(
            select(jobs.c.destination, func.min(jobs.c.created_at))
            .where(jobs.c.state.in_(S.LATE_STATES))
            .group_by(jobs.c.destination)
        )
    }


def _last_hour(conn: Connection, now: float) -> dict[str, dict[str, int]]:
    """Instances delivered / failed per destination in the last hour."""
    since = now - HOUR
    result: dict[str, dict[str, int]] = {}
    for row in conn.execute(
        select(job_instances.c.destination, job_instances.c.state, func.count())
        .where(
            job_instances.c.job_id.in_(recently_touched_jobs(since)),
            job_instances.c.updated_at >= since,
            job_instances.c.state.in_((S.ITEM_COMPLETED, S.ITEM_WARNING, S.ITEM_FAILED)),
        )
        .group_by(job_instances.c.destination, job_instances.c.state)
    ):
        entry = result.setdefault(row[0], {"delivered": 0, "failed": 0})
        entry["failed" if row[1] == S.ITEM_FAILED else "delivered"] += int(row[2])
    return result


def _last_success(conn: Connection) -> dict[str, float]:
    return {
        row[0]: float(row[1])
        for row in conn.execute(
            select(jobs.c.destination, func.max(jobs.c.finished_at))
            .where(jobs.c.state.in_((S.COMPLETED, S.WARNING)))
            .group_by(jobs.c.destination)
        )
        if row[1] is not None
    }


def _last_error(conn: Connection, name: str) -> tuple[float, str] | None:
    row = conn.execute(
        select(attempts.c.ended_at, attempts.c.message)
        .join(jobs, jobs.c.id == attempts.c.job_id)
        .where(
            jobs.c.destination == name,
            attempts.c.outcome.in_(_ERROR_OUTCOMES),
            attempts.c.message.is_not(None),
        )
        .order_by(attempts.c.id.desc())
        .limit(1)
    ).first()
    return (float(row.ended_at or 0.0), str(row.message)) if row else None


def _summaries(ctx: Any, only: str | None = None) -> list[dict[str, Any]]:
    now = time.time()
    config = ctx.config
    with ctx.reader.connect() as conn:
        queues = _queues(conn)
        if config.groups:
            queues.update(_group_queues(conn, config.groups))
        oldest = _oldest_pending(conn)
        hour = _last_hour(conn, now)
        success = _last_success(conn)
        health = {row.name: row for row in conn.execute(select(destination_state))}
        # Also list names that still have open jobs but left the configuration.
        names = list(config.destinations) + sorted(
            name
            for name, queue in queues.items()
            if name not in config.destinations and any(queue.get(s) for s in S.OPEN_STATES)
        )
        if only is not None:
            names = [n for n in names if n == only]
        result = []
        for name in names:
            dest = config.destinations.get(name)
            dicom = dest if isinstance(dest, DicomDestinationConfig) else None
            h = health.get(name)
            counts = hour.get(name, {"delivered": 0, "failed": 0})
            done = counts["delivered"] + counts["failed"]
            error = _last_error(conn, name)
            last_error, last_error_at = (error[1], error[0]) if error else (None, None)
            if h is not None and h.state == "paused" and h.last_error:
                last_error, last_error_at = h.last_error, h.updated_at  # fresher: the probe's
            started = oldest.get(name)
            state = S.destination_state(bool(dest and dest.enabled), h)
            if isinstance(dest, GroupDestinationConfig):
                state = _group_state(config, dest, health)
            last_success_at = max(
                [t for t in (success.get(name), h and h.last_success_at) if t], default=None
            )
            result.append(
                {
                    "name": name,
                    "configured": dest is not None,
                    "kind": dest.type if dest else None,
                    "address": dest.address if dest else None,
                    "probe": dest.probe_label if dest else None,
                    "ae_title": dicom.ae_title if dicom else None,
                    "host": dicom.host if dicom else None,
                    "port": dicom.port if dicom else None,
                    "enabled": bool(dest.enabled) if dest else False,
                    "state": state,
                    "queue": {s: queues.get(name, {}).get(s, 0) for s in S.JOB_STATES},
                    "oldest_pending_at": started,
                    "oldest_pending_age_s": max(0.0, now - started) if started else None,
                    "delivered_last_hour": counts["delivered"],
                    "failed_last_hour": counts["failed"],
                    "failure_rate": counts["failed"] / done if done else None,
                    "last_success_at": last_success_at,
                    "last_error": last_error,
                    "last_error_at": last_error_at,
                    "last_error_current": error_is_current(state, last_error_at, last_success_at),
                    "paused_since": h.paused_since if h is not None else None,
                    "consecutive_failures": h.consecutive_failures if h is not None else 0,
                }
            )
    return result


def error_is_current(
    state: str, last_error_at: float | None, last_success_at: float | None
) -> bool:
    """Whether a destination's last error describes it now: it is unreachable
    (``probing``), or nothing has been delivered since the error. An error before the
    last success is history."""
    if last_error_at is None:
        return False
    if state == PROBING:
        return True
    return last_success_at is None or last_error_at > last_success_at


def destination_summaries(ctx: Any) -> list[dict[str, Any]]:
    """Every configured destination (and any unconfigured one with open jobs), in
    configuration order.

    ``state`` is a :class:`DestinationState`; ``oldest_pending_*`` is the oldest job
    that should be going out (pending or in progress; jobs waiting for their send
    window are not late), as ``/metrics`` and the ``queue_stale`` alert count it;
    ``failure_rate`` is failed / (delivered + failed) instances over the last hour,
    ``None`` when nothing was sent (an unreachable destination sends nothing: its
    rate is unknown, not 0 %); ``last_error_current`` says whether ``last_error``
    (at ``last_error_at``) still describes the destination or is history."""
    return _summaries(ctx)


def destination_detail(ctx: Any, name: str) -> dict[str, Any] | None:
    """One destination, as in :func:`destination_summaries`; ``None`` if unknown."""
    found = _summaries(ctx, only=name)
    return found[0] if found else None


def _configured(ctx: Any, name: str) -> Any:
    dest = ctx.config.destinations.get(name)
    if dest is None:
        raise NotFound(f"no destination {name!r} in the configuration")
    _not_a_group(dest, name, "pause or resume")
    return dest


def _not_a_group(dest: Any, name: str, what: str) -> None:
    """A group sends nothing itself: what is done to a sender is done to its members."""
    if isinstance(dest, GroupDestinationConfig):
        raise Invalid(
            f"{name!r} is a group: {what} its members instead ({', '.join(dest.members)})"
        )


def pause(ctx: Any, name: str, actor: str, source: str = "") -> dict[str, Any]:
    """Stop sending to ``name`` until :func:`resume`: the dispatch process notices
    within a second; a batch already on the wire finishes. Raises :class:`Conflict`
    if it is already paused by an operator."""
    _configured(ctx, name)
    with ctx.engine.begin() as conn:
        now = database_now(conn)  # paused_since is compared with the database's time
        row = conn.execute(
            select(destination_state.c.admin_paused).where(destination_state.c.name == name)
        ).first()
        if row is not None and row.admin_paused:
            raise Conflict(f"destination {name!r} is already paused")
        if row is None:
            conn.execute(
                destination_state.insert().values(
                    name=name, state="ok", admin_paused=1, paused_since=now, updated_at=now
                )
            )
        else:
            conn.execute(
                update(destination_state)
                .where(destination_state.c.name == name)
                .values(
                    admin_paused=1,
                    paused_since=func.coalesce(destination_state.c.paused_since, now),
                    updated_at=now,
                )
            )
    audit.record(ctx.engine, actor, "destination.pause", name, source=source)
    detail = destination_detail(ctx, name)
    assert detail is not None
    return detail


def resume(ctx: Any, name: str, actor: str, source: str = "") -> dict[str, Any]:
    """Undo an operator's pause and pull the destination's queue forward (jobs
    waiting out a retry delay go now). An automatic pause (``probing``) is left to
    the C-ECHO probe; resuming a destination that is not paused by an operator
    raises :class:`Conflict`."""
    dest = _configured(ctx, name)
    with ctx.engine.begin() as conn:
        now = database_now(conn)
        changed = conn.execute(
            update(destination_state)
            .where(destination_state.c.name == name, destination_state.c.admin_paused != 0)
            .values(
                admin_paused=0,
                # Keep the start of an automatic pause that is still going on.
                paused_since=case(
                    (destination_state.c.state == "paused", destination_state.c.paused_since),
                    else_=None,
                ),
                updated_at=now,
            )
        ).rowcount
    if not changed:
        raise Conflict(f"destination {name!r} is not paused by an operator")
    woken = JobStore(ctx.engine).wake_destination(name, dest)
    audit.record(
        ctx.engine, actor, "destination.resume", name, source=source, detail={"jobs": woken}
    )
    detail = destination_detail(ctx, name)
    assert detail is not None
    return detail


def echo_destination(config: Any, name: str) -> dict[str, Any]:
    """Probe the configured destination ``name`` now, as a paused one is probed
    (DICOM: a C-ECHO with the same calling AE title and timeouts as deliveries;
    folder: a test write); not audited (see :func:`echo`).

    Returns {"ok", "ms", "error"}. A peer that accepts the association but not the
    Verification SOP Class is up (``ok``), with that said in ``error``. Raises
    :class:`NotFound` for a name the configuration does not have.
    """
    dest = config.destinations.get(name)
    if dest is None:
        known = ", ".join(config.destinations) or "none configured"
        raise NotFound(f"no destination {name!r} in the configuration (known: {known})")
    _not_a_group(dest, name, "echo")
    # The registry imports the kind's sender (pynetdicom for DICOM) only now.
    sender = create_sender(dest, SenderOptions(calling_ae=config.ae_title, name=name))
    started = time.perf_counter()
    ok, error = True, None
    try:
        sender.probe()
    except VerificationNotSupported as exc:
        error = f"answered, but does not support C-ECHO: {exc}"
    except Exception as exc:  # any failure is the answer to "can we reach it?"
        ok, error = False, str(exc) or type(exc).__name__
    finally:
        sender.close()
    return {"ok": ok, "ms": round((time.perf_counter() - started) * 1000, 1), "error": error}


def echo(ctx: Any, name: str, *, actor: str = audit.SYSTEM, source: str = "") -> dict[str, Any]:
    """:func:`echo_destination`, audited as ``destination.echo``."""
    result = echo_destination(ctx.config, name)
    audit.record(
        ctx.engine,
        actor,
        "destination.echo",
        name,
        outcome="ok" if result["ok"] else "failed",
        source=source,
        detail=result,
    )
    return result
