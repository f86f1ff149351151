"""The destinations API: live state and numbers, echo, pause and resume.

In-process tests seed the index through the real pipeline code; the last test runs
a real router process and checks that a pause through its HTTP API really stops
deliveries to a real storescp, and that a resume delivers what waited.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from dicomrouter.dispatch.health import DestinationHealth
from dicomrouter.store import audit
from dicomrouter.store.schema import destination_state, jobs
from tests.support.api import TOKENS, ApiEnv, api_env, auth_section
from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.router import RouterProcess, all_settled, wait_until
from tests.support.seed import Seeder
from tests.support.synth import make_study

DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 1, "pause_after_failures": 2}


def make_env(tmp_path: Path, **destinations: dict[str, Any]) -> tuple[ApiEnv, Seeder]:
    config = {
        "destinations": destinations or {"pacs": DEST},
        "routes": [{"name": "all", "to": list(destinations or {"pacs": DEST})}],
    }
    env = api_env(tmp_path, config)
    return env, Seeder(env, tmp_path / "in")


def test_numbers_come_from_real_deliveries(tmp_path: Path) -> None:
    env, seed = make_env(tmp_path, pacs=DEST)
    seed.receive_study(4)
    seed.plan()  # 4 instance jobs
    assert seed.deliver("pacs", max_jobs=3) and seed.deliver("pacs", fail=True, max_jobs=1)
    seed.receive_study(2)
    seed.plan()  # 2 more, pending
    before = time.time()

    (summary,) = env.viewer.get("/api/v1/destinations").json()
    detail = env.viewer.get("/api/v1/destinations/pacs").json()
    assert summary["name"] == detail["name"] == "pacs"
    assert (detail["ae_title"], detail["host"], detail["port"]) == ("PACS", "127.0.0.1", 1)
    assert detail["state"] == "ok" and detail["enabled"] is True
    assert detail["queue"] == {
        "scheduled": 0,
        "pending": 2,
        "in_progress": 0,
        "completed": 3,
        "warning": 0,
        "failed": 1,
        "canceled": 0,
    }
    assert (detail["delivered_last_hour"], detail["failed_last_hour"]) == (3, 1)
    assert detail["failure_rate"] == pytest.approx(0.25)
    assert detail["last_success_at"] <= before and detail["last_success_at"] > before - 60
    assert detail["last_error"] == "refused: cannot understand"
    with env.engine.connect() as conn:
        oldest = conn.execute(
            select(jobs.c.created_at).where(jobs.c.state == "pending").order_by(jobs.c.id)
        ).first()
    assert oldest is not None and detail["oldest_pending_at"] == oldest.created_at
    assert 0 <= detail["oldest_pending_age_s"] < 60

    missing = env.viewer.get("/api/v1/destinations/nowhere")
    assert missing.status_code == 404 and "nowhere" in missing.json()["detail"]
    assert env.anonymous.get("/api/v1/destinations").status_code == 401


def test_state_is_ok_paused_probing_or_disabled(tmp_path: Path) -> None:
    env, _ = make_env(tmp_path, pacs=DEST, off={**DEST, "enabled": False}, flaky=DEST)
    health = DestinationHealth("flaky", env.config.destinations["flaky"], env.engine)
    health.record_unreachable("connection refused")
    assert env.viewer.get("/api/v1/destinations/flaky").json()["state"] == "ok"
    health.record_unreachable("connection refused")  # pause_after_failures = 2
    states = {d["name"]: d["state"] for d in env.viewer.get("/api/v1/destinations").json()}
    assert states == {"pacs": "ok", "off": "disabled", "flaky": "probing"}
    flaky = env.viewer.get("/api/v1/destinations/flaky").json()
    assert flaky["last_error"] == "connection refused" and flaky["paused_since"] is not None
    assert env.operator.post("/api/v1/destinations/pacs/pause").json()["state"] == "paused"


def test_pause_and_resume_are_audited_and_pull_the_queue_forward(tmp_path: Path) -> None:
    env, seed = make_env(tmp_path, pacs=DEST)
    seed.receive_study(2)
    seed.plan()
    seed.unreachable("pacs")  # the jobs now wait 30 s before their next attempt
    with env.engine.connect() as conn:
        assert min(conn.execute(select(jobs.c.next_attempt_at)).scalars()) > time.time() + 20

    assert env.viewer.post("/api/v1/destinations/pacs/pause").status_code == 403
    assert env.anonymous.post("/api/v1/destinations/pacs/pause").status_code == 401
    paused = env.operator.post("/api/v1/destinations/pacs/pause")
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    assert paused.json()["paused_since"] is not None
    # The CLI's `queue list` reads the same summaries (tests/test_cli_output.py).
    again = env.operator.post("/api/v1/destinations/pacs/pause")
    assert again.status_code == 409 and "already paused" in again.json()["detail"]
    assert env.operator.post("/api/v1/destinations/nowhere/pause").status_code == 404

    resumed = env.operator.post("/api/v1/destinations/pacs/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["state"] == "ok" and resumed.json()["paused_since"] is None
    with env.engine.connect() as conn:
        assert max(conn.execute(select(jobs.c.next_attempt_at)).scalars()) <= time.time()
        assert conn.execute(select(destination_state.c.admin_paused)).scalar_one() == 0
    assert env.operator.post("/api/v1/destinations/pacs/resume").status_code == 409

    _, entries = audit.query(env.engine, action="destination.")
    assert [(e["action"], e["target"], e["actor"]) for e in reversed(entries)] == [
        ("destination.pause", "pacs", "operator-token"),
        ("destination.resume", "pacs", "operator-token"),
    ]
    assert entries[0]["detail"] == {"jobs": 2} and entries[0]["source"] == "testclient"


def test_dispatch_health_follows_the_operator_within_a_second(tmp_path: Path) -> None:
    env, _ = make_env(tmp_path, pacs={**DEST, "probe_interval": "1s"})
    health = DestinationHealth("pacs", env.config.destinations["pacs"], env.engine)
    assert not health.paused
    env.operator.post("/api/v1/destinations/pacs/pause")
    wait_until(lambda: health.paused, 1.5, interval=0.05, message="the worker sees the pause")
    # Even if the peer is also unreachable, nobody probes it while an operator holds it.
    health.record_unreachable("refused")
    health.record_unreachable("refused")
    health.next_probe_at = 0.0
    assert not health.probe_due()
    env.operator.post("/api/v1/destinations/pacs/resume")
    wait_until(lambda: health.probe_due(), 1.5, interval=0.05, message="probing again")
    health.resume()
    assert not health.paused


def test_echo_reports_success_time_and_failure(tmp_path: Path, dcmtk: None) -> None:
    port = free_port()
    env, _ = make_env(tmp_path, pacs={**DEST, "port": port}, down={**DEST, "port": free_port()})
    assert env.viewer.post("/api/v1/destinations/pacs/echo").status_code == 403
    with StoreSCP(port, "PACS", tmp_path / "scp"):
        ok = env.operator.post("/api/v1/destinations/pacs/echo").json()
    assert ok["ok"] is True and ok["error"] is None and ok["ms"] > 0
    down = env.operator.post("/api/v1/destinations/down/echo").json()
    assert down["ok"] is False and down["error"]
    assert env.operator.post("/api/v1/destinations/nowhere/echo").status_code == 404
    _, entries = audit.query(env.engine, action="destination.echo")
    assert [(e["target"], e["outcome"]) for e in reversed(entries)] == [
        ("pacs", "ok"),
        ("down", "failed"),
    ]


@pytest.mark.sqlite_only
@pytest.mark.interop
def test_pause_through_http_stops_deliveries_and_resume_sends_them(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    config = {
        "auth": auth_section(),
        "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": pacs.port}},
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
    }
    first = make_study(tmp_path / "first", 2, prefix="A")
    held = make_study(tmp_path / "held", 3, prefix="B")
    with RouterProcess(tmp_path / "router", config) as router:
        api = httpx.Client(
            base_url=f"http://{HOST}:{router.config['http']['port']}",
            headers={"Authorization": f"Bearer {TOKENS['operator']}"},
            timeout=30,
        )

        def answers() -> bool:
            try:
                return api.get("/api/v1/me").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, 60, message="the HTTP API")
        assert router.send(first).returncode == 0
        wait_until(lambda: pacs.received_sops() == sop_uids(first), 30, message="delivery")

        assert api.post("/api/v1/destinations/pacs/pause").json()["state"] == "paused"
        time.sleep(1.5)  # the dispatch process re-reads the flag every second
        assert router.send(held).returncode == 0
        router.wait_jobs(lambda js: len(js) == 5, 30, message="5 jobs")
        time.sleep(2.0)
        assert pacs.received_sops() == sop_uids(first)
        queued = api.get("/api/v1/jobs", params={"state": "pending"}).json()
        assert queued["total"] == 3
        assert api.get("/api/v1/destinations/pacs").json()["queue"]["pending"] == 3

        assert api.post("/api/v1/destinations/pacs/resume").json()["state"] == "ok"
        jobs_after = router.wait_jobs(all_settled, 30, message="delivery after resume")
        assert {j["state"] for j in jobs_after} == {"completed"}
        assert pacs.received_sops() == sop_uids(first) | sop_uids(held)
