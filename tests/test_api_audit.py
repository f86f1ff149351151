"""``GET /api/v1/audit``: admin only, filtered and paginated, newest first."""

from __future__ import annotations

import time
from pathlib import Path

from dicomrouter.store import audit
from tests.support.api import api_env


def test_only_admins_read_the_audit_log(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    assert env.anonymous.get("/api/v1/audit").status_code == 401
    assert env.viewer.get("/api/v1/audit").status_code == 403
    assert env.operator.get("/api/v1/audit").status_code == 403
    assert env.admin.get("/api/v1/audit").status_code == 200


def test_filters_and_pagination(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    audit.record(env.engine, "alice", "job.retry", "job 1", source="10.0.0.1")
    audit.record(env.engine, "alice", "job.cancel", "job 2", source="10.0.0.1")
    middle = time.time()
    audit.record(env.engine, "bob", "config.apply", "v2", detail={"sha256": "abc"})
    audit.record(env.engine, "bob", "config.apply", "v3", outcome="failed")
    # A failed login through the API is recorded too (by the auth layer).
    env.anonymous.get("/api/v1/me", headers={"Authorization": "Bearer drt_wrong"})

    def get(**params: object) -> dict:  # type: ignore[type-arg]
        response = env.admin.get("/api/v1/audit", params=params)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    everything = get()
    assert everything["total"] == 5
    assert [e["action"] for e in everything["items"]] == [
        "auth.login",
        "config.apply",
        "config.apply",
        "job.cancel",
        "job.retry",
    ]
    login = everything["items"][0]
    assert login["outcome"] == "denied" and login["source"] == "testclient"
    assert everything["items"][2]["detail"] == {"sha256": "abc"}

    assert [e["target"] for e in get(action="job.")["items"]] == ["job 2", "job 1"]
    assert get(actor="bob")["total"] == 2
    assert [e["target"] for e in get(outcome="failed")["items"]] == ["v3"]
    assert [e["target"] for e in get(until=middle)["items"]] == ["job 2", "job 1"]
    assert get(since=middle, action="config.")["total"] == 2
    page = get(limit=2, offset=1)
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)
    assert [e["target"] for e in page["items"]] == ["v3", "v2"]
    assert env.admin.get("/api/v1/audit", params={"limit": 0}).status_code == 422


def test_manual_actions_of_this_part_are_audited_with_actor_and_source(tmp_path: Path) -> None:
    env = api_env(
        tmp_path,
        {
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}},
        },
    )
    body = {"route": {"name": "try", "to": ["pacs"]}, "days": 1}
    assert env.operator.post("/api/v1/routes/backtest", json=body).status_code == 200
    [entry] = env.admin.get("/api/v1/audit", params={"action": "route."}).json()["items"]
    assert (entry["actor"], entry["action"], entry["target"]) == (
        "operator-token",
        "route.backtest",
        "try",
    )
    assert entry["source"] == "testclient" and entry["detail"]["days"] == 1
