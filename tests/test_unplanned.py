"""Instances that cannot be planned are planned again later, never left behind.

The index write is made to fail for real (a trigger that aborts every new job,
as a full disk or a broken database would), then made to work again.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import Connection, select

from dicomrouter.queue import unplanned
from dicomrouter.store import create_index_engine
from dicomrouter.store.schema import instances, jobs
from dicomrouter.store.schema import unplanned as unplanned_rows
from tests.support.synth import make_study
from tests.test_queue import DEST, Pipeline, route, uids

#: A trigger that makes every new job fail as a full disk would, per database.
_BREAK = {
    "sqlite": [
        "CREATE TRIGGER broken_index BEFORE INSERT ON jobs "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION broken_index() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'database or disk is full' USING ERRCODE = 'disk_full'; END $$",
        "CREATE TRIGGER broken_index BEFORE INSERT ON jobs "
        "FOR EACH ROW EXECUTE FUNCTION broken_index()",
    ],
}
_REPAIR = {
    "sqlite": ["DROP TRIGGER broken_index"],
    "postgresql": ["DROP TRIGGER broken_index ON jobs", "DROP FUNCTION broken_index()"],
}


def break_index(conn: Connection) -> None:
    for statement in _BREAK[conn.dialect.name]:
        conn.exec_driver_sql(statement)


def repair_index(conn: Connection) -> None:
    for statement in _REPAIR[conn.dialect.name]:
        conn.exec_driver_sql(statement)


def _pipeline(tmp_path: Path) -> Pipeline:
    return Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})


def _rows(p: Pipeline) -> list[tuple[int, int, float, str]]:
    with p.engine.connect() as conn:
        return [
            (row.instance_id, row.attempts, row.next_attempt_at, row.last_error)
            for row in conn.execute(select(unplanned_rows).order_by(unplanned_rows.c.instance_id))
        ]


def test_an_instance_that_cannot_be_planned_is_retried_with_backoff_until_planned(
    tmp_path: Path,
) -> None:
    p = _pipeline(tmp_path)
    files = make_study(tmp_path / "in", 3)
    p.receive(files)
    with p.engine.begin() as conn:
        break_index(conn)
    before = time.time()
    p.plan()
    rows = _rows(p)
    assert len(rows) == 3
    for _, attempts, next_at, error in rows:
        assert attempts == 1
        assert before + unplanned.FIRST_DELAY <= next_at <= time.time() + unplanned.FIRST_DELAY
        assert "database or disk is full" in error
    assert p.job_list() == []
    # Not due yet: nothing is tried.
    assert p.planner.retry_unplanned(now=before) == 0
    assert [r[1] for r in _rows(p)] == [1, 1, 1]
    # Due, still failing: tried again, and the delay doubles.
    tried = time.time()
    assert p.planner.retry_unplanned(now=tried + 10) == 0
    for _, attempts, next_at, _ in _rows(p):
        assert attempts == 2
        assert next_at >= tried + 2 * unplanned.FIRST_DELAY
    # The index works again: the next due retry plans every instance, no restart.
    with p.engine.begin() as conn:
        repair_index(conn)
    assert p.planner.retry_unplanned(now=time.time() + 3600) == 3
    assert _rows(p) == []
    planned = p.job_list()
    assert len(planned) == 3
    assert set().union(*(p.members(j["id"]) for j in planned)) == uids(files)
    with p.engine.connect() as conn:
        assert set(conn.execute(select(instances.c.routed)).scalars()) == {1}


def test_the_delay_doubles_up_to_a_cap() -> None:
    delays = [unplanned.retry_delay(n) for n in range(1, 12)]
    assert delays[:3] == [5.0, 10.0, 20.0]
    assert delays[-1] == unplanned.MAX_DELAY
    assert delays == sorted(delays)


def test_replan_now_makes_set_aside_instances_due_at_once(tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    p.receive(make_study(tmp_path / "in", 2))
    with p.engine.begin() as conn:
        break_index(conn)
    p.plan()
    with p.engine.begin() as conn:
        repair_index(conn)
    assert p.planner.retry_unplanned() == 0  # not due for 5 s
    first = _rows(p)[0][0]
    assert unplanned.replan_now(p.engine, [first]) == 1
    assert p.planner.retry_unplanned() == 1
    assert [r[0] for r in _rows(p)] != [first] and len(_rows(p)) == 1
    assert unplanned.replan_now(p.engine) == 1
    assert p.planner.retry_unplanned() == 1
    assert _rows(p) == [] and len(p.job_list()) == 2


def test_summary_lists_what_waits(tmp_path: Path) -> None:
    p = _pipeline(tmp_path)
    files = make_study(tmp_path / "in", 2)
    p.receive(files)
    with p.engine.begin() as conn:
        break_index(conn)
    p.plan()
    found = unplanned.summary(p.engine)
    assert found.count == 2 and found.oldest_failed_at is not None
    assert {item.sop_instance_uid for item in found.items} == uids(files)
    assert all(item.attempts == 1 and item.last_error for item in found.items)


@pytest.mark.sqlite_only
def test_instances_an_earlier_version_set_aside_are_retried_after_the_upgrade(
    tmp_path: Path,
) -> None:
    p = _pipeline(tmp_path)
    p.receive(make_study(tmp_path / "in", 2))
    with p.engine.begin() as conn:  # as version 2 left them: routed = -1, never retried
        conn.execute(instances.update().values(routed=-1))
        conn.exec_driver_sql("UPDATE meta_info SET value = '2' WHERE key = 'schema'")
    p.engine.dispose()
    engine = create_index_engine(p.config.database_url)  # upgrades
    assert unplanned.summary(engine).count == 2
    p.engine = engine
    p.planner.engine = engine
    p.planner.jobs.engine = engine
    assert p.planner.retry_unplanned() == 2
    with engine.connect() as conn:
        assert len(conn.execute(select(jobs.c.id)).all()) == 2


def test_an_instance_whose_header_cannot_be_read_waits_instead_of_missing_its_routes(
    tmp_path: Path,
) -> None:
    """Conditional routes need the header: an unreadable file is not planned as if
    none of them matched (its deliveries would be lost quietly); it is retried."""
    p = Pipeline(
        tmp_path,
        {"destinations": {"pacs": DEST}, "routes": [route(when={"Modality": "CT"})]},
    )
    files = make_study(tmp_path / "in", 2)
    p.receive(files)
    with p.engine.connect() as conn:
        first_path = conn.execute(select(instances.c.path).order_by(instances.c.id)).scalar()
    stored = p.store.absolute(first_path)
    intact = stored.read_bytes()
    stored.write_bytes(b"")  # damaged storage
    p.plan()
    [(instance_id, attempts, _, error)] = _rows(p)
    assert attempts == 1 and "cannot re-read" in error
    assert len(p.job_list()) == 1  # the other instance was not held up
    stored.write_bytes(intact)
    assert p.planner.retry_unplanned(now=time.time() + 60) == 1
    assert set().union(*(p.members(j["id"]) for j in p.job_list())) == uids(files)
