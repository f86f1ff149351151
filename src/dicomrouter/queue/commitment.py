"""Storage commitment bookkeeping in the index: open transactions, reports, timeouts.

A transaction is written (``commitments`` row, deliveries ``pending``) *before* its
N-ACTION goes out, so a report that comes back at once on our listener, in another
process, finds it. The report settles each delivery named in it: ``committed``, or
``failed`` with its Failure Reason. Deliveries still ``pending`` at the deadline,
or reported failed, go as the destination's ``on_timeout`` says: ``warn`` leaves
them ``failed``, ``resend`` puts them back in the queue (state ``pending``, the
commitment cleared, the job pending again), so the next batch sends them and asks
again. Each resend uses one of the job's delivery attempts: once
``retry.max_attempts`` are used up, the commitment stays ``failed`` (and alerts), so a
destination that never commits is not sent the same study forever. A destination
that refuses the commitment SOP class never gets a resend: sending again cannot
make it commit.

Deadlines are in the database's clock: one node opens a transaction, and any node's
dispatcher may find it past its deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, and_, func, insert, select, update

from dicomrouter.config import DicomDestinationConfig
from dicomrouter.dicomnet import CommandField, Reply, Request, Status
from dicomrouter.dicomnet.commitment import (
    STORAGE_COMMITMENT_PUSH,
    decode_report,
    describe_failure,
)
from dicomrouter.dicomnet.pdu import ProtocolError
from dicomrouter.store.dialect import database_now
from dicomrouter.store.schema import commitments, instances, job_instances, jobs

from . import states as S

log = logging.getLogger("dicomrouter.commitment")

PENDING = "pending"
COMMITTED = "committed"
FAILED = "failed"
#: Transaction states beyond those: no report in time, or the N-ACTION refused.
TIMED_OUT = "timed_out"
REFUSED = "refused"


@dataclass(frozen=True)
class Policy:
    """What a destination's ``storage_commitment`` and ``retry`` say to do when a
    commitment fails."""

    timeout: float
    on_timeout: str
    """``warn`` or ``resend``."""
    max_attempts: int
    """``retry.max_attempts``: resends stop once a job has used them up."""


#: A destination no longer configured: its failures are only recorded.
WARN_ONLY = Policy(0.0, "warn", 1)


@dataclass(frozen=True)
class Delivery:
    """One delivery to commit: its keys and the SOP instance the destination holds."""

    job_id: int
    instance_id: int
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Settled:
    """What a report or a timeout did to a transaction."""

    destination: str
    committed: int
    failed: int
    resent: int


def open_transaction(
    engine: Engine,
    transaction_uid: str,
    destination: str,
    deliveries: Sequence[Delivery],
    timeout: float,
    now: float | None = None,
) -> None:
    job_ids = sorted({d.job_id for d in deliveries})
    with engine.begin() as conn:
        now = database_now(conn) if now is None else now
        conn.execute(
            insert(commitments).values(
                transaction_uid=transaction_uid,
                destination=destination,
                job_ids=",".join(map(str, job_ids)),
                sent_at=now,
                deadline=now + timeout,
                state=PENDING,
                instances=len(deliveries),
                failed=0,
            )
        )
        for d in deliveries:
            conn.execute(
                update(job_instances)
                .where(
                    job_instances.c.job_id == d.job_id,
                    job_instances.c.instance_id == d.instance_id,
                )
                .values(commitment=PENDING, commitment_uid=transaction_uid)
            )


def _pending_rows(conn: Connection, transaction_uid: str) -> list[tuple[int, int, str]]:
    rows = conn.execute(
        # The SOP Instance UID the destination holds (a transform may have changed it).
        select(
            job_instances.c.job_id,
            job_instances.c.instance_id,
            func.coalesce(job_instances.c.sent_uid, instances.c.sop_instance_uid),
        )
        .join(instances, instances.c.id == job_instances.c.instance_id)
        .where(
            job_instances.c.commitment_uid == transaction_uid,
            job_instances.c.commitment == PENDING,
        )
    ).all()
    return [(int(r[0]), int(r[1]), str(r[2])) for r in rows]


def record_report(
    engine: Engine,
    transaction_uid: str,
    committed: Iterable[str],
    failed: Mapping[str, str],
    on_failure: Policy,
    now: float | None = None,
) -> Settled | None:
    """Apply an N-EVENT-REPORT: ``committed`` SOP Instance UIDs, ``failed`` ones with
    a reason. None when the transaction is unknown (or already settled)."""
    committed_set = set(committed)
    with engine.begin() as conn:
        now = database_now(conn) if now is None else now
        row = conn.execute(
            select(commitments.c.destination, commitments.c.state).where(
                commitments.c.transaction_uid == transaction_uid
            )
        ).first()
        if row is None or row.state != PENDING:
            return None
        ok: list[tuple[int, int]] = []
        bad: list[tuple[int, int, str]] = []
        missing: list[tuple[int, int, str]] = []
        for job_id, instance_id, uid in _pending_rows(conn, transaction_uid):
            if uid in committed_set:
                ok.append((job_id, instance_id))
            elif uid in failed:
                bad.append((job_id, instance_id, failed[uid]))
            else:
                missing.append((job_id, instance_id, "not named in the commitment report"))
        for job_id, instance_id in ok:
            _set(conn, job_id, instance_id, COMMITTED)
        failures = bad + missing
        resent = _fail(conn, failures, on_failure, now)
        reasons = sorted({why for *_keys, why in failures})
        message = (
            f"{len(ok)} committed, {len(failures)} failed: {'; '.join(reasons)[:500]}"
            if failures
            else f"{len(ok)} committed"
        )
        conn.execute(
            update(commitments)
            .where(commitments.c.transaction_uid == transaction_uid)
            .values(
                state=FAILED if failures else COMMITTED,
                failed=len(failures),
                message=message,
                finished_at=now,
            )
        )
    log.log(
        logging.WARNING if failures else logging.INFO,
        "storage commitment %s from %s: %s",
        transaction_uid,
        row.destination,
        message,
    )
    return Settled(row.destination, len(ok), len(failures), resent)


def end_transaction(
    engine: Engine,
    transaction_uid: str,
    state: str,
    message: str,
    on_failure: Policy,
    now: float | None = None,
) -> Settled:
    """No report will come (``refused``: the destination does not do storage
    commitment, or answered the N-ACTION with a failure; ``timed_out``): every
    delivery still pending fails, and with ``on_failure`` "resend" a timed-out one
    is queued again (a refused one never is)."""
    with engine.begin() as conn:
        now = database_now(conn) if now is None else now
        destination, current = conn.execute(
            select(commitments.c.destination, commitments.c.state).where(
                commitments.c.transaction_uid == transaction_uid
            )
        ).one()
        if current != PENDING:
            # Ended already: by its report, or by another node's expiry pass (every
            # node's dispatch process runs :func:`expire`; the write lock orders them).
            return Settled(destination, 0, 0, 0)
        rows = [(j, i, message) for j, i, _uid in _pending_rows(conn, transaction_uid)]
        policy = on_failure if state == TIMED_OUT else WARN_ONLY
        resent = _fail(conn, rows, policy, now)
        conn.execute(
            update(commitments)
            .where(commitments.c.transaction_uid == transaction_uid)
            .values(state=state, failed=len(rows), message=message, finished_at=now)
        )
    log.warning("storage commitment %s to %s: %s", transaction_uid, destination, message)
    return Settled(destination, 0, len(rows), resent)


def expire(
    engine: Engine, policies: Mapping[str, Policy], now: float | None = None
) -> list[Settled]:
    """End the transactions past their deadline. ``policies``: destination -> its
    :class:`Policy`; a destination no longer configured warns. Safe on several nodes
    at once: a transaction another node ended meanwhile is left as it ended."""
    with engine.connect() as conn:
        now = database_now(conn) if now is None else now
        due = conn.execute(
            select(commitments.c.transaction_uid, commitments.c.destination, commitments.c.sent_at)
            .where(commitments.c.state == PENDING, commitments.c.deadline <= now)
            .order_by(commitments.c.deadline)
            .limit(100)
        ).all()
    settled = []
    for uid, destination, sent_at in due:
        policy = policies.get(destination, WARN_ONLY)
        waited = now - float(sent_at)
        settled.append(
            end_transaction(
                engine,
                uid,
                TIMED_OUT,
                f"no storage commitment report from {destination} within {waited:.0f}s",
                policy,
                now,
            )
        )
    return settled


def _set(
    conn: Connection, job_id: int, instance_id: int, commitment: str | None, **more: object
) -> None:
    conn.execute(
        update(job_instances)
        .where(job_instances.c.job_id == job_id, job_instances.c.instance_id == instance_id)
        .values(commitment=commitment, **more)
    )


def _fail(
    conn: Connection, rows: Sequence[tuple[int, int, str]], policy: Policy, now: float
) -> int:
    """Failed commitments: kept ``failed`` (warn), or queued again (resend) while
    their job has delivery attempts left; each resend uses one."""
    if policy.on_timeout != "resend":
        _keep_failed(conn, rows, "")
        return 0
    attempts = {
        int(r.id): int(r.attempts)
        for r in conn.execute(
            select(jobs.c.id, jobs.c.attempts).where(
                jobs.c.id.in_(sorted({job_id for job_id, _i, _w in rows}))
            )
        )
    }
    exhausted = {job for job, used in attempts.items() if used + 1 >= policy.max_attempts}
    _keep_failed(
        conn,
        [row for row in rows if row[0] in exhausted],
        f"; not sent again: retry.max_attempts ({policy.max_attempts}) used up",
    )
    resend = [row for row in rows if row[0] not in exhausted]
    for job_id, instance_id, why in resend:
        _set(
            conn,
            job_id,
            instance_id,
            None,
            commitment_uid=None,
            state=S.ITEM_PENDING,
            message=f"sent again: commitment failed: {why}"[:1000],
            updated_at=now,
        )
    job_ids = sorted({job_id for job_id, _i, _why in resend})
    if job_ids:
        conn.execute(
            update(jobs).where(jobs.c.id.in_(job_ids)).values(attempts=jobs.c.attempts + 1)
        )
        conn.execute(
            update(jobs)
            .where(
                and_(
                    jobs.c.id.in_(job_ids),
                    jobs.c.state.in_(S.FINAL_STATES),
                    jobs.c.state != S.CANCELED,
                    # A job a worker holds goes on; its next claim takes these too.
                    jobs.c.lease_owner.is_(None),
                )
            )
            .values(state=S.PENDING, next_attempt_at=now, finished_at=None, updated_at=now)
        )
    return len(resend)


def _keep_failed(conn: Connection, rows: Sequence[tuple[int, int, str]], why_not: str) -> None:
    for job_id, instance_id, why in rows:
        _set(conn, job_id, instance_id, FAILED, message=f"commitment failed: {why}{why_not}"[:1000])


def recent_failures(conn: Connection, since: float, until: float) -> list[dict[str, object]]:
    """Transactions that ended without every instance committed in (since, until]."""
    rows = conn.execute(
        select(
            commitments.c.transaction_uid,
            commitments.c.destination,
            commitments.c.state,
            commitments.c.instances,
            commitments.c.failed,
            commitments.c.message,
            commitments.c.finished_at,
        )
        .where(
            commitments.c.state.in_((FAILED, TIMED_OUT, REFUSED)),
            commitments.c.finished_at > since,
            commitments.c.finished_at <= until,
        )
        .order_by(commitments.c.finished_at)
    ).all()
    return [dict(r._mapping) for r in rows]


Policies = Mapping[str, Policy]


def policies(destinations: Mapping[str, object]) -> dict[str, Policy]:
    """Destination -> :class:`Policy` of those that ask for commitment (DICOM
    destinations only)."""
    out: dict[str, Policy] = {}
    for name, dest in destinations.items():
        if isinstance(dest, DicomDestinationConfig) and dest.storage_commitment.enabled:
            settings = dest.storage_commitment
            out[name] = Policy(
                float(settings.timeout), str(settings.on_timeout), dest.retry.max_attempts
            )
    return out


def serve_report(engine: Engine, request: Request, known: Policies) -> list[Reply]:
    """Answer an N-EVENT-REPORT-RQ of storage commitment (on our listener, or on the
    association of the N-ACTION), recording it first: the success status goes out
    only once the index has it, so the peer may forget it."""
    command = request.command
    if (
        request.abstract_syntax != STORAGE_COMMITMENT_PUSH
        or command.command_field != CommandField.N_EVENT_REPORT_RQ
    ):
        return [Reply(Status.UNRECOGNIZED_OPERATION, "operation not provided")]
    if request.data_set is None:
        return [Reply(Status.PROCESSING_FAILURE, "no event information")]
    try:
        report = decode_report(request.data_set, command.event_type_id, request.transfer_syntax)
    except ProtocolError as exc:
        log.warning("unreadable storage commitment report from %s: %s", request.peer, exc)
        return [Reply(Status.PROCESSING_FAILURE, str(exc)[:64])]
    failed = {f.sop_instance: describe_failure(f.reason) for f in report.failed}

    with engine.connect() as conn:
        destination = conn.execute(
            select(commitments.c.destination).where(
                commitments.c.transaction_uid == report.transaction_uid
            )
        ).scalar()
    policy = known.get(str(destination), WARN_ONLY)
    settled = record_report(
        engine,
        report.transaction_uid,
        (r.sop_instance for r in report.committed),
        failed,
        policy,
    )
    if settled is None:
        log.warning(
            "storage commitment report from %s (%s) for unknown or settled transaction %s",
            request.peer.calling_ae,
            request.peer.address,
            report.transaction_uid,
        )
        # Success all the same: the peer cannot do better, and would report again.
    return [Reply(Status.SUCCESS)]
