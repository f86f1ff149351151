"""Webhook alerts: each event type, once per incident, resolved messages, retries,
rate limit, restart, and the audit trail, against a real HTTP receiver.

The receiver is ``http.server`` in a thread; the index is a real SQLite index in a
temporary folder, seeded with the rows the dispatcher would have written.
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
from pydantic import ValidationError
from sqlalchemy import Engine, update

from dicomrouter.config import RouterConfig, parse_config
from dicomrouter.config.models import WebhookConfig
from dicomrouter.control import nodes
from dicomrouter.observe.alerts import AlertEvaluator, AlertThread, iso, post_json
from dicomrouter.store import audit, create_index_engine, heartbeat
from dicomrouter.store.schema import destination_state, jobs
from tests.support.router import all_settled, wait_until


@dataclass
class Receiver:
    """Records POSTs; ``fail[path] = n`` answers the next n POSTs to path with 500."""

    port: int = 0
    posts: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        return [body for p, _, body in self.posts if path is None or p == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.posts.append((self.path, dict(self.headers), body))
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


@dataclass
class Env:
    config: RouterConfig
    engine: Engine
    storage: Path

    def evaluator(self, clock: Any = time.time) -> AlertEvaluator:
        return AlertEvaluator(lambda: self.config, self.engine, self.engine, self.storage, clock)

    def reconfigure(self, alerts: dict[str, Any]) -> None:
        data = self.config.model_dump(mode="json")
        data["alerts"] = alerts
        self.config = parse_config(data, environ={})

    def alert_audit(self) -> list[dict[str, Any]]:
        return list(reversed(audit.query(self.engine, action="alert.", limit=1000)[1]))


def make_env(tmp_path: Path, receiver: Receiver, **events: Any) -> Env:
    data = {
        "storage": {"path": str(tmp_path / "data")},
        "destinations": {
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            "ai": {"ae_title": "AI", "host": "127.0.0.1", "port": 105},
        },
        "alerts": alerts_section(receiver, **events),
    }
    config = parse_config(data, environ={})
    config.storage.path.mkdir(parents=True)
    return Env(config, create_index_engine(config.database_url), config.storage.path)


def alerts_section(receiver: Receiver, **events: Any) -> dict[str, Any]:
    return {
        "webhooks": {
            "ops": {"url": receiver.url("/ops"), "headers": {"X-Token": "s3cret"}},
            "chat": {"url": receiver.url("/chat"), "retry_delay": "10ms"},
        },
        "events": {"disk_low": {"below": 0}, **events},
    }


def add_job(engine: Engine, destination: str, state: str, created: float, **values: Any) -> int:
    with engine.begin() as conn:
        result = conn.execute(
            jobs.insert().values(
                destination=destination,
                level="study",
                resource_uid="1.2.3",
                study_instance_uid="1.2.3",
                state=state,
                next_attempt_at=created,
                created_at=created,
                updated_at=created,
                **values,
            )
        )
        return int(result.inserted_primary_key[0])


def set_destination(engine: Engine, name: str, **values: Any) -> None:
    with engine.begin() as conn:
        updated = conn.execute(
            update(destination_state)
            .where(destination_state.c.name == name)
            .values(updated_at=time.time(), **values)
        ).rowcount
        if not updated:
            conn.execute(
                destination_state.insert().values(name=name, updated_at=time.time(), **values)
            )


# -- delivery ---------------------------------------------------------------------------


def test_post_retries_until_the_webhook_answers(receiver: Receiver) -> None:
    receiver.fail["/flaky"] = 2
    hook = WebhookConfig(
        url=receiver.url("/flaky"), headers={"Authorization": "Bearer x"}, retry_delay=0.01
    )
    result = post_json(hook, {"hello": "world"})
    assert result.ok and result.attempts == 3 and result.status == 204
    assert receiver.bodies("/flaky") == [{"hello": "world"}] * 3
    headers = receiver.posts[-1][1]
    assert headers["Authorization"] == "Bearer x"
    assert headers["Content-Type"] == "application/json"


def test_post_gives_up_after_the_retries(receiver: Receiver) -> None:
    receiver.fail["/down"] = 100
    hook = WebhookConfig(url=receiver.url("/down"), retries=1, retry_delay=0.01)
    result = post_json(hook, {})
    assert not result.ok and result.attempts == 2 and result.status == 500
    assert result.error is not None and "500" in result.error
    refused = WebhookConfig(url="http://127.0.0.1:1/", retries=0, timeout=2)
    result = post_json(refused, {})
    assert not result.ok and result.attempts == 1 and result.status is None


# -- events ---------------------------------------------------------------------------


def test_job_failed_fires_once_per_job_and_is_audited(tmp_path: Path, receiver: Receiver) -> None:
    env = make_env(tmp_path, receiver, job_failed={"webhooks": ["ops"]})
    before = add_job(env.engine, "pacs", "failed", time.time() - 60, finished_at=time.time() - 30)
    evaluator = env.evaluator()
    time.sleep(0.01)
    now = time.time()
    job = add_job(
        env.engine, "pacs", "failed", now - 100, finished_at=now, last_error="0xA900 refused"
    )
    add_job(env.engine, "pacs", "completed", now - 100, finished_at=now)

    alerts = evaluator.run_once()
    assert [(a.event, a.status, a.target) for a in alerts] == [("job_failed", "firing", "pacs")]
    [body] = receiver.bodies("/ops")
    assert receiver.bodies("/chat") == []  # this event goes to "ops" only
    assert body["event"] == "job_failed" and body["status"] == "firing"
    assert body["severity"] == "error" and body["source"] == "dicomrouter"
    assert body["details"]["count"] == 1
    assert [j["id"] for j in body["details"]["jobs"]] == [job]  # not the one before start
    assert before != job
    assert "0xA900 refused" in body["summary"] and body["text"].startswith("[FIRING]")
    [entry] = env.alert_audit()
    assert entry["action"] == "alert.job_failed" and entry["actor"] == "system"
    assert entry["target"] == "pacs" and entry["outcome"] == "ok"
    assert entry["detail"]["webhook"] == "ops" and entry["detail"]["payload"] == body

    assert evaluator.run_once() == []  # the same job never fires again
    assert len(receiver.posts) == 1


def test_destination_down_after_threshold_then_resolved(tmp_path: Path, receiver: Receiver) -> None:
    env = make_env(tmp_path, receiver, destination_down={"after": "10m"})
    now = time.time()
    set_destination(env.engine, "pacs", state="paused", paused_since=now - 300)
    clock = [now]
    evaluator = env.evaluator(lambda: clock[0])
    assert evaluator.run_once() == []  # down for 5 min only
    clock[0] = now + 301
    [alert] = evaluator.run_once()
    assert (alert.event, alert.status, alert.target) == ("destination_down", "firing", "pacs")
    assert "unreachable" in alert.summary
    assert len(receiver.bodies("/ops")) == 1 and len(receiver.bodies("/chat")) == 1
    clock[0] += 600
    assert evaluator.run_once() == []  # still down: no repeat
    set_destination(env.engine, "pacs", state="ok", paused_since=None)
    [resolved] = evaluator.run_once()
    assert resolved.status == "resolved" and resolved.target == "pacs"
    assert [b["status"] for b in receiver.bodies("/ops")] == ["firing", "resolved"]
    assert [e["detail"]["payload"]["status"] for e in env.alert_audit()] == [
        "firing",
        "firing",
        "resolved",
        "resolved",
    ]
    # Paused by an operator counts as down too.
    set_destination(env.engine, "ai", state="ok", admin_paused=1, paused_since=now - 3600)
    [paused] = evaluator.run_once()
    assert paused.target == "ai" and "paused by an operator" in paused.summary


def _node_beats(engine: Engine, node: str, at: float) -> None:
    for role in heartbeat.REQUIRED_ROLES:
        heartbeat.beat(engine, node, role, at - 600, True, "", now=at, config_version=1)


def test_node_down_fires_for_a_silent_node_and_resolves_when_it_beats(
    tmp_path: Path, receiver: Receiver
) -> None:
    env = make_env(tmp_path, receiver, node_down={"after": "1m"})
    now = time.time()
    _node_beats(env.engine, "alpha", now)
    _node_beats(env.engine, "beta", now - 30)  # down (20 s), not for a minute yet
    clock = [now]
    evaluator = env.evaluator(lambda: clock[0])
    assert evaluator.run_once() == []
    clock[0] = now + 31
    [alert] = [a for a in evaluator.run_once() if a.target == "beta"]
    assert (alert.event, alert.status) == ("node_down", "firing")
    assert alert.summary.startswith("node beta is down: no heartbeat since ")
    assert alert.details["last_heartbeat"] == iso(now - 30)
    body = receiver.bodies("/ops")[-1]
    assert body["severity"] == "critical" and body["host"] == env.config.node.name
    clock[0] += 600  # still silent: no repeat (alpha is down by now too)
    assert [a.target for a in evaluator.run_once()] == ["alpha"]
    _node_beats(env.engine, "beta", clock[0])
    [back] = [a for a in evaluator.run_once() if a.target == "beta"]
    assert (back.status, back.summary) == ("resolved", "node beta is up again")


def test_a_forgotten_node_is_not_alerted(tmp_path: Path, receiver: Receiver) -> None:
    env = make_env(tmp_path, receiver, node_down={"after": "0s"})
    now = time.time()
    _node_beats(env.engine, "gone", now - 3600)
    _node_beats(env.engine, "retired", now - 3600)
    nodes.forget(env.engine, "retired", actor="ops")  # before any alert
    evaluator = env.evaluator(lambda: now)
    [alert] = evaluator.run_once()
    assert (alert.target, alert.status) == ("gone", "firing")
    nodes.forget(env.engine, "gone", actor="ops")
    [end] = evaluator.run_once()
    assert (end.target, end.status) == ("gone", "resolved")
    assert end.summary == "node gone was forgotten (taken out)"
    assert evaluator.run_once() == []
    # A restart of the alerting process does not bring it back either.
    assert env.evaluator(lambda: now).run_once() == []


def test_queue_stale_fires_and_resolves(tmp_path: Path, receiver: Receiver) -> None:
    env = make_env(tmp_path, receiver, queue_stale={"after": "30m", "webhooks": ["chat"]})
    now = time.time()
    job = add_job(env.engine, "ai", "pending", now - 1000)
    add_job(env.engine, "ai", "scheduled", now - 9000)  # waiting for its window: not late
    clock = [now]
    evaluator = env.evaluator(lambda: clock[0])
    assert evaluator.run_once() == []  # 17 min old
    clock[0] = now + 900
    [alert] = evaluator.run_once()
    assert (alert.event, alert.target) == ("queue_stale", "ai")
    assert alert.details["oldest_pending_age_s"] >= 1900
    assert receiver.bodies("/chat")[0]["severity"] == "warning"
    with env.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job).values(state="completed"))
    [resolved] = evaluator.run_once()
    assert resolved.status == "resolved"
    assert [b["status"] for b in receiver.bodies("/chat")] == ["firing", "resolved"]
    assert receiver.bodies("/ops") == []


def test_disk_low_follows_the_live_config(tmp_path: Path, receiver: Receiver) -> None:
    env = make_env(tmp_path, receiver)
    evaluator = env.evaluator()
    assert evaluator.run_once() == []
    env.reconfigure(alerts_section(receiver, disk_low={"below": 1 << 60}))  # a hot reload
    [alert] = evaluator.run_once()
    assert (alert.event, alert.status) == ("disk_low", "firing")
    assert alert.details["free_bytes"] < 1 << 60
    assert alert.payload(env.config, time.time())["severity"] == "critical"
    env.reconfigure(alerts_section(receiver, disk_low={"below": 0}))
    [resolved] = evaluator.run_once()
    assert resolved.status == "resolved"
    env.reconfigure(alerts_section(receiver, disk_low={"below": 1 << 60, "enabled": False}))
    assert evaluator.run_once() == []


def test_a_webhook_that_stays_down_is_audited_as_failed(tmp_path: Path, receiver: Receiver) -> None:
    env = make_env(tmp_path, receiver, disk_low={"below": 1 << 60, "webhooks": ["chat"]})
    receiver.fail["/chat"] = 100
    env.evaluator().run_once()
    assert len(receiver.bodies("/chat")) == 4  # 1 + 3 retries
    [entry] = env.alert_audit()
    assert entry["action"] == "alert.disk_low" and entry["outcome"] == "failed"
    assert entry["detail"]["attempts"] == 4 and "500" in entry["detail"]["error"]


def test_rate_limit_drops_and_audits(tmp_path: Path, receiver: Receiver) -> None:
    env = make_env(tmp_path, receiver, job_failed={"webhooks": ["ops"]})
    env.reconfigure(
        {**alerts_section(receiver, job_failed={"webhooks": ["ops"]}), "max_per_hour": 1}
    )
    evaluator = env.evaluator()
    time.sleep(0.01)
    for dest in ("pacs", "ai"):
        add_job(env.engine, dest, "failed", time.time(), finished_at=time.time())
    assert len(evaluator.run_once()) == 2
    assert len(receiver.bodies("/ops")) == 1
    outcomes = sorted(e["outcome"] for e in env.alert_audit())
    assert outcomes == ["ok", "suppressed"]


def test_a_restart_neither_repeats_nor_forgets(tmp_path: Path, receiver: Receiver) -> None:
    env = make_env(tmp_path, receiver, destination_down={"after": "1m", "webhooks": ["ops"]})
    set_destination(env.engine, "pacs", state="paused", paused_since=time.time() - 120)
    assert len(env.evaluator().run_once()) == 1
    restarted = env.evaluator()  # a new HTTP process: state rebuilt from the audit log
    assert restarted.run_once() == []
    set_destination(env.engine, "pacs", state="ok", paused_since=None)
    [resolved] = restarted.run_once()
    assert resolved.status == "resolved"
    assert [b["status"] for b in receiver.bodies("/ops")] == ["firing", "resolved"]


def test_no_webhooks_no_alerts(tmp_path: Path, receiver: Receiver) -> None:
    env = make_env(tmp_path, receiver)
    env.reconfigure({"events": {"disk_low": {"below": 1 << 60}}})
    assert env.evaluator().run_once() == []
    assert receiver.posts == [] and env.alert_audit() == []


def test_alert_thread_checks_every_interval(tmp_path: Path, receiver: Receiver) -> None:
    env = make_env(tmp_path, receiver)
    env.reconfigure({**alerts_section(receiver), "check_interval": "50ms"})
    thread = AlertThread(env.evaluator())
    thread.start()
    try:
        time.sleep(0.01)
        add_job(env.engine, "pacs", "failed", time.time(), finished_at=time.time())
        wait_until(lambda: len(receiver.bodies("/ops")) == 1, 10, message="the alert")
    finally:
        thread.stop()
    assert not thread.is_alive()


def test_alert_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="unknown webhook 'pager'"):
        RouterConfig.model_validate({"alerts": {"events": {"job_failed": {"webhooks": ["pager"]}}}})
    with pytest.raises(ValidationError, match="http:// or https://"):
        RouterConfig.model_validate({"alerts": {"webhooks": {"x": {"url": "ftp://host/"}}}})


@pytest.mark.sqlite_only
def test_real_router_alerts_when_a_destination_goes_down_and_back(
    tmp_path: Path, receiver: Receiver, dcmtk: None
) -> None:
    """The alert thread runs in the router's HTTP process, with the node's config."""
    from tests.support.dcmtk import StoreSCP, free_port
    from tests.support.router import RouterProcess
    from tests.support.synth import make_small_study

    pacs_port = free_port()
    config = {
        "destinations": {
            "pacs": {
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs_port,
                "pause_after_failures": 1,
                "probe_interval": "200ms",
                "retry": {"initial_delay": "100ms", "max_delay": "200ms"},
            }
        },
        "routes": [{"name": "all", "to": ["pacs"]}],
        "http": {"bind": "127.0.0.1"},
        "alerts": {
            "webhooks": {"ops": {"url": receiver.url("/ops")}},
            "check_interval": "200ms",
            "events": {"destination_down": {"after": "1s"}, "disk_low": {"below": 0}},
        },
    }
    with RouterProcess(tmp_path / "router", config) as router:
        assert router.send(make_small_study(tmp_path / "ct", 2)).returncode == 0

        def statuses() -> list[tuple[str, str]]:
            return [(b["event"], b["status"]) for b in receiver.bodies("/ops")]

        wait_until(lambda: ("destination_down", "firing") in statuses(), 30, message="firing")
        with StoreSCP(pacs_port, "PACS", tmp_path / "pacs"):
            wait_until(
                lambda: ("destination_down", "resolved") in statuses(), 30, message="resolved"
            )
            router.wait_jobs(all_settled, 30, "delivery after the outage")
    down = [s for s in statuses() if s[0] == "destination_down"]
    assert down == [("destination_down", "firing"), ("destination_down", "resolved")]
    engine = create_index_engine(
        f"sqlite:///{router.storage / 'index.sqlite'}", create=False, writer=False
    )
    entries = audit.query(engine, action="alert.destination_down")[1]
    assert sorted(e["detail"]["payload"]["status"] for e in entries) == ["firing", "resolved"]
    assert all(e["outcome"] == "ok" and e["target"] == "pacs" for e in entries)


def test_one_node_alerts_and_another_takes_over_when_it_dies(
    tmp_path: Path, receiver: Receiver, postgres: Any, postgres_url: str
) -> None:
    """Two nodes' alert threads on one PostgreSQL: only the leader (the advisory lock's
    holder) checks and sends; when its session dies the other takes over, without
    repeating the alert the first one sent, and resolves it."""
    from dicomrouter.store.leadership import Leadership, lock_key

    threads, engines = [], []
    for name in ("a", "b"):
        data = {
            "database": postgres_url,
            "storage": {"path": str(tmp_path / name)},
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
            "alerts": alerts_section(receiver, destination_down={"after": "1m"}),
        }
        config = parse_config(data, environ={})
        config.storage.path.mkdir(parents=True)
        engine = create_index_engine(postgres_url)
        evaluator = AlertEvaluator(lambda c=config: c, engine, engine, config.storage.path)
        threads.append(AlertThread(evaluator, Leadership(engine, "alerts")))
        engines.append(engine)
    a, b = threads
    set_destination(engines[0], "pacs", state="paused", paused_since=time.time() - 120)

    def round_of(thread: AlertThread) -> list[Any] | None:
        return thread.evaluator.run_once() if thread.leads() else None

    assert [len(round_of(a) or []), round_of(b)] == [1, None]  # a leads; b does nothing
    assert round_of(b) is None and round_of(a) == []  # no repeat, still one leader
    assert [body["status"] for body in receiver.bodies("/ops")] == ["firing"]

    # a's node dies: PostgreSQL ends its session, and the lock goes with it.
    key = lock_key("alerts")
    postgres.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
        f"AND granted AND classid = {(key >> 32) & 0xFFFFFFFF}::bigint::oid "
        f"AND objid = {key & 0xFFFFFFFF}::bigint::oid AND objsubid = 1"
    )
    wait_until(b.leads, 10, message="b takes the alerts over")
    assert not a.leads()  # a learns it lost the lock (its connection is gone)
    assert b.evaluator.run_once() == []  # the incident a fired is not fired again
    set_destination(engines[0], "pacs", state="ok", paused_since=None)
    [resolved] = b.evaluator.run_once()
    assert resolved.status == "resolved"
    assert [body["status"] for body in receiver.bodies("/ops")] == ["firing", "resolved"]
    for thread in threads:
        assert thread.leadership is not None
        thread.leadership.release()
    for engine in engines:
        engine.dispose()


@pytest.mark.sqlite_only
def test_on_sqlite_the_one_node_always_leads(tmp_path: Path, receiver: Receiver) -> None:
    from dicomrouter.store.leadership import Leadership

    env = make_env(tmp_path, receiver)
    assert Leadership(env.engine, "alerts").check()
