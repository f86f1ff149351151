"""Retention where operators see and drive it: /api/v1/status, the dashboard, the trace,
/metrics, ``dicomrouter purge``, the sweeper thread and the schema upgrade."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, text

from dicomrouter.control.retention import purge
from dicomrouter.retention.sweeper import sweep_forever
from dicomrouter.store import audit, create_index_engine
from dicomrouter.store.schema import SCHEMA_VERSION, audit_log, instances, purge_runs
from tests.support.api import ApiEnv, api_env
from tests.support.dcmtk import HOST, StoreSCP, sop_uids
from tests.support.retention import Site
from tests.support.router import RouterProcess, wait_until
from tests.support.seed import Seeder
from tests.support.synth import make_study

DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}


def seeded(tmp_path: Path, **retention: object) -> tuple[ApiEnv, Seeder]:
    """3 instances delivered (study 1), 2 failed (study 2); delivered ones due at once."""
    env = api_env(
        tmp_path,
        {
            "destinations": {"pacs": DEST},
            "routes": [{"name": "all", "to": ["pacs"]}],
            "retention": {"delete_delivered_after": "0s", **retention},
        },
    )
    seed = Seeder(env, tmp_path / "in")
    seed.receive_study(3)
    seed.plan()
    seed.deliver("pacs")
    seed.receive_study(2)
    seed.plan()
    seed.deliver("pacs", fail=True)
    return env, seed


def test_status_dashboard_and_metrics_show_stored_eligible_purged_and_kept(
    tmp_path: Path,
) -> None:
    env, _ = seeded(tmp_path)
    before = env.viewer.get("/api/v1/status").json()["retention"]
    assert before["as_of"] is None and before["last_run"] is None
    assert before["stored"] == 5 and before["stored_bytes"] > 0  # counted now, not per run
    dry = purge(env.config, env.engine, env.store, actor="alice", source="test", dry_run=True)
    assert dry.purged == 3 and dry.eligible == 3 and dry.undelivered == 2
    report = purge(env.config, env.engine, env.store, actor="alice", source="test")
    assert report.purged == 3
    status = env.viewer.get("/api/v1/status").json()["retention"]
    assert status["stored"] == 2 and status["stored_bytes"] > 0
    assert status["eligible"] == 0
    assert status["kept_undelivered"] == 2 and status["kept_undelivered_bytes"] > 0
    assert status["purged"] == 3 and status["purged_bytes"] == report.purged_bytes
    assert status["last_run"]["actor"] == "alice" and status["last_run"]["error"] is None

    page = env.viewer.get("/").text
    assert "Kept because undelivered" in page and "Eligible for purge" in page

    metrics = env.viewer.get("/metrics").text
    assert "dicomrouter_retention_kept_undelivered_instances 2.0" in metrics
    assert "dicomrouter_retention_stored_instances 2.0" in metrics
    assert "dicomrouter_retention_eligible_instances 0.0" in metrics
    assert "dicomrouter_retention_last_run_ok 1.0" in metrics

    _, entries = audit.query(env.engine, action="retention.purge")
    assert {e["action"] for e in entries} == {"retention.purge", "retention.purge.dry_run"}
    assert all(e["actor"] == "alice" for e in entries)


def test_the_trace_of_a_purged_study_says_where_it_went_and_when_it_was_purged(
    tmp_path: Path,
) -> None:
    env, _ = seeded(tmp_path)
    purge(env.config, env.engine, env.store, actor="system", source="test")
    with env.engine.connect() as conn:
        study = (
            conn.execute(
                select(instances.c.study_instance_uid)
                .where(instances.c.purged_at.is_not(None))
                .distinct()
            )
        ).scalar_one()
    trace = env.viewer.get(f"/api/v1/studies/{study}/trace").json()
    kinds = [e["kind"] for e in trace["events"]]
    assert "delivered" in kinds and kinds[-1] == "purged"
    [purged] = [e for e in trace["events"] if e["kind"] == "purged"]
    assert purged["instances"] == 3 and "delete_delivered_after" in purged["reason"]
    assert trace["study"]["purged"] == 3 and trace["study"]["purged_at"] is not None
    page = env.viewer.get(f"/studies/{study}").text
    assert "deleted" in page and "by retention" in page and "Purged" in page


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomrouter", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_purge_dry_run_then_purge_audited_as_the_local_user(tmp_path: Path) -> None:
    site = Site(
        tmp_path,
        retention={"delete_delivered_after": "0s"},
        storage={"path": str(tmp_path / "store"), "min_free_space": 0},
    )
    paths = site.receive(make_study(tmp_path / "in", 2))
    site.plan()
    site.settle()
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(site.settings()))

    dry = _cli("purge", "--dry-run", "-c", str(config))
    assert dry.returncode == 0, dry.stderr
    assert "would delete 2 object(s)" in dry.stdout and "2 delivered" in dry.stdout
    assert all(site.store.absolute(p).exists() for p in paths)

    done = _cli("purge", "-c", str(config), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["purged"] == 2
    assert not any(site.store.absolute(p).exists() for p in paths)
    with site.engine.connect() as conn:
        rows = conn.execute(
            select(audit_log.c.actor, audit_log.c.action, audit_log.c.source).where(
                audit_log.c.action.like("retention.purge%")
            )
        ).all()
    user = getpass.getuser()
    assert {(r.actor, r.action, r.source) for r in rows} == {
        (user, "retention.purge.dry_run", "cli"),
        (user, "retention.purge", "cli"),
    }

    missing = _cli("purge", "-c", str(tmp_path / "nope.yaml"))
    assert missing.returncode != 0


def test_cli_purge_refuses_while_another_purge_runs(tmp_path: Path) -> None:
    import fcntl

    site = Site(tmp_path, storage={"path": str(tmp_path / "store"), "min_free_space": 0})
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(site.settings()))
    with open(site.store.root / ".purge.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = _cli("purge", "-c", str(config))
    assert busy.returncode == 1 and "already running" in busy.stderr


def test_the_sweeper_purges_on_its_own_and_audits_it(tmp_path: Path) -> None:
    env, _ = seeded(tmp_path, interval="1h")
    stop = threading.Event()
    thread = threading.Thread(
        target=sweep_forever, args=(lambda: env.config, env.engine, env.store, stop), daemon=True
    )
    thread.start()
    try:

        def ran() -> bool:
            with env.engine.connect() as conn:
                return (
                    conn.execute(
                        select(purge_runs.c.purged).where(purge_runs.c.ended_at.is_not(None))
                    ).first()
                    is not None
                )

        wait_until(ran, 30, message="a sweeper run")
    finally:
        stop.set()
        thread.join(30)
    with env.engine.connect() as conn:
        assert conn.execute(select(purge_runs.c.purged)).scalars().all() == [3]
    _, entries = audit.query(env.engine, action="retention.purge")
    assert [(e["actor"], e["source"]) for e in entries] == [("system", "dispatch")]


@pytest.mark.sqlite_only
def test_an_index_from_schema_2_is_upgraded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    engine = create_index_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_instances_live"))
        conn.execute(text("DROP INDEX ix_job_instances_instance"))
        conn.execute(text("ALTER TABLE instances DROP COLUMN purged_at"))
        conn.execute(text("ALTER TABLE instances DROP COLUMN purge_reason"))
        conn.execute(text("UPDATE meta_info SET value = '2' WHERE key = 'schema'"))
    engine.dispose()
    upgraded = create_index_engine(url)
    with upgraded.connect() as conn:
        columns = {row[1] for row in conn.execute(text("PRAGMA table_info(instances)"))}
        version = conn.execute(text("SELECT value FROM meta_info WHERE key='schema'")).scalar()
    assert {"purged_at", "purge_reason"} <= columns and version == str(SCHEMA_VERSION)


@pytest.mark.sqlite_only
def test_an_index_from_schema_5_counts_connection_failures(tmp_path: Path) -> None:
    """Schema 6 counts connection failures apart from delivery attempts: an open job
    takes its count from the attempts it recorded as unavailable."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    engine = create_index_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN connection_failures"))
        for job_id, state in ((1, "pending"), (2, "failed")):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, destination, level, resource_uid, study_instance_uid,"
                    " routes, state, priority, attempts, next_attempt_at, created_at, updated_at)"
                    f" VALUES ({job_id}, 'pacs', 'study', '1.2', '1.2', 'r', '{state}', 0, 0, 0,"
                    " 0, 0)"
                )
            )
            for outcome in ("unavailable", "unavailable", "retry"):
                conn.execute(
                    text(
                        "INSERT INTO attempts (job_id, started_at, outcome, sent, failed)"
                        f" VALUES ({job_id}, 0, '{outcome}', 0, 0)"
                    )
                )
        conn.execute(text("UPDATE meta_info SET value = '5' WHERE key = 'schema'"))
    engine.dispose()
    upgraded = create_index_engine(url)
    with upgraded.connect() as conn:
        counts = dict(conn.execute(text("SELECT id, connection_failures FROM jobs")).all())
        version = conn.execute(text("SELECT value FROM meta_info WHERE key='schema'")).scalar()
    assert counts == {1: 2, 2: 0} and version == str(SCHEMA_VERSION)


@pytest.mark.sqlite_only
def test_a_running_router_delivers_then_purges_and_keeps_the_trace(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    """End to end with real peers: storescu -> router -> storescp, then the sweeper in
    the dispatch process deletes the delivered files; the trace still answers."""
    config = {
        "storage": {"min_free_space": 0},
        "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": pacs.port}},
        "routes": [{"name": "all", "to": ["pacs"]}],
        "retention": {"delete_delivered_after": "0s", "interval": "1s"},
    }
    files = make_study(tmp_path / "in", 3)
    with RouterProcess(tmp_path / "router", config) as router:
        assert router.send(files).returncode == 0
        wait_until(lambda: pacs.received_sops() == sop_uids(files), 60, message="delivered")
        stored = router.storage / "objects"
        wait_until(
            lambda: not any(p.is_file() for p in stored.rglob("*.dcm")), 60, message="purged"
        )
        engine = create_index_engine(f"sqlite:///{router.storage / 'index.sqlite'}", create=False)
        with engine.connect() as conn:
            rows = conn.execute(select(instances.c.purged_at, instances.c.purge_reason)).all()
        assert len(rows) == 3 and all(r.purged_at and "delivered" in r.purge_reason for r in rows)
        # The run is audited once it has finished, a moment after its last unlink.
        wait_until(lambda: audit.query(engine, action="retention.purge")[1], 30, message="audited")
        _, entries = audit.query(engine, action="retention.purge")
        assert entries[0]["actor"] == "system"
        engine.dispose()


def test_the_sweeper_evicts_as_soon_as_free_space_falls_below_the_target(
    tmp_path: Path,
) -> None:
    target = 10**12
    env, _ = seeded(tmp_path, interval="1h", free_space_target=target)
    env.store.free_bytes = lambda: target + 1  # type: ignore[method-assign]
    config = env.config.model_copy(
        update={
            "retention": env.config.retention.model_copy(
                update={"delete_delivered_after": 30 * 86400.0}
            )
        }
    )
    stop = threading.Event()
    thread = threading.Thread(
        target=sweep_forever, args=(lambda: config, env.engine, env.store, stop), daemon=True
    )
    thread.start()
    try:

        def runs() -> int:
            with env.engine.connect() as conn:
                return len(
                    conn.execute(
                        select(purge_runs.c.id).where(purge_runs.c.ended_at.is_not(None))
                    ).all()
                )

        wait_until(lambda: runs() == 1, 30, message="the first sweep")
        with env.engine.connect() as conn:
            assert conn.execute(select(purge_runs.c.evicted)).scalar_one() == 0
        # The disk fills up: long before the hour is over, the delivered objects go.
        env.store.free_bytes = lambda: target - 1  # type: ignore[method-assign]
        wait_until(lambda: runs() == 2, 30, message="a sweep for free space")
    finally:
        stop.set()
        thread.join(30)
    with env.engine.connect() as conn:
        evicted = conn.execute(
            select(purge_runs.c.evicted).order_by(purge_runs.c.id.desc())
        ).first()
    # One byte missing, and free space never rises here: one object's worth goes (the
    # oldest delivered one), not everything evictable.
    assert evicted is not None and evicted.evicted == 1


def test_cli_purge_of_a_storage_folder_it_cannot_write_fails_clearly(tmp_path: Path) -> None:
    site = Site(tmp_path, storage={"path": str(tmp_path / "store"), "min_free_space": 0})
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(site.settings()))
    lock = site.store.root / ".purge.lock"
    lock.mkdir()  # cannot be opened as a file, as if it belonged to another user
    result = _cli("purge", "-c", str(config))
    assert result.returncode == 1 and "cannot purge" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_on_cli_purge_checks_what_it_moved_before_exiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while 'dicomrouter purge' has files in trash (one of them a copy received
    again and acknowledged after the mark): the file is back before the command exits."""
    from pydicom import dcmread
    from typer.testing import CliRunner

    from dicomrouter.cli.main import app
    from dicomrouter.retention.purge import Purger

    site = Site(tmp_path, storage={"path": str(tmp_path / "store"), "min_free_space": 0})
    original = make_study(tmp_path / "in", 1)
    [relative] = site.receive(original)
    site.plan()
    site.settle()
    ds = dcmread(original[0])
    ds.StudyDescription = "second copy"
    copy = tmp_path / "second.dcm"
    ds.save_as(copy)
    config = tmp_path / "router.yaml"
    settings = site.settings()
    settings["retention"]["delete_delivered_after"] = 0
    config.write_text(yaml.safe_dump(settings))
    real_to_trash = Purger._to_trash

    def to_trash(self: Purger, rel: str) -> Path | None:
        site.receive([copy])  # received again in full after the mark: live again
        real_to_trash(self, rel)
        raise KeyboardInterrupt

    monkeypatch.setattr(Purger, "_to_trash", to_trash)
    result = CliRunner().invoke(app, ["purge", "-c", str(config)])
    assert result.exit_code == 130, result.output
    assert site.live_without_file() == []
    assert dcmread(site.store.absolute(relative)).StudyDescription == "second copy"
    assert list(site.store.trash.iterdir()) == []
