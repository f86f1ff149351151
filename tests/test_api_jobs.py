"""The jobs API: search filters, detail, retry/cancel one by one and in bulk, priority.

The index is filled by the real receiver-side index, planner and job store
(tests.support.seed), so every count checked here is one the product computes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicomrouter.queue import JobStore
from dicomrouter.store import audit
from dicomrouter.store.schema import job_instances, jobs
from tests.support.api import ApiEnv, api_env
from tests.support.seed import Seeder

DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}
CONFIG: dict[str, Any] = {
    "destinations": {"pacs": DEST, "ai": {**DEST, "ae_title": "AI"}},
    "routes": [
        {"name": "all", "to": ["pacs"], "trigger": "study", "stable_after": "1s"},
        {"name": "ct", "to": ["ai"], "trigger": "instance", "when": {"Modality": "CT"}},
    ],
}


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[ApiEnv, Seeder]:
    """Two studies: P1/ACC1 (3 CT instances) and P2/ACC2 (2 MR instances).
    Jobs: one study job per study to pacs; one instance job per CT instance to ai."""
    env = api_env(tmp_path, CONFIG)
    seed = Seeder(env, tmp_path / "in")
    seed.receive_study(3, patient_id="P1", accession_number="ACC1", modality="CT")
    seed.receive_study(2, patient_id="P2", accession_number="ACC2", modality="MR")
    seed.plan()
    return env, seed


def ids(response: Any) -> list[int]:
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["items"]]


def job_state(env: ApiEnv, job_id: int) -> str:
    with env.engine.connect() as conn:
        return str(conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar_one())


def test_search_filters_match_the_queue(seeded: tuple[ApiEnv, Seeder]) -> None:
    env, seed = seeded
    everything = env.viewer.get("/api/v1/jobs").json()
    assert everything["total"] == 5 and everything["limit"] == 50 and everything["offset"] == 0
    items = everything["items"]
    assert [j["id"] for j in items] == sorted((j["id"] for j in items), reverse=True)
    study_jobs = [j for j in items if j["destination"] == "pacs"]
    assert sorted((j["patient_id"], j["accession_number"], j["total"]) for j in study_jobs) == [
        ("P1", "ACC1", 3),
        ("P2", "ACC2", 2),
    ]
    assert all(j["routes"] == ["all"] and j["level"] == "study" for j in study_jobs)

    assert len(ids(env.viewer.get("/api/v1/jobs", params={"destination": "ai"}))) == 3
    assert len(ids(env.viewer.get("/api/v1/jobs", params={"route": "ct"}))) == 3
    # A route filter matches whole names only, not a substring of "ct".
    assert ids(env.viewer.get("/api/v1/jobs", params={"route": "c"})) == []
    assert len(ids(env.viewer.get("/api/v1/jobs", params={"patient_id": "P1"}))) == 4
    assert len(ids(env.viewer.get("/api/v1/jobs", params={"accession_number": "ACC2"}))) == 1
    p2 = study_jobs[0] if study_jobs[0]["patient_id"] == "P2" else study_jobs[1]
    by_study = env.viewer.get("/api/v1/jobs", params={"study_uid": p2["study_instance_uid"]})
    assert ids(by_study) == [p2["id"]]

    delivered = seed.deliver("pacs", max_jobs=1)
    state_one = env.viewer.get("/api/v1/jobs", params={"state": "completed"})
    assert ids(state_one) == delivered
    both = env.viewer.get("/api/v1/jobs", params=[("state", "completed"), ("state", "pending")])
    assert both.json()["total"] == 5
    comma = env.viewer.get("/api/v1/jobs", params={"state": "completed,failed"})
    assert ids(comma) == delivered

    created = [j["created_at"] for j in items]
    after = env.viewer.get("/api/v1/jobs", params={"since": max(created) + 1})
    assert after.json()["total"] == 0
    window = env.viewer.get(
        "/api/v1/jobs", params={"since": min(created), "until": max(created) + 1}
    )
    assert window.json()["total"] == 5


def test_pagination_and_bad_filters(seeded: tuple[ApiEnv, Seeder]) -> None:
    env, _ = seeded
    all_ids = ids(env.viewer.get("/api/v1/jobs"))
    page = env.viewer.get("/api/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert page["total"] == 5 and [j["id"] for j in page["items"]] == all_ids[2:4]
    bad = env.viewer.get("/api/v1/jobs", params={"state": "exploded"})
    assert bad.status_code == 422 and "exploded" in bad.json()["detail"]
    assert env.viewer.get("/api/v1/jobs", params={"limit": 0}).status_code == 422
    assert env.viewer.get("/api/v1/jobs", params={"since": 10, "until": 5}).status_code == 422
    assert env.anonymous.get("/api/v1/jobs").status_code == 401


def test_detail_shows_instances_and_every_attempt(seeded: tuple[ApiEnv, Seeder]) -> None:
    env, seed = seeded
    (job_id,) = seed.deliver("pacs", fail=True, max_jobs=1)
    detail = env.viewer.get(f"/api/v1/jobs/{job_id}").json()
    assert detail["state"] == "failed" and detail["failed"] == detail["total"]
    assert {i["state"] for i in detail["instances"]} == {"failed"}
    assert {i["status"] for i in detail["instances"]} == {0xC000}
    assert all(i["status_text"].startswith("0xC000") for i in detail["instances"])
    (attempt,) = detail["attempts"]
    assert attempt["outcome"] == "failed" and attempt["failed"] == detail["total"]
    assert attempt["message"] == "refused: cannot understand"
    assert attempt["ended_at"] >= attempt["started_at"]
    assert detail["last_error"].startswith(f"{detail['total']} instance(s) refused")
    missing = env.viewer.get("/api/v1/jobs/99999")
    assert missing.status_code == 404 and "99999" in missing.json()["detail"]


def test_retry_and_cancel_one_job(seeded: tuple[ApiEnv, Seeder]) -> None:
    env, seed = seeded
    (failed,) = seed.deliver("pacs", fail=True, max_jobs=1)
    assert env.viewer.post(f"/api/v1/jobs/{failed}/retry").status_code == 403
    assert env.anonymous.post(f"/api/v1/jobs/{failed}/retry").status_code == 401
    assert job_state(env, failed) == "failed"

    response = env.operator.post(f"/api/v1/jobs/{failed}/retry")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["changed"] == 1 and body["job"]["state"] == "pending"
    assert {i["state"] for i in body["job"]["instances"]} == {"pending"}
    # The retried job is really due: a worker claims it again.
    assert seed.deliver("pacs", max_jobs=1) == [failed]
    assert job_state(env, failed) == "completed"
    again = env.operator.post(f"/api/v1/jobs/{failed}/retry")
    assert again.status_code == 409 and "completed" in again.json()["detail"]

    pending = ids(env.viewer.get("/api/v1/jobs", params={"state": "pending"}))[0]
    assert env.operator.post(f"/api/v1/jobs/{pending}/cancel").json()["job"]["state"] == (
        "canceled"
    )
    with env.engine.connect() as conn:
        items = conn.execute(
            select(job_instances.c.state).where(job_instances.c.job_id == pending)
        ).scalars()
        assert set(items) == {"canceled"}
    assert env.operator.post(f"/api/v1/jobs/{pending}/cancel").status_code == 409
    assert env.operator.post("/api/v1/jobs/99999/cancel").status_code == 404

    _, entries = audit.query(env.engine, action="job.")
    assert [(e["action"], e["target"], e["outcome"]) for e in reversed(entries)] == [
        ("job.retry", f"job {failed}", "ok"),
        ("job.cancel", f"job {pending}", "ok"),
    ]
    assert {(e["actor"], e["source"]) for e in entries} == {("operator-token", "testclient")}


def test_bulk_actions_need_a_filter_and_act_on_what_matches(
    seeded: tuple[ApiEnv, Seeder],
) -> None:
    env, seed = seeded
    assert env.viewer.post("/api/v1/jobs/cancel", json={"destination": "ai"}).status_code == 403
    empty = env.operator.post("/api/v1/jobs/cancel", json={})
    assert empty.status_code == 422 and "all" in empty.json()["detail"]
    typo = env.operator.post("/api/v1/jobs/cancel", json={"destinaton": "ai"})
    assert typo.status_code == 422
    assert env.operator.post("/api/v1/jobs/cancel", json={"state": "nope"}).status_code == 422
    assert len(ids(env.viewer.get("/api/v1/jobs", params={"state": "pending"}))) == 5

    canceled = env.operator.post("/api/v1/jobs/cancel", json={"destination": "ai"})
    assert canceled.json() == {"action": "cancel", "changed": 3}
    ai = env.viewer.get("/api/v1/jobs", params={"destination": "ai"}).json()["items"]
    assert {j["state"] for j in ai} == {"canceled"}
    pacs = env.viewer.get("/api/v1/jobs", params={"destination": "pacs"}).json()["items"]
    assert {j["state"] for j in pacs} == {"pending"}

    # Retry by an explicit selection, narrowed by a filter: only ai jobs of it.
    selection = [ai[0]["id"], pacs[0]["id"]]
    retried = env.operator.post(
        "/api/v1/jobs/retry", json={"ids": selection, "destination": "ai"}
    ).json()
    assert retried["changed"] == 1 and job_state(env, ai[0]["id"]) == "pending"
    assert job_state(env, ai[1]["id"]) == "canceled"

    everything = env.operator.post("/api/v1/jobs/cancel", json={"all": True}).json()
    assert everything["changed"] == 3  # 2 pacs + the retried ai job; the rest were canceled
    _, entries = audit.query(env.engine, action="job.bulk_cancel")
    assert entries[0]["detail"] == {"filter": {}, "matched": 3, "changed": 3}
    assert entries[1]["detail"]["filter"] == {"destination": "ai"}


def test_priority_change_is_honoured_when_claiming(seeded: tuple[ApiEnv, Seeder]) -> None:
    env, seed = seeded
    ai_jobs = sorted(ids(env.viewer.get("/api/v1/jobs", params={"destination": "ai"})))
    last = ai_jobs[-1]
    assert env.viewer.put(f"/api/v1/jobs/{last}/priority", json={"priority": 5}).status_code == 403
    response = env.operator.put(f"/api/v1/jobs/{last}/priority", json={"priority": 5})
    assert response.json() == {"id": last, "priority": 5, "previous": 0}
    assert (
        env.operator.post(f"/api/v1/jobs/{last}/priority", json={"priority": 7}).json()["previous"]
        == 5
    )
    assert env.viewer.get(f"/api/v1/jobs/{last}").json()["priority"] == 7
    # Without the change the oldest job would go first.
    claim = JobStore(env.engine).claim("ai", "test", lease=60, max_jobs=1, now=time.time())
    assert claim is not None and claim.job_ids == [last]

    assert (
        env.operator.put(f"/api/v1/jobs/{last}/priority", json={"priority": 10**6}).status_code
        == 422
    )
    assert env.operator.put("/api/v1/jobs/99999/priority", json={"priority": 1}).status_code == 404
    (done,) = seed.deliver("pacs", max_jobs=1)
    finished = env.operator.put(f"/api/v1/jobs/{done}/priority", json={"priority": 1})
    assert finished.status_code == 409
    (entry,) = audit.query(env.engine, action="job.priority", limit=1)[1]
    assert entry["detail"] == {"previous": 5, "priority": 7} and entry["target"] == f"job {last}"


def test_time_filters_take_iso_8601_or_posix_seconds(seeded: tuple[ApiEnv, Seeder]) -> None:
    env, _ = seeded
    every = ids(env.viewer.get("/api/v1/jobs"))
    assert ids(env.viewer.get("/api/v1/jobs", params={"since": "2000-01-01"})) == every
    assert ids(env.viewer.get("/api/v1/jobs", params={"since": "2000-01-01T08:00:00Z"})) == every
    assert ids(env.viewer.get("/api/v1/jobs", params={"until": time.time() + 60})) == every
    assert ids(env.viewer.get("/api/v1/jobs", params={"since": "2100-01-01T00:00"})) == []
    bad = env.viewer.get("/api/v1/jobs", params={"since": "yesterday"})
    assert bad.status_code == 422 and "ISO 8601" in str(bad.json()["detail"])
    body = {"since": "2100-01-01", "state": "pending"}
    assert env.operator.post("/api/v1/jobs/retry", json=body).json()["changed"] == 0
