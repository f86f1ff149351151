"""Destination outages end to end: a real router, a destination port with nobody listening,
then a real storescp appearing on that port.

Contract under test: connection failures pause a destination (C-ECHO probes instead of
per-job retries), so an outage never burns jobs' attempts into ``failed``; the first
successful probe resumes the queue at once; other destinations are unaffected; and the
``queue cancel`` / ``queue retry`` CLI act on real jobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.router import RouterProcess, all_settled, wait_until
from tests.support.synth import make_study

pytestmark = pytest.mark.interop

OUTAGE_POLICY: dict[str, Any] = {
    "pause_after_failures": 2,
    "probe_interval": "1s",
    "retry": {"initial_delay": "1s", "max_delay": "2s", "max_attempts": 3},
}


def down_destination(port: int, aet: str = "DOWN") -> dict[str, Any]:
    return {"ae_title": aet, "host": HOST, "port": port, **OUTAGE_POLICY}


def queue_json(router: RouterProcess) -> dict[str, Any]:
    out = router.cli(
        "queue", "list", "--config", str(router.config_path), "--json", "--limit", "100000",
        check=True,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


def health(router: RouterProcess, destination: str) -> str | None:
    """The destination's state as `queue list` (and the API, the dashboard) name it."""
    for entry in queue_json(router)["destinations"]:
        if entry["name"] == destination:
            return entry["state"]  # type: ignore[no-any-return]
    return None


def send_ok(router: RouterProcess, files: list[Path]) -> None:
    result = router.send(files)
    assert result.returncode == 0, f"storescu failed:\n{result.stderr}\n{router.log()[-2000:]}"


def failed_probes(router: RouterProcess, destination: str) -> int:
    return router.log().count(f"probe of {destination} failed")


def test_outage_pauses_keeps_jobs_pending_and_resumes_at_once(tmp_path: Path, dcmtk: None) -> None:
    port = free_port()  # nobody listens here until the destination "comes back"
    # A 10-minute retry backoff: an outage must not push jobs out by it (a connection
    # failure waits at most probe_interval), so delivery follows the return within
    # seconds. (The probe's wake of jobs backed off for other reasons: test_queue.)
    slow_retries = {"initial_delay": "10m", "max_delay": "30m", "max_attempts": 3}
    config = {
        "destinations": {"down": {**down_destination(port), "retry": slow_retries}},
        "routes": [{"name": "all", "trigger": "instance", "to": ["down"]}],
    }
    files = make_study(tmp_path / "in", 20)
    with RouterProcess(tmp_path / "router", config) as router:
        send_ok(router, files)
        router.wait_jobs(lambda js: len(js) == 20, 30, message="20 jobs")
        wait_until(lambda: health(router, "down") == "probing", 30, message="destination probing")
        # 2 failed connections paused it; 3 failed probes later it has failed more
        # often than max_attempts (3), and still no job may be failed.
        wait_until(lambda: failed_probes(router, "down") >= 3, 30, interval=0.3, message="3 probes")
        jobs = router.jobs()
        assert sorted({j["state"] for j in jobs}) == ["pending"], [
            (j["id"], j["state"], j["attempts"], j["last_error"]) for j in jobs
        ]
        assert health(router, "down") == "probing"

        with StoreSCP(port, "DOWN", tmp_path / "back", accept="all") as scp:
            # Probes run every 1s and a resume pulls the whole queue forward, so 20
            # small instances arrive within seconds (generous bound for a busy box).
            wait_until(lambda: scp.store_requests() >= 20, 20, message="20 instances after return")
            jobs = router.wait_jobs(all_settled, 20, message="all jobs settled")
            assert scp.received_sops() == sop_uids(files)
            assert scp.store_requests() == 20
        assert [j["state"] for j in jobs] == ["completed"] * 20
        assert health(router, "down") == "ok"


def test_a_down_destination_does_not_hold_up_another(tmp_path: Path, dcmtk: None) -> None:
    with StoreSCP(free_port(), "UP", tmp_path / "up", accept="all") as up:
        config = {
            "destinations": {
                "down": down_destination(free_port()),
                "up": {"ae_title": "UP", "host": HOST, "port": up.port},
            },
            "routes": [{"name": "both", "trigger": "instance", "to": ["down", "up"]}],
        }
        first = make_study(tmp_path / "in", 10, prefix="A")
        second = make_study(tmp_path / "in", 10, prefix="B")
        with RouterProcess(tmp_path / "router", config) as router:
            send_ok(router, first)
            wait_until(lambda: up.store_requests() >= 10, 30, message="first 10 at the up peer")
            wait_until(lambda: health(router, "down") == "probing", 30, message="down probing")
            # While "down" is paused, new data still flows to "up" promptly.
            send_ok(router, second)
            wait_until(lambda: up.store_requests() >= 20, 30, message="next 10 at the up peer")
            jobs = router.wait_jobs(
                lambda js: (
                    len([j for j in js if j["destination"] == "up"]) == 20
                    and all_settled([j for j in js if j["destination"] == "up"])
                ),
                30,
                message="the 20 jobs to the up peer settled",
            )
    up_jobs = [j for j in jobs if j["destination"] == "up"]
    down_jobs = [j for j in jobs if j["destination"] == "down"]
    assert up.received_sops() == sop_uids(first + second)
    assert up.store_requests() == 20
    assert [j["state"] for j in up_jobs] == ["completed"] * 20, up_jobs
    assert [j["state"] for j in down_jobs] == ["pending"] * 20, down_jobs


def test_cancel_then_retry_pending_jobs_with_the_cli(tmp_path: Path, dcmtk: None) -> None:
    port = free_port()
    config = {
        "destinations": {"down": down_destination(port)},
        "routes": [{"name": "all", "trigger": "instance", "to": ["down"]}],
    }
    files = make_study(tmp_path / "in", 5, prefix="A")
    later = make_study(tmp_path / "in", 1, prefix="B")
    with RouterProcess(tmp_path / "router", config) as router:
        send_ok(router, files)
        router.wait_jobs(lambda js: len(js) == 5, 30, message="5 jobs")
        wait_until(lambda: health(router, "down") == "probing", 30, message="destination probing")
        ids = sorted(j["id"] for j in router.jobs())

        cancel = router.cli(
            "queue", "cancel", "--state", "pending", "--config", str(router.config_path), "--json"
        )
        assert cancel.returncode == 0, cancel.stderr
        assert json.loads(cancel.stdout)["changed"] == 5
        assert {j["state"] for j in router.jobs()} == {"canceled"}

        with StoreSCP(port, "DOWN", tmp_path / "back", accept="all") as scp:
            wait_until(lambda: health(router, "down") == "ok", 20, message="destination resumed")
            # A new instance after the return is delivered; the canceled ones are not.
            send_ok(router, later)
            wait_until(lambda: scp.store_requests() >= 1, 20, message="the new instance")
            router.wait_jobs(all_settled, 20, message="jobs settled")
            assert scp.received_sops() == sop_uids(later)
            assert scp.store_requests() == 1, "a canceled job was delivered"
            states = {j["id"]: j["state"] for j in router.jobs()}
            assert [states[i] for i in ids] == ["canceled"] * 5

            retry = router.cli(
                "queue", "retry", *map(str, ids), "--config", str(router.config_path), "--json"
            )
            assert retry.returncode == 0, retry.stderr
            assert json.loads(retry.stdout)["changed"] == 5
            wait_until(lambda: scp.store_requests() >= 6, 20, message="the retried instances")
            jobs = router.wait_jobs(all_settled, 20, message="jobs settled after retry")
            assert scp.received_sops() == sop_uids(files + later)
            assert scp.store_requests() == 6
    assert {j["state"] for j in jobs} == {"completed"}


def test_give_up_after_fails_waiting_jobs_and_a_retry_delivers_them(
    tmp_path: Path, dcmtk: None
) -> None:
    """``give_up_after``: jobs of a destination that stays unreachable become failed
    (with the reason), are not resumed by the probe, and a retry by hand sends them."""
    port = free_port()
    config = {
        "destinations": {"down": {**down_destination(port), "give_up_after": "2s"}},
        "routes": [{"name": "all", "trigger": "instance", "to": ["down"]}],
    }
    files = make_study(tmp_path / "in", 4)
    with RouterProcess(tmp_path / "router", config) as router:
        send_ok(router, files)
        jobs = router.wait_jobs(
            lambda js: len(js) == 4 and {j["state"] for j in js} == {"failed"},
            60,
            message="4 jobs given up",
        )
        assert all("gave up: destination unreachable" in j["last_error"] for j in jobs), jobs
        with StoreSCP(port, "DOWN", tmp_path / "back", accept="all") as scp:
            # The probe resumes the destination, but failed jobs stay failed...
            wait_until(lambda: health(router, "down") == "ok", 30, message="probe resumed it")
            assert {j["state"] for j in router.jobs()} == {"failed"}
            assert scp.received_files() == []
            # ...until an operator retries them.
            router.cli("queue", "retry", "--state", "failed", "--config", str(router.config_path))
            router.wait_jobs(
                lambda js: {j["state"] for j in js} == {"completed"}, 60, message="delivered"
            )
            assert sorted(sop_uids(scp.received_files())) == sorted(sop_uids(files))
