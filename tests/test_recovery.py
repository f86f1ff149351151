"""Unplanned instances and orphaned jobs, as operators see and act on them.

Orphaned jobs: open jobs of a destination removed from the configuration. They are
listed (status, API, dashboard, CLI), alerted, and can be moved to another
destination or canceled in bulk, every action audited. Unplanned instances: listed,
alerted, and re-planned on request (the planner also retries them by itself).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from dicomrouter.cli.common import local_user
from dicomrouter.cli.main import app as cli
from dicomrouter.queue import JobStore
from dicomrouter.store import audit
from dicomrouter.store.schema import job_instances, jobs
from dicomrouter.store.schema import unplanned as unplanned_rows
from tests.support.api import ApiEnv, api_env
from tests.support.synth import make_study
from tests.test_alerts import Receiver, alerts_section, make_env, receiver  # noqa: F401
from tests.test_queue import DEST, Pipeline, route, uids
from tests.test_unplanned import break_index, repair_index

OTHER = {**DEST, "ae_title": "OTHER", "port": 4243}


def _orphaned_setup(tmp_path: Path, n: int = 3) -> tuple[Pipeline, ApiEnv, set[str]]:
    """``old`` got n jobs, then the configuration lost it; ``new`` remains."""
    storage = {"path": str(tmp_path / "data")}
    p = Pipeline(
        tmp_path,
        {
            "storage": storage,
            "destinations": {"old": DEST, "new": OTHER},
            "routes": [route(to=["old"])],
        },
    )
    files = make_study(tmp_path / "in", n)
    p.receive(files)
    p.plan()
    env = api_env(tmp_path, {"storage": storage, "destinations": {"new": OTHER}})
    return p, env, uids(files)


def _jobs(p: Pipeline, destination: str) -> list[dict[str, Any]]:
    return p.job_list(destination=destination)


def test_orphaned_jobs_are_listed_and_moved_through_the_api(tmp_path: Path) -> None:
    p, env, sent = _orphaned_setup(tmp_path)
    status = env.viewer.get("/api/v1/status").json()
    [orphan] = status["orphaned"]
    assert (orphan["destination"], orphan["total"], orphan["jobs"]["pending"]) == ("old", 3, 3)
    assert env.viewer.get("/api/v1/jobs/orphaned").json() == status["orphaned"]

    assert (
        env.viewer.post("/api/v1/jobs/move", json={"from": "old", "to": "new"}).status_code == 403
    )
    wrong = env.operator.post("/api/v1/jobs/move", json={"from": "old", "to": "nope"})
    assert wrong.status_code == 422 and "'nope'" in wrong.json()["detail"]
    moved = env.operator.post("/api/v1/jobs/move", json={"from": "old", "to": "new"})
    assert moved.status_code == 200, moved.text
    assert moved.json()["moved"] == 3 and moved.json()["left"] == 0

    old = _jobs(p, "old")
    assert {j["state"] for j in old} == {"canceled"}
    assert {j["last_error"] for j in old} == {"moved to destination new"}
    new = _jobs(p, "new")
    assert {j["state"] for j in new} == {"pending"}
    assert set().union(*(p.members(j["id"]) for j in new)) == sent
    assert env.viewer.get("/api/v1/jobs/orphaned").json() == []
    [entry] = audit.query(env.engine, action="job.move")[1]
    assert entry["actor"] == "operator-token" and entry["detail"]["moved"] == 3
    again = env.operator.post("/api/v1/jobs/move", json={"from": "old", "to": "new"})
    assert again.status_code == 404


def test_moving_never_queues_an_instance_twice_for_the_target(tmp_path: Path) -> None:
    p = Pipeline(
        tmp_path,
        {
            "destinations": {"old": DEST, "new": OTHER},
            "routes": [route(name="a", to=["old"]), route(name="b", to=["new"])],
        },
    )
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    before = {j["id"] for j in _jobs(p, "new")}
    old_ids = [j["id"] for j in _jobs(p, "old")]
    moved, touched = JobStore(p.engine).move(old_ids, "new", p.config.destinations["new"])
    assert sorted(moved) == sorted(old_ids)
    assert set(touched) <= before
    with p.engine.connect() as conn:
        per_instance = conn.execute(
            select(job_instances.c.instance_id).where(job_instances.c.destination == "new")
        ).all()
    assert len(per_instance) == 2  # each instance once
    assert {j["state"] for j in _jobs(p, "old")} == {"canceled"}


def test_the_dashboard_shows_orphaned_jobs_and_cancels_them_for_an_operator(
    tmp_path: Path,
) -> None:
    p, env, _ = _orphaned_setup(tmp_path)
    page = env.viewer.get("/").text
    assert "no longer configured" in page and "Jobs for removed destinations" in page
    assert 'action="/orphans/cancel"' not in page  # a viewer cannot act
    assert 'action="/orphans/cancel"' in env.operator.get("/").text
    assert ">old</option>" in env.viewer.get("/jobs").text  # still selectable as a filter
    denied = env.viewer.post("/orphans/cancel", data={"source": "old"}, follow_redirects=False)
    assert denied.status_code == 403
    done = env.operator.post("/orphans/cancel", data={"source": "old"}, follow_redirects=False)
    assert done.status_code == 303
    assert {j["state"] for j in _jobs(p, "old")} == {"canceled"}
    [entry] = audit.query(env.engine, action="job.bulk_cancel")[1]
    assert entry["actor"] == "operator-token" and entry["detail"]["changed"] == 3
    assert "no longer configured" not in env.viewer.get("/").text


def test_the_dashboard_moves_orphaned_jobs(tmp_path: Path) -> None:
    p, env, sent = _orphaned_setup(tmp_path, n=2)
    done = env.operator.post(
        "/orphans/move", data={"source": "old", "target": "new"}, follow_redirects=False
    )
    assert done.status_code == 303
    assert set().union(*(p.members(j["id"]) for j in _jobs(p, "new"))) == sent


def test_the_cli_lists_moves_and_cancels_orphaned_jobs(tmp_path: Path) -> None:
    p, env, sent = _orphaned_setup(tmp_path)
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"path": str(tmp_path / "data")},
                "destinations": {"new": OTHER, "spare": {**OTHER, "port": 4244}},
            }
        )
    )
    runner = CliRunner()
    listed = runner.invoke(cli, ["queue", "list", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    assert "orphaned:" in listed.output and "'old'" in listed.output
    moved = runner.invoke(
        cli, ["queue", "move", "--from", "old", "--to", "new", "--config", str(config)]
    )
    assert moved.exit_code == 0, moved.output
    assert "moved 3 job(s) from old to new" in moved.output
    assert set().union(*(p.members(j["id"]) for j in _jobs(p, "new"))) == sent
    [entry] = audit.query(env.engine, action="job.move")[1]
    assert entry["actor"] == local_user() and entry["source"] == "cli"
    refused = runner.invoke(
        cli, ["queue", "move", "--from", "new", "--to", "gone", "--config", str(config)]
    )
    assert refused.exit_code == 1 and "'gone' is not configured" in refused.output
    canceled = runner.invoke(
        cli, ["queue", "cancel", "--destination", "new", "--config", str(config)]
    )
    assert canceled.exit_code == 0, canceled.output
    assert {j["state"] for j in _jobs(p, "new")} == {"canceled"}
    assert audit.query(env.engine, action="job.bulk_cancel")[1][0]["actor"] == local_user()


def test_orphaned_jobs_alert_fires_and_resolves(
    tmp_path: Path,
    receiver: Receiver,  # noqa: F811
) -> None:
    env = make_env(tmp_path, receiver, orphaned_jobs={"webhooks": ["ops"]})
    now = time.time()
    with env.engine.begin() as conn:
        conn.execute(
            jobs.insert().values(
                destination="removed",
                level="study",
                resource_uid="1.2.3",
                study_instance_uid="1.2.3",
                state="pending",
                next_attempt_at=now,
                created_at=now - 60,
                updated_at=now,
            )
        )
    evaluator = env.evaluator()
    [alert] = evaluator.run_once()
    assert (alert.event, alert.status, alert.target) == ("orphaned_jobs", "firing", "removed")
    assert "no longer configured" in alert.summary
    assert receiver.bodies("/ops")[0]["severity"] == "warning"
    assert evaluator.run_once() == []  # once per incident
    with env.engine.begin() as conn:
        conn.execute(jobs.update().values(state="canceled"))
    [resolved] = evaluator.run_once()
    assert (resolved.event, resolved.status) == ("orphaned_jobs", "resolved")


def test_unplanned_alert_fires_after_its_delay_and_resolves(
    tmp_path: Path,
    receiver: Receiver,  # noqa: F811
) -> None:
    env = make_env(tmp_path, receiver, unplanned={"after": "5m", "webhooks": ["ops"]})
    p = Pipeline(
        tmp_path / "p",
        {
            "storage": {"path": str(env.storage)},
            "destinations": {"pacs": DEST},
            "routes": [route()],
        },
    )
    p.receive(make_study(tmp_path / "in", 2))
    with p.engine.begin() as conn:
        break_index(conn)
    p.plan()
    now = time.time()
    clock = [now]
    evaluator = env.evaluator(lambda: clock[0])
    assert evaluator.run_once() == []  # the planner retries by itself first
    clock[0] = now + 301
    [alert] = evaluator.run_once()
    assert (alert.event, alert.status) == ("unplanned", "firing")
    assert alert.details["count"] == 2 and "disk is full" in alert.summary
    assert receiver.bodies("/ops")[0]["severity"] == "error"
    with p.engine.begin() as conn:
        repair_index(conn)
    assert p.planner.retry_unplanned(now=now + 3600) == 2
    [resolved] = evaluator.run_once()
    assert (resolved.event, resolved.status) == ("unplanned", "resolved")


def test_unplanned_instances_in_status_api_metrics_and_dashboard(tmp_path: Path) -> None:
    storage = {"path": str(tmp_path / "data")}
    p = Pipeline(
        tmp_path, {"storage": storage, "destinations": {"pacs": DEST}, "routes": [route()]}
    )
    files = make_study(tmp_path / "in", 2)
    p.receive(files)
    with p.engine.begin() as conn:
        break_index(conn)
    p.plan()
    env = api_env(tmp_path, {"storage": storage, "destinations": {"pacs": DEST}})
    status = env.viewer.get("/api/v1/status").json()["unplanned"]
    assert status["count"] == 2
    assert {i["sop_instance_uid"] for i in status["items"]} == uids(files)
    listed = env.viewer.get("/api/v1/unplanned").json()
    assert listed["count"] == 2 and "disk is full" in listed["items"][0]["last_error"]
    metrics = env.viewer.get("/metrics").text
    assert "dicomrouter_unplanned_instances 2.0" in metrics
    page = env.operator.get("/").text
    assert "Not planned yet (2)" in page and 'action="/unplanned/replan"' in page
    assert 'action="/unplanned/replan"' not in env.viewer.get("/").text

    assert env.viewer.post("/api/v1/unplanned/replan", json={}).status_code == 403
    with p.engine.begin() as conn:
        repair_index(conn)
    assert p.planner.retry_unplanned() == 0  # not due for 5 s
    [first, _] = [i["instance_id"] for i in listed["items"]]
    replanned = env.operator.post("/api/v1/unplanned/replan", json={"ids": [first]})
    assert replanned.status_code == 200 and replanned.json()["changed"] == 1
    assert p.planner.retry_unplanned() == 1
    done = env.operator.post("/unplanned/replan", follow_redirects=False)
    assert done.status_code == 303
    assert p.planner.retry_unplanned() == 1
    with p.engine.connect() as conn:
        assert conn.execute(select(unplanned_rows)).all() == []
    assert len(p.job_list()) == 2
    actions = [e["actor"] for e in audit.query(env.engine, action="instance.replan")[1]]
    assert actions == ["operator-token", "operator-token"]
    assert env.operator.post("/api/v1/unplanned/replan", json={}).status_code == 404
