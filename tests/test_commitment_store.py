"""Storage commitment bookkeeping (queue/commitment.py) on a real index: a report
with committed, failed and unnamed instances; timeouts under ``warn`` and
``resend``; a refused request never resent; the ``commitment_failed`` alert; a
report through the receiver's handler (serve_report) as the listener gets it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from dicomrouter.dicomnet import Command, CommandField, Peer, Request, Status
from dicomrouter.dicomnet.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentReport,
    Failure,
    Reference,
    encode_report,
)
from dicomrouter.observe.alerts import AlertEvaluator
from dicomrouter.queue import commitment
from dicomrouter.queue import states as S
from dicomrouter.store.schema import commitments, instances, job_instances, jobs
from tests.support.synth import make_study
from tests.test_queue import DEST, Pipeline

ILE = "1.2.840.10008.1.2"
WARN = commitment.Policy(60, "warn", 5)
RESEND = commitment.Policy(60, "resend", 5)


def delivered(tmp_path: Path, n: int = 3, **settings: Any) -> tuple[Pipeline, list[Any]]:
    dest = {**DEST, "storage_commitment": {"enabled": True, **settings}}
    pipeline = Pipeline(
        tmp_path,
        {
            "destinations": {"pacs": dest},
            "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
        },
    )
    pipeline.receive(make_study(tmp_path / "in", n))
    pipeline.plan()
    with pipeline.engine.begin() as conn:
        conn.execute(update(job_instances).values(state=S.ITEM_COMPLETED))
        conn.execute(update(jobs).values(state=S.COMPLETED, finished_at=time.time()))
        rows = conn.execute(
            select(
                job_instances.c.job_id,
                job_instances.c.instance_id,
                instances.c.sop_class_uid,
                instances.c.sop_instance_uid,
            )
            .join(instances, instances.c.id == job_instances.c.instance_id)
            .order_by(instances.c.id)
        ).all()
    return pipeline, [commitment.Delivery(*row) for row in rows]


def states(pipeline: Pipeline) -> list[tuple[str, str | None]]:
    with pipeline.engine.connect() as conn:
        return [
            (row.state, row.commitment)
            for row in conn.execute(
                select(job_instances.c.state, job_instances.c.commitment).order_by(
                    job_instances.c.instance_id
                )
            )
        ]


def test_a_report_settles_each_delivery(tmp_path: Path) -> None:
    pipeline, deliveries = delivered(tmp_path)
    commitment.open_transaction(pipeline.engine, "1.2.3.9", "pacs", deliveries, 3600)
    assert states(pipeline) == [("completed", "pending")] * 3
    settled = commitment.record_report(
        pipeline.engine,
        "1.2.3.9",
        [deliveries[0].sop_instance_uid],
        {deliveries[1].sop_instance_uid: "no such object instance (0x0112)"},
        WARN,
    )
    assert settled == commitment.Settled("pacs", 1, 2, 0)
    assert states(pipeline) == [
        ("completed", "committed"),
        ("completed", "failed"),
        ("completed", "failed"),
    ]
    # Settled once: a second report for it changes nothing.
    assert commitment.record_report(pipeline.engine, "1.2.3.9", [], {}, WARN) is None
    with pipeline.engine.connect() as conn:
        row = conn.execute(select(commitments)).one()
    assert (row.state, row.instances, row.failed) == ("failed", 3, 2)
    assert "0x0112" in row.message and "not named" in row.message


def test_a_timeout_warns_or_resends(tmp_path: Path) -> None:
    pipeline, deliveries = delivered(tmp_path, on_timeout="resend")
    commitment.open_transaction(pipeline.engine, "1.2.3.10", "pacs", deliveries, 60, now=100.0)
    assert commitment.expire(pipeline.engine, {"pacs": RESEND}, now=159.0) == []
    (settled,) = commitment.expire(pipeline.engine, {"pacs": RESEND}, now=161.0)
    assert settled == commitment.Settled("pacs", 0, 3, 3)
    assert states(pipeline) == [("pending", None)] * 3
    with pipeline.engine.connect() as conn:
        assert {r.state for r in conn.execute(select(jobs.c.state))} == {S.PENDING}

    other, more = delivered(tmp_path / "warn")
    commitment.open_transaction(other.engine, "1.2.3.11", "pacs", more, 60, now=100.0)
    (settled,) = commitment.expire(other.engine, {"pacs": WARN}, now=161.0)
    assert settled.resent == 0
    assert states(other) == [("completed", "failed")] * 3


def test_resends_stop_once_the_job_has_used_up_its_attempts(tmp_path: Path) -> None:
    pipeline, deliveries = delivered(tmp_path, on_timeout="resend")
    policy = commitment.Policy(60, "resend", 3)
    for round_, expected in enumerate([("pending", None), ("pending", None)]):
        uid = f"1.2.3.2{round_}"
        commitment.open_transaction(pipeline.engine, uid, "pacs", deliveries, 60, now=100.0)
        (settled,) = commitment.expire(pipeline.engine, {"pacs": policy}, now=161.0)
        assert settled.resent == 3
        assert states(pipeline) == [expected] * 3
    with pipeline.engine.connect() as conn:
        assert {r.attempts for r in conn.execute(select(jobs.c.attempts))} == {2}
    # The third failure would be the third attempt: kept failed, with the reason.
    commitment.open_transaction(pipeline.engine, "1.2.3.29", "pacs", deliveries, 60, now=100.0)
    (settled,) = commitment.expire(pipeline.engine, {"pacs": policy}, now=161.0)
    assert settled.resent == 0
    assert [c for _s, c in states(pipeline)] == ["failed"] * 3
    with pipeline.engine.connect() as conn:
        messages = {r.message for r in conn.execute(select(job_instances.c.message))}
    assert all("retry.max_attempts (3) used up" in m for m in messages), messages


def test_a_refused_request_is_never_resent(tmp_path: Path) -> None:
    pipeline, deliveries = delivered(tmp_path, on_timeout="resend")
    commitment.open_transaction(pipeline.engine, "1.2.3.12", "pacs", deliveries, 60)
    commitment.end_transaction(
        pipeline.engine, "1.2.3.12", commitment.REFUSED, "does not support it", RESEND
    )
    assert states(pipeline) == [("completed", "failed")] * 3


def test_a_report_through_the_listener_handler_and_the_alert(tmp_path: Path) -> None:
    pipeline, deliveries = delivered(tmp_path)
    commitment.open_transaction(pipeline.engine, "1.2.3.13", "pacs", deliveries, 3600)
    report = CommitmentReport(
        "1.2.3.13",
        2,
        tuple(Reference(d.sop_class_uid, d.sop_instance_uid) for d in deliveries[:2]),
        (Failure(deliveries[2].sop_class_uid, deliveries[2].sop_instance_uid, 0x0213),),
    )
    command = Command.request(
        CommandField.N_EVENT_REPORT_RQ,
        5,
        STORAGE_COMMITMENT_PUSH,
        STORAGE_COMMITMENT_INSTANCE,
        with_data_set=True,
        event_type_id=2,
    )
    request = Request(
        Peer("PACS", "DICOMROUTER", "127.0.0.1", 5000),
        1,
        STORAGE_COMMITMENT_PUSH,
        ILE,
        command,
        encode_report(report),
    )
    evaluator = AlertEvaluator(lambda: pipeline.config, pipeline.engine, pipeline.engine, tmp_path)
    (reply,) = commitment.serve_report(pipeline.engine, request, {"pacs": WARN})
    assert reply.status == Status.SUCCESS
    assert states(pipeline) == [
        ("completed", "committed"),
        ("completed", "committed"),
        ("completed", "failed"),
    ]
    alerts = [a for a in evaluator.check() if a.event == "commitment_failed"]
    assert len(alerts) == 1
    assert alerts[0].target == "pacs"
    assert "resource limitation (0x0213)" in alerts[0].summary
    assert not [a for a in evaluator.check() if a.event == "commitment_failed"]
    # An unknown transaction is answered with success all the same, and logged.
    unknown = Request(
        request.peer,
        1,
        STORAGE_COMMITMENT_PUSH,
        ILE,
        command,
        encode_report(CommitmentReport("1.2.3.99", 1, report.committed, ())),
    )
    (reply,) = commitment.serve_report(pipeline.engine, unknown, {})
    assert reply.status == Status.SUCCESS


def test_two_nodes_expiring_one_transaction_end_it_once(tmp_path: Path) -> None:
    """Every node's dispatch process runs the expiry: two passes that both saw the
    transaction due (read before either wrote) end it once, and the second leaves the
    first one's counts and resends as they were."""
    pipeline, deliveries = delivered(tmp_path, on_timeout="resend")
    commitment.open_transaction(pipeline.engine, "1.2.3.30", "pacs", deliveries, 60, now=100.0)
    first = commitment.end_transaction(
        pipeline.engine, "1.2.3.30", commitment.TIMED_OUT, "no report", RESEND, now=161.0
    )
    second = commitment.end_transaction(
        pipeline.engine, "1.2.3.30", commitment.TIMED_OUT, "no report", RESEND, now=162.0
    )
    assert first == commitment.Settled("pacs", 0, 3, 3)
    assert second == commitment.Settled("pacs", 0, 0, 0)
    with pipeline.engine.connect() as conn:
        row = conn.execute(select(commitments)).one()
        used = set(conn.execute(select(jobs.c.attempts)).scalars())
    assert (row.state, row.failed, row.finished_at) == ("timed_out", 3, 161.0)
    assert used == {1}  # one resend used one attempt, not two
