"""``GET /api/v1/status`` and the throughput series behind the overview chart."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import update

from dicomrouter import __version__
from dicomrouter.store.schema import instances
from tests.support.api import ApiEnv, api_env
from tests.support.seed import Seeder

DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}


def seeded(tmp_path: Path) -> tuple[ApiEnv, Seeder]:
    """5 instances in 2 studies, one instance job each: 3 delivered, 1 failed, 1 pending."""
    env = api_env(
        tmp_path,
        {"destinations": {"pacs": DEST}, "routes": [{"name": "all", "to": ["pacs"]}]},
    )
    seed = Seeder(env, tmp_path / "in")
    seed.receive_study(3)
    seed.receive_study(2)
    seed.plan()
    seed.deliver("pacs", max_jobs=3)
    seed.deliver("pacs", fail=True, max_jobs=1)
    return env, seed


def test_status_counts_disk_and_destinations(tmp_path: Path) -> None:
    env, _ = seeded(tmp_path)
    assert env.anonymous.get("/api/v1/status").status_code == 401
    status = env.viewer.get("/api/v1/status").json()
    assert status["version"] == __version__
    assert status["started_at"] == env.ctx.started_at and 0 <= status["uptime_s"] < 60
    assert status["counts"] == {
        "instances": 5,
        "studies": 2,
        "jobs": {
            "scheduled": 0,
            "pending": 1,
            "in_progress": 0,
            "completed": 3,
            "warning": 0,
            "failed": 1,
            "canceled": 0,
        },
    }
    disk = status["disk"]
    assert 0 < disk["free_bytes"] <= disk["total_bytes"]
    assert disk["watermark_bytes"] == env.config.storage.min_free_space
    assert disk["ok"] is (disk["free_bytes"] >= disk["watermark_bytes"])
    (pacs,) = status["destinations"]
    assert pacs["name"] == "pacs" and pacs["queue"]["completed"] == 3
    assert pacs["failure_rate"] == 0.25


def test_throughput_buckets_received_delivered_and_failed(tmp_path: Path) -> None:
    env, _ = seeded(tmp_path)
    now = time.time()
    # Two of the instances arrived half an hour earlier.
    with env.engine.begin() as conn:
        conn.execute(
            update(instances)
            .where(instances.c.id.in_([1, 2]))
            .values(received_at=instances.c.received_at - 1800)
        )
    response = env.viewer.get(
        "/api/v1/status/throughput", params={"since": now - 3600, "bucket_s": 600}
    )
    assert response.status_code == 200, response.text
    series = response.json()
    starts = [b["t"] for b in series]
    assert all(t % 600 == 0 for t in starts)
    assert starts == [starts[0] + 600 * i for i in range(len(starts))]
    assert starts[0] <= now - 3600 < starts[0] + 600 and starts[-1] <= now < starts[-1] + 600
    assert sum(b["received"] for b in series) == 5
    assert series[-1]["received"] == 3 and series[-1]["delivered"] == 3
    assert series[-1]["failed"] == 1
    earlier = [b for b in series if b["t"] <= now - 1800 < b["t"] + 600]
    assert earlier[0]["received"] == 2 and earlier[0]["delivered"] == 0

    assert env.viewer.get("/api/v1/status/throughput", params={"bucket_s": 0}).status_code == 422
    too_many = env.viewer.get("/api/v1/status/throughput", params={"since": 0, "bucket_s": 1})
    assert too_many.status_code == 422 and "buckets" in too_many.json()["detail"]
    default = env.viewer.get("/api/v1/status/throughput").json()
    assert len(default) in (72, 73) and sum(b["received"] for b in default) == 5


def test_self_refreshing_pages_may_reuse_recent_counts_the_api_never_does(
    tmp_path: Path,
) -> None:
    from dicomrouter.control.status import node_status, throughput

    env, seed = seeded(tmp_path)
    assert node_status(env.ctx, max_age=60)["counts"]["instances"] == 5
    since = time.time() - 3600
    assert sum(p["received"] for p in throughput(env.ctx.reader, since, 60, max_age=60)) == 5
    seed.receive_study(1)
    # Within max_age the remembered values stand; without it, the index is read now.
    assert node_status(env.ctx, max_age=60)["counts"]["instances"] == 5
    assert sum(p["received"] for p in throughput(env.ctx.reader, since, 60, max_age=60)) == 5
    assert node_status(env.ctx)["counts"]["instances"] == 6
    assert env.viewer.get("/api/v1/status").json()["counts"]["instances"] == 6
    assert sum(p["received"] for p in throughput(env.ctx.reader, since, 60)) == 6
