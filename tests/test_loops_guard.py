"""The runtime loop guards in-process: the real planner, index and API on a temporary
index (tests/support/seed.py), for what the end-to-end tests cannot show cheaply:
status and trace of a held instance, its release, a study forwarded whole that
includes a held instance, and the ``loop_detected`` alert."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from dicomrouter.config import hosts
from dicomrouter.control import loops
from dicomrouter.observe.alerts import AlertEvaluator
from dicomrouter.queue import loops as queue_loops
from dicomrouter.store import Provenance, read_header
from dicomrouter.store.dialect import WRITE_LOCK_KEY
from dicomrouter.store.schema import instances, job_instances, loop_events
from tests.support.api import ApiEnv, api_env
from tests.support.dcmtk import free_port
from tests.support.seed import Seeder, store_as_receiver

PACS = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def _env(tmp_path: Path, route: dict[str, Any], **extra: Any) -> tuple[ApiEnv, Seeder]:
    env = api_env(
        tmp_path,
        {
            "destinations": {"pacs": PACS},
            "routes": [{"name": "to-pacs", "to": ["pacs"], **route}],
            **extra,
        },
    )
    return env, Seeder(env, tmp_path / "in")


def _receive_again(
    seeder: Seeder, files: list[Path], calling_ae: str, source: str = "192.0.2.9"
) -> None:
    """The same instances arrive once more (a new generation), from ``calling_ae``."""
    provenance = Provenance(calling_ae, "ROUTER", source)
    store_as_receiver(seeder.env.store, seeder.index, files, provenance)


def _deliveries(env: ApiEnv) -> list[tuple[int, int]]:
    with env.engine.connect() as conn:
        rows = conn.execute(
            select(job_instances.c.instance_id, job_instances.c.generation).order_by(
                job_instances.c.instance_id, job_instances.c.generation
            )
        ).all()
    return [(row[0], row[1]) for row in rows]


def test_a_copy_back_from_the_destination_is_held_shown_and_releasable(tmp_path: Path) -> None:
    env, seeder = _env(tmp_path, {})
    files = seeder.receive_study(2, calling_ae="CT1")
    seeder.plan()
    seeder.deliver("pacs")
    assert _deliveries(env) == [(1, 1), (2, 1)]

    _receive_again(seeder, files, calling_ae="PACS")  # PACS sends them straight back
    seeder.plan()
    assert _deliveries(env) == [(1, 1), (2, 1)]  # nothing queued for the copies
    held = loops.held(env.engine)
    assert {(h.instance_id, h.generation, h.destination) for h in held} == {
        (1, 2, "pacs"),
        (2, 2, "pacs"),
    }
    assert "came back from pacs (PACS at 192.0.2.9)" in held[0].reason

    status = env.viewer.get("/api/v1/status").json()
    assert status["loops"] == {"held": 2}
    uid = str(read_header(files[0]).StudyInstanceUID)
    trace = env.viewer.get(f"/api/v1/studies/{uid}/trace").json()
    [event] = [e for e in trace["events"] if e["kind"] == "loop"]
    assert event["decision"] == "held" and event["instances"] == 2
    assert event["destination"] == "pacs" and "routing loop" in event["message"]
    page = env.viewer.get(f"/studies/{uid}").text
    assert "2 instances held" in page
    assert "2 instance(s) held as a routing loop" in env.viewer.get("/").text

    released = loops.release(env.engine, [held[0].id], actor="alice", source="cli")
    assert [r.id for r in released] == [held[0].id]
    seeder.plan()  # the released copy is routed after all; the other stays held
    assert _deliveries(env) == sorted([(1, 1), (2, 1), (held[0].instance_id, 2)])
    assert env.viewer.get("/api/v1/status").json()["loops"] == {"held": 1}


def test_a_study_forwarded_whole_leaves_its_held_instances_out(tmp_path: Path) -> None:
    env, seeder = _env(tmp_path, {"trigger": "study", "stable_after": "1s"})
    files = seeder.receive_study(2, calling_ae="CT1")
    seeder.plan()
    seeder.deliver("pacs")
    _receive_again(seeder, files[:1], calling_ae="PACS")  # one comes back: held
    _receive_again(seeder, files[1:], calling_ae="CT1")  # one is sent again by the CT
    seeder.plan()  # the study trigger fires again for the CT's copy
    with env.engine.connect() as conn:
        first = conn.execute(
            select(instances.c.id).where(
                instances.c.sop_instance_uid == str(read_header(files[0]).SOPInstanceUID)
            )
        ).scalar_one()
    assert (first, 2) not in _deliveries(env)
    assert len(_deliveries(env)) == 3  # both first copies, and the CT's second copy


def test_held_instances_through_the_api_and_metrics(tmp_path: Path) -> None:
    env, seeder = _env(tmp_path, {})
    files = seeder.receive_study(2, calling_ae="CT1")
    seeder.plan()
    seeder.deliver("pacs")
    _receive_again(seeder, files, calling_ae="PACS")
    seeder.plan()

    held = env.viewer.get("/api/v1/loops").json()["held"]
    assert len(held) == 2 and {h["destination"] for h in held} == {"pacs"}
    assert "dicomrouter_loop_held_instances 2.0" in env.viewer.get("/metrics").text
    assert env.viewer.post("/api/v1/loops/release", json={"all": True}).status_code == 403
    assert env.operator.post("/api/v1/loops/release", json={}).status_code == 422
    answer = env.operator.post("/api/v1/loops/release", json={"ids": [held[0]["id"]]})
    assert answer.status_code == 200
    assert [r["id"] for r in answer.json()["released"]] == [held[0]["id"]]
    assert len(env.viewer.get("/api/v1/loops").json()["held"]) == 1
    everything = env.viewer.get("/api/v1/loops", params={"released": True}).json()["held"]
    assert [h["released_by"] for h in everything if h["released_at"]] == ["operator-token"]
    entries = env.admin.get("/api/v1/audit", params={"action": "loop.release"}).json()
    assert [e["actor"] for e in entries["items"]] == ["operator-token"]


def test_our_own_copy_back_through_an_unrecognised_self_destination_is_held(
    tmp_path: Path,
) -> None:
    """A destination that is this router under a name the configuration check could
    not resolve in time: what comes back from this machine under the calling AE title
    we present to it is our own copy, and is held."""
    env, seeder = _env(tmp_path, {})
    env.config.destinations["pacs"].ae_title = "SELF-BY-NAME"
    files = seeder.receive_study(2, calling_ae="CT1")
    seeder.plan()
    seeder.deliver("pacs")
    _receive_again(seeder, files[:1], calling_ae=env.config.ae_title, source="127.0.0.1")
    _receive_again(seeder, files[1:], calling_ae=env.config.ae_title, source="192.0.2.9")
    seeder.plan()
    assert [(h.instance_id, h.generation) for h in loops.held(env.engine)] == [(1, 2)]
    assert (2, 2) in _deliveries(env)  # from another machine: not our copy


def test_with_no_window_nothing_is_held(tmp_path: Path) -> None:
    env, seeder = _env(tmp_path, {}, dispatch={"loop_window": 0})
    files = seeder.receive_study(1, calling_ae="CT1")
    seeder.plan()
    seeder.deliver("pacs")
    _receive_again(seeder, files, calling_ae="PACS")
    seeder.plan()
    assert _deliveries(env) == [(1, 1), (1, 2)]
    assert loops.held(env.engine) == []


def test_loop_detected_alerts_once_per_destination_and_not_again_after_a_restart(
    tmp_path: Path,
) -> None:
    webhook = {"url": f"http://127.0.0.1:{free_port()}/hook", "retries": 0, "timeout": "1s"}
    env, seeder = _env(tmp_path, {}, alerts={"webhooks": {"ops": webhook}})

    def evaluator() -> AlertEvaluator:
        return AlertEvaluator(lambda: env.config, env.engine, env.engine, env.store.root)

    first = evaluator()
    files = seeder.receive_study(2, calling_ae="CT1")
    seeder.plan()
    seeder.deliver("pacs")
    _receive_again(seeder, files, calling_ae="PACS")
    seeder.plan()

    [alert] = first.run_once()  # nobody listens: sent and failed, but audited
    assert (alert.event, alert.status, alert.target) == ("loop_detected", "firing", "pacs")
    assert alert.details["count"] == 2 and len(alert.details["instances"]) == 2
    assert "routing loop" in alert.summary
    assert alert.payload(env.config, 0.0)["severity"] == "error"
    assert first.run_once() == []  # the same holds never alert twice
    assert evaluator().check() == []  # nor after a restart (read back from the audit log)
    with env.engine.connect() as conn:
        assert conn.execute(select(loop_events.c.id)).all()


def _postgresql_write_lock(engine: Engine) -> str:
    """The PostgreSQL equivalent of trying SQLite's write lock: the advisory lock every
    writer transaction takes (store/dialect.py), tried from another connection."""
    import psycopg

    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as probe:
        if probe.execute(f"SELECT pg_try_advisory_lock({WRITE_LOCK_KEY})").fetchone() == (True,):
            probe.execute(f"SELECT pg_advisory_unlock({WRITE_LOCK_KEY})")
            return "free"
        return "held by a writer"


def test_a_hanging_name_lookup_never_holds_the_index_write_lock(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The send-back guard needs the destination's addresses. Looked up inside the
    planner's transaction, a DNS server that hangs held the write lock that every
    C-STORE needs for a second per instance; it is looked up before it now."""
    host = f"pacs-{uuid.uuid4().hex}.invalid"  # never cached by an earlier test
    env = api_env(
        tmp_path,
        {
            "destinations": {"pacs": {**PACS, "host": host}},
            "routes": [{"name": "to-pacs", "to": ["pacs"]}],
        },
    )
    seeder = Seeder(env, tmp_path / "in")
    database = str(env.engine.url.database)
    seen: list[str] = []
    answer = threading.Event()

    def write_lock() -> str:
        if env.engine.dialect.name == "postgresql":
            return _postgresql_write_lock(env.engine)
        probe = sqlite3.connect(database, timeout=0)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.rollback()
            return "free"
        except sqlite3.OperationalError as exc:
            return str(exc)
        finally:
            probe.close()

    def hanging_getaddrinfo(name: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(write_lock())  # what a receiver committing now would find
        answer.wait(10)
        raise OSError("no answer")

    monkeypatch.setattr(hosts.socket, "getaddrinfo", hanging_getaddrinfo)
    monkeypatch.setattr(queue_loops, "RESOLVE_TIMEOUT", 0.2)
    try:
        seeder.receive_study(2, calling_ae="PACS")
        seeder.plan()
    finally:
        answer.set()
    assert seen == ["free"]
    # Unresolved in time, the AE title decided: not sent back to the PACS.
    assert _deliveries(env) == []
    with env.engine.connect() as conn:
        kinds = set(conn.execute(select(loop_events.c.kind)).scalars())
    assert kinds == {"not_sent_back"}
