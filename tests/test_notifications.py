"""Event notifications (observe/notify.py): each event's payload, their order, the
retries and rate limit shared with the alerts, and a restart, against a real HTTP
receiver.

The router side is real: the planner and the job store on a real SQLite index with
real files (tests/test_queue.py's Pipeline), jobs settled the way the dispatcher
settles them (claim, record_results, finish). Only the clock of the notifier is
moved forward instead of waiting.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from dicomrouter.config import parse_config
from dicomrouter.config.loader import ConfigError
from dicomrouter.observe.alerts import AlertEvaluator
from dicomrouter.observe.notify import Notifier, stable_after
from dicomrouter.queue import ItemResult
from dicomrouter.queue import states as S
from dicomrouter.store import audit
from dicomrouter.store.schema import jobs, notification_marks, notification_outbox
from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.router import RouterProcess, wait_until
from tests.support.synth import make_study
from tests.test_queue import DEST, Pipeline

ALL_ON = {
    "study_received": {"enabled": True},
    "job_completed": {"enabled": True},
    "study_delivered": {"enabled": True},
}


@dataclass
class Receiver:
    """Records POSTs; ``fail[path] = n`` answers the next n POSTs to path with 500."""

    port: int = 0
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        return [body for p, body in self.posts if path is None or p == path]

    def events(self, path: str | None = None) -> list[str]:
        return [body["event"] for body in self.bodies(path)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state.posts.append((self.path, body))
                failing = state.fail.get(self.path, 0)
                if failing:
                    state.fail[self.path] = failing - 1
            self.send_response(500 if failing else 204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


class Clock:
    """Real time plus a shift the test moves forward."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


class Router:
    """A Pipeline (receive, plan, settle jobs) and the alerter's notifier over it."""

    def __init__(
        self, tmp_path: Path, receiver: Receiver, routes: list[dict[str, Any]], **extra: Any
    ) -> None:
        config: dict[str, Any] = {
            "destinations": {"pacs": DEST, "ai": {**DEST, "ae_title": "AI"}},
            "routes": routes,
            "http": {"public_url": "https://router.example.org/"},
            "alerts": {
                "webhooks": {
                    "hook": {"url": receiver.url("/hook"), "retries": 1, "retry_delay": "10ms"},
                    "other": {"url": receiver.url("/other"), "retries": 0},
                },
                "events": {"disk_low": {"enabled": False}},
                **extra.pop("alerts", {}),
            },
            "notifications": extra.pop("notifications", ALL_ON),
            **extra,
        }
        self.pipeline = Pipeline(tmp_path, config)
        self.config = self.pipeline.config
        self.clock = Clock()
        self.alerter = self.new_alerter()

    def new_alerter(self) -> AlertEvaluator:
        """What the HTTP process builds at start (again after a restart)."""
        engine = self.pipeline.engine
        return AlertEvaluator(
            lambda: self.config, engine, engine, self.config.storage.path, self.clock
        )

    @property
    def notifier(self) -> Notifier:
        return self.alerter.notifier

    def receive(self, files: list[Path], calling_ae: str = "CT1") -> None:
        self.pipeline.receive(files, calling_ae)

    def plan(self, later: float = 0.0) -> None:
        self.pipeline.plan(later)

    def deliver(self, destination: str, item_state: str = S.ITEM_COMPLETED) -> list[int]:
        """What a worker does: claim the destination's due jobs, send, settle."""
        store = self.pipeline.jobs
        claim = store.claim(destination, "worker:1", lease=60)
        assert claim is not None, f"nothing to send to {destination}"
        store.record_results(
            [ItemResult(i.job_id, i.instance_id, item_state, 0, "") for i in claim.items]
        )
        store.finish(
            claim,
            self.config.destinations[destination],
            count_attempt=True,
            unavailable_delay=5.0,
            message="",
            outcome="completed",
            sent=len(claim.items),
            failed=0,
        )
        return claim.job_ids

    def outbox(self) -> list[dict[str, Any]]:
        with self.pipeline.engine.connect() as conn:
            rows = conn.execute(select(notification_outbox).order_by(notification_outbox.c.id))
            return [dict(row._mapping) for row in rows]


def study_uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


STUDY_ROUTE = {"name": "head", "trigger": "study", "stable_after": "30s", "to": ["pacs"]}


def test_study_route_gives_received_then_completed_then_delivered_with_documented_payloads(
    tmp_path: Path, receiver: Receiver
) -> None:
    r = Router(
        tmp_path,
        receiver,
        [STUDY_ROUTE],
        notifications={**ALL_ON, "job_completed": {"enabled": True, "webhooks": ["hook"]}},
    )
    assert stable_after(r.config) == 30.0  # the study route's quiet time
    assert r.notifier.run_once() == 0  # first pass: marks set, no backlog
    files = make_study(tmp_path / "in", 3, series_count=2, modality="CT")
    r.receive(files)
    r.plan()
    assert r.notifier.run_once() == 0  # not quiet yet
    r.clock.shift = 31
    r.plan(later=31)  # the study trigger fires: one study job
    assert r.notifier.run_once() == 2  # study_received, to both webhooks
    uid = study_uid(files)
    (received,) = receiver.bodies("/hook")
    assert received == receiver.bodies("/other")[0]
    assert received["event"] == "study_received"
    assert received["event_id"] == received["event_id"] and uid in received["event_id"]
    assert received["kind"] == "notification" and received["source"] == "dicomrouter"
    assert received["router"] == "DICOMROUTER" and received["study_instance_uid"] == uid
    assert received["link"] == f"https://router.example.org/studies/{uid}"
    study = received["study"]
    assert (study["instances"], study["series"], study["modalities"]) == (3, 2, ["CT"])
    assert study["calling_aes"] == ["CT1"] and study["bytes"] > 0
    assert study["stable_after_s"] == 30.0
    assert study["first_received_at"] <= study["last_received_at"] < received["occurred_at"]

    (job_id,) = r.deliver("pacs")
    assert r.notifier.run_once() == 3  # job_completed (hook only), study_delivered (both)
    assert receiver.events("/hook") == ["study_received", "job_completed", "study_delivered"]
    assert receiver.events("/other") == ["study_received", "study_delivered"]
    completed, delivered = receiver.bodies("/hook")[1:]
    job = completed["job"]
    assert job["id"] == job_id and completed["event_id"].startswith(f"job_completed:{job_id}:")
    assert job["link"] == f"https://router.example.org/jobs/{job_id}"
    assert (job["state"], job["destination"], job["level"], job["resource_uid"]) == (
        "completed",
        "pacs",
        "study",
        uid,
    )
    assert (job["instances"], job["completed"], job["warning"], job["skipped"]) == (3, 3, 0, 0)
    assert job["routes"] == ["head"] and job["transform"] is None and job["bytes"] > 0
    assert job["created_at"] <= job["finished_at"] == completed["occurred_at"]
    assert completed["link"] == received["link"]

    assert delivered["study_instance_uid"] == uid and delivered["link"] == received["link"]
    assert delivered["jobs"] == 1 and delivered["job_ids"] == [job_id]
    assert delivered["warnings"] is False
    (dest,) = delivered["destinations"]
    assert (dest["name"], dest["jobs"], dest["instances"], dest["completed"]) == ("pacs", 1, 3, 3)
    assert delivered["delivered_at"] == job["finished_at"] == dest["finished_at"]
    assert delivered["study"]["instances"] == 3

    # Nothing happens twice: passes later find nothing new.
    r.clock.shift = 600
    assert r.notifier.run_once() == 0
    assert len(receiver.posts) == 5
    assert {row["state"] for row in r.outbox()} == {"sent"}


def test_instance_route_completes_jobs_first_and_the_study_is_delivered_once_quiet(
    tmp_path: Path, receiver: Receiver
) -> None:
    route = {"name": "all", "to": ["pacs", "ai"]}
    r = Router(tmp_path, receiver, [route])
    assert stable_after(r.config) == 120.0  # no study trigger: the default
    r.notifier.run_once()
    files = make_study(tmp_path / "in", 2)
    r.receive(files)
    r.plan()
    r.deliver("pacs")
    r.deliver("ai", S.ITEM_WARNING)
    r.notifier.run_once()
    # Jobs are done, but the study may still be arriving: no study event yet.
    assert receiver.events("/hook") == ["job_completed"] * 4
    assert {b["job"]["state"] for b in receiver.bodies("/hook")} == {"completed", "warning"}
    r.clock.shift = 121
    r.notifier.run_once()
    assert receiver.events("/hook")[4:] == ["study_received", "study_delivered"]
    delivered = receiver.bodies("/hook")[-1]
    assert delivered["warnings"] is True and delivered["jobs"] == 4
    by_name = {d["name"]: d for d in delivered["destinations"]}
    assert (by_name["pacs"]["completed"], by_name["ai"]["warning"]) == (2, 2)
    assert by_name["pacs"]["jobs"] == by_name["ai"]["jobs"] == 2


def test_no_study_delivered_while_a_job_is_open_or_failed(
    tmp_path: Path, receiver: Receiver
) -> None:
    r = Router(
        tmp_path,
        receiver,
        [{"name": "all", "trigger": "study", "stable_after": "10s", "to": ["pacs", "ai"]}],
    )
    r.notifier.run_once()
    files = make_study(tmp_path / "in", 2)
    r.receive(files)
    r.clock.shift = 11
    r.plan(later=11)
    r.deliver("pacs")
    r.notifier.run_once()
    assert receiver.events("/hook") == ["study_received", "job_completed"]  # ai still open
    (ai_job,) = r.deliver("ai", S.ITEM_FAILED)
    r.notifier.run_once()
    assert receiver.events("/hook") == ["study_received", "job_completed"]  # failed: no event
    # An operator retries the failed job; it goes through: now the study is delivered.
    assert r.pipeline.jobs.retry([ai_job]) == 1
    r.deliver("ai")
    r.notifier.run_once()
    assert receiver.events("/hook")[2:] == ["job_completed", "study_delivered"]


def test_each_event_is_off_unless_enabled_and_marks_restart_when_turned_on(
    tmp_path: Path, receiver: Receiver
) -> None:
    assert parse_config({}, environ={}).notifications.any_enabled() is False
    r = Router(
        tmp_path,
        receiver,
        [{"name": "all", "to": ["pacs"]}],
        notifications={"job_completed": {"enabled": True}},
    )
    r.notifier.run_once()
    files = make_study(tmp_path / "in", 1)
    r.receive(files)
    r.plan()
    r.deliver("pacs")
    r.clock.shift = 200
    r.notifier.run_once()
    assert receiver.events("/hook") == ["job_completed"]  # nothing about the study
    with r.pipeline.engine.connect() as conn:
        assert set(conn.execute(select(notification_marks.c.name)).scalars()) == {"attempts"}
    # Off: the mark goes, so turning it on later does not replay what happened meanwhile.
    r.config = r.config.model_copy(
        update={"notifications": parse_config({}, environ={}).notifications}
    )
    r.notifier.run_once()
    with r.pipeline.engine.connect() as conn:
        assert conn.execute(select(notification_marks)).all() == []


def test_unknown_webhook_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(
            {"notifications": {"job_completed": {"enabled": True, "webhooks": ["nope"]}}},
            environ={},
        )
    assert "notifications.job_completed.webhooks" in str(raised.value)
    assert "unknown webhook 'nope'" in str(raised.value)


def test_a_failed_post_is_retried_then_kept_and_sent_later(
    tmp_path: Path, receiver: Receiver
) -> None:
    r = Router(
        tmp_path,
        receiver,
        [{"name": "all", "to": ["pacs"]}],
        notifications={"job_completed": {"enabled": True, "webhooks": ["hook"]}},
    )
    r.notifier.run_once()
    r.receive(make_study(tmp_path / "in", 2))
    r.plan()
    r.deliver("pacs")
    receiver.fail["/hook"] = 2  # the first POST and its one retry (webhook retries: 1)
    assert r.notifier.run_once() == 0
    assert len(receiver.posts) == 2  # both jobs wait: the webhook is skipped after a failure
    rows = r.outbox()
    assert [(row["state"], row["attempts"]) for row in rows] == [("pending", 1), ("pending", 0)]
    assert "500" in rows[0]["last_error"] and rows[0]["next_attempt_at"] > r.clock()
    assert r.notifier.run_once() == 0  # the first waits its delay, the second behind it
    r.clock.shift = 60
    assert r.notifier.run_once() == 2
    first_try, retry, first, second = receiver.bodies("/hook")
    assert first_try == retry == first  # the same payload, the same event_id
    assert second["event_id"] != first["event_id"]
    assert {row["state"] for row in r.outbox()} == {"sent"}


def test_undeliverable_notification_is_dropped_after_give_up_after_and_audited(
    tmp_path: Path, receiver: Receiver
) -> None:
    r = Router(
        tmp_path,
        receiver,
        [{"name": "all", "to": ["pacs"]}],
        notifications={
            "job_completed": {"enabled": True, "webhooks": ["other"]},
            "give_up_after": "1h",
        },
    )
    r.notifier.run_once()
    r.receive(make_study(tmp_path / "in", 1))
    r.plan()
    r.deliver("pacs")
    receiver.fail["/other"] = 100
    r.notifier.run_once()
    r.clock.shift = 3601
    r.notifier.run_once()
    assert len(receiver.posts) == 1  # dropped, not tried again
    (row,) = r.outbox()
    assert row["state"] == "dropped" and "500" in row["last_error"]
    (entry,) = audit.query(r.pipeline.engine, action="notification.")[1]
    assert (entry["action"], entry["target"], entry["outcome"]) == (
        "notification.dropped",
        row["event_id"],
        "failed",
    )


def test_rate_limit_is_shared_with_alerts_and_held_notifications_wait(
    tmp_path: Path, receiver: Receiver
) -> None:
    r = Router(
        tmp_path,
        receiver,
        [{"name": "all", "to": ["pacs"]}],
        alerts={"max_per_hour": 3},
        notifications={"job_completed": {"enabled": True, "webhooks": ["hook"]}},
    )
    r.notifier.run_once()
    # One alert (a job that failed for good) uses one of the hook's three an hour.
    with r.pipeline.engine.begin() as conn:
        conn.execute(
            jobs.insert().values(
                destination="ai",
                level="study",
                resource_uid="9",
                study_instance_uid="9",
                state=S.FAILED,
                next_attempt_at=0,
                created_at=time.time(),
                updated_at=time.time(),
                finished_at=time.time(),
                last_error="refused",
            )
        )
    alerts = r.alerter.run_once()
    assert [a.event for a in alerts] == ["job_failed"]
    r.receive(make_study(tmp_path / "in", 4))
    r.plan()
    r.deliver("pacs")
    assert r.notifier.run_once() == 2  # the alert took one of three
    assert receiver.events("/hook") == ["job_failed", "job_completed", "job_completed"]
    assert receiver.events("/other") == ["job_failed"]  # its own budget
    waiting = [row for row in r.outbox() if row["state"] == "pending"]
    assert len(waiting) == 2 and "max_per_hour" in waiting[0]["last_error"]
    # ... and the notifications use the budget the alerts have too.
    assert r.alerter._allowed("hook", 3) is False
    r.clock.shift = 3601  # an hour later the budget is back
    assert r.notifier.run_once() == 2
    assert receiver.events("/hook")[3:] == ["job_completed"] * 2


def test_events_detected_before_a_crash_are_sent_after_the_restart(
    tmp_path: Path, receiver: Receiver
) -> None:
    r = Router(
        tmp_path,
        receiver,
        [{"name": "all", "to": ["pacs"]}],
        notifications={"job_completed": {"enabled": True, "webhooks": ["hook"]}},
    )
    r.notifier.run_once()
    r.receive(make_study(tmp_path / "in", 2))
    r.plan()
    r.deliver("pacs")
    assert r.notifier.detect() == 2  # recorded in the outbox ... then the process dies
    assert receiver.posts == []
    # Meanwhile (the HTTP process down) the dispatcher goes on delivering.
    r.receive(make_study(tmp_path / "in2", 1, prefix="B"))
    r.plan()
    r.deliver("pacs")
    r.alerter = r.new_alerter()  # the restart
    assert r.notifier.run_once() == 3
    assert len({b["event_id"] for b in receiver.bodies("/hook")}) == 3
    assert r.notifier.run_once() == 0


def test_detecting_again_does_not_duplicate(tmp_path: Path, receiver: Receiver) -> None:
    """The quiet-time windows overlap (a late commit is still seen): an event found
    twice is recorded once."""
    r = Router(tmp_path, receiver, [], notifications={"study_received": {"enabled": True}})
    r.notifier.run_once()
    r.receive(make_study(tmp_path / "in", 1))
    r.clock.shift = 121
    r.notifier.run_once()
    r.clock.shift = 130
    with r.pipeline.engine.begin() as conn:  # as if the last pass had not happened
        conn.execute(update(notification_marks).values(value=time.time() - 100))
    r.notifier.run_once()
    assert receiver.events("/hook") == ["study_received"]
    # A new process (nothing remembered) finds it again: the outbox has it already.
    r.alerter = r.new_alerter()
    with r.pipeline.engine.begin() as conn:
        conn.execute(update(notification_marks).values(value=time.time() - 100))
    assert r.notifier.detect() == 0
    r.notifier.run_once()
    assert receiver.events("/hook") == ["study_received"]


@pytest.mark.sqlite_only
@pytest.mark.interop
def test_router_process_notifies_received_completed_delivered_in_order(
    tmp_path: Path, receiver: Receiver, dcmtk: None
) -> None:
    """A real router (``dicomrouter serve``) receives a study from storescu, forwards
    it to a real storescp; the webhook receiver gets the three events in order."""
    scp = StoreSCP(free_port(), "PACS", tmp_path / "pacs", accept="all").start()
    try:
        config = {
            "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": scp.port}},
            "routes": [{"name": "study", "trigger": "study", "stable_after": "1s", "to": ["pacs"]}],
            "alerts": {"webhooks": {"hook": {"url": receiver.url("/hook"), "retries": 0}}},
            "notifications": {**ALL_ON, "check_interval": "200ms"},
        }
        files = make_study(tmp_path / "in", 4, series_count=2)
        with RouterProcess(tmp_path / "router", config) as router:
            result = router.send(files)
            assert result.returncode == 0, result.stderr
            wait_until(
                lambda: "study_delivered" in receiver.events("/hook"),
                60,
                message=f"study_delivered; got {receiver.events('/hook')}\n{router.log()[-3000:]}",
            )
            time.sleep(1.0)  # nothing more should come
            log = router.log()
        assert scp.received_sops() == sop_uids(files)
    finally:
        scp.stop()
    assert receiver.events("/hook") == ["study_received", "job_completed", "study_delivered"], log
    received, completed, delivered = receiver.bodies("/hook")
    uid = study_uid(files)
    assert received["study"]["instances"] == 4 and received["study"]["calling_aes"] == ["STORESCU"]
    assert completed["job"]["destination"] == "pacs" and completed["job"]["completed"] == 4
    assert delivered["destinations"][0]["completed"] == 4
    for body in (received, completed, delivered):
        assert body["study_instance_uid"] == uid
        assert body["link"].endswith(f"/studies/{uid}") and body["link"].startswith("http://")
    assert received["occurred_at"] <= completed["occurred_at"] <= delivered["occurred_at"]


def test_a_study_received_while_the_notifier_was_down_is_notified_after_it_starts(
    tmp_path: Path, receiver: Receiver
) -> None:
    r = Router(tmp_path, receiver, [], notifications={"study_received": {"enabled": True}})
    r.notifier.run_once()  # the marks are in the index now
    files = make_study(tmp_path / "in", 2)
    r.receive(files)
    r.alerter = r.new_alerter()  # the HTTP process restarts; the study became quiet meanwhile
    r.clock.shift = 3600
    r.notifier.run_once()
    assert [b["study_instance_uid"] for b in receiver.bodies("/hook")] == [study_uid(files)]
