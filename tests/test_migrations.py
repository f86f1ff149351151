"""Schema migrations (Alembic, ``store/migrations``) on both databases.

A new index is created at the head; an index at an older revision is upgraded in
place; an index from before Alembic (SQLite, ``meta_info`` only) is upgraded from
its version; an index newer than the code is refused. "Matches the schema" is
Alembic's own comparison of the database with ``schema.py``: no difference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event, inspect, text

from dicomrouter.queue import JobStore
from dicomrouter.queue import jobs as queue_jobs
from dicomrouter.queue import states as S
from dicomrouter.store import create_index_engine, migrations
from dicomrouter.store.migrations import IndexVersionError
from dicomrouter.store.schema import JOB_WAITING, SCHEMA_VERSION, jobs, metadata


def _differences(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def _versions(engine: Engine) -> tuple[str, str]:
    with engine.connect() as conn:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        schema = conn.execute(text("SELECT value FROM meta_info WHERE key = 'schema'")).scalar()
    return str(revision), str(schema)


def test_the_head_revision_is_the_schema_version() -> None:
    config = Config()
    config.set_main_option("script_location", str(migrations.SCRIPT_LOCATION))
    script = ScriptDirectory.from_config(config)
    assert script.get_heads() == [migrations.HEAD] == [f"{SCHEMA_VERSION:04d}"]


def test_a_new_index_is_created_at_the_head_and_matches_the_schema(index_url: str) -> None:
    engine = create_index_engine(index_url)
    assert _versions(engine) == (migrations.HEAD, str(SCHEMA_VERSION))
    assert _differences(engine) == []
    engine.dispose()


@pytest.mark.sqlite_only
def test_an_index_from_before_alembic_is_upgraded_to_match_the_schema(tmp_path: Path) -> None:
    """Version 1 as a dicomrouter of that time left it: later columns, indexes and
    tables missing, no ``alembic_version``."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    engine = create_index_engine(url)
    with engine.begin() as conn:
        for statement in (
            "ALTER TABLE destination_state DROP COLUMN admin_paused",
            "DROP INDEX ix_instances_received_at",
            "DROP INDEX ix_instances_live",
            "DROP INDEX ix_job_instances_instance",
            "ALTER TABLE instances DROP COLUMN purged_at",
            "ALTER TABLE instances DROP COLUMN purge_reason",
            "ALTER TABLE jobs DROP COLUMN connection_failures",
            "ALTER TABLE jobs DROP COLUMN via_group",
            "DROP TABLE group_affinity",
            "DROP TABLE group_rotation",
            "DROP TABLE unplanned",
            "DROP TABLE http_sessions",
            "DROP TABLE alembic_version",
            "UPDATE meta_info SET value = '1' WHERE key = 'schema'",
        ):
            conn.exec_driver_sql(statement)
    engine.dispose()
    engine = create_index_engine(url)
    assert _versions(engine) == (migrations.HEAD, str(SCHEMA_VERSION))
    assert _differences(engine) == []
    engine.dispose()


@pytest.mark.sqlite_only
def test_an_index_of_schema_8_from_before_alembic_upgrades(tmp_path: Path) -> None:
    """Schema 8 (groups) was an in-place step for a while before Alembic: such an
    index says 8 in ``meta_info``, has the groups' column and tables, and no
    ``alembic_version``. It is stamped at the last legacy revision and comes through
    revision 0008, which finds its work done."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    engine = create_index_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE alembic_version")
    engine.dispose()
    engine = create_index_engine(url)
    assert _versions(engine) == (migrations.HEAD, str(SCHEMA_VERSION))
    assert _differences(engine) == []
    engine.dispose()


def test_an_index_newer_than_this_code_is_refused(index_url: str) -> None:
    create_index_engine(index_url).dispose()
    engine = create_index_engine(index_url, create=False)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    with pytest.raises(IndexVersionError, match="newer than this dicomrouter"):
        create_index_engine(index_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE meta_info SET value = '{SCHEMA_VERSION + 1}'"))
    with pytest.raises(IndexVersionError, match="newer than this dicomrouter"):
        create_index_engine(index_url)
    engine.dispose()


_NEXT_REVISION = '''"""A later schema: what the next real revision will look like."""

import sqlalchemy as sa
from alembic import op

revision = "{next}"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("note", sa.Text(), nullable=False, server_default=""))
    op.create_index("ix_jobs_note", "jobs", ["note"])
'''


def test_an_index_at_an_older_revision_is_upgraded_in_place(
    index_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path every later revision takes, on both databases: the index made today
    is upgraded in place by a revision written with Alembic's ``op``, in the
    transaction that opens it, and says so in ``alembic_version`` and ``meta_info``."""
    engine = create_index_engine(index_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO meta_info (key, value) VALUES ('kept', 'yes')"))
    engine.dispose()
    later = tmp_path / "migrations"
    shutil.copytree(migrations.SCRIPT_LOCATION, later)
    following = f"{SCHEMA_VERSION + 1:04d}"
    (later / "versions" / f"{following}_note.py").write_text(
        _NEXT_REVISION.format(next=following, head=migrations.HEAD)
    )
    monkeypatch.setattr(migrations, "SCRIPT_LOCATION", later)
    monkeypatch.setattr(migrations, "HEAD", following)
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    engine = create_index_engine(index_url)
    assert _versions(engine) == (following, str(SCHEMA_VERSION + 1))
    with engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("jobs")}
        kept = conn.execute(text("SELECT value FROM meta_info WHERE key = 'kept'")).scalar()
    assert "note" in columns and kept == "yes"
    engine.dispose()


def _claim_plan(engine: Engine, monkeypatch: pytest.MonkeyPatch, backlog: int) -> str:
    """The query plan of the claim's statement that picks the jobs, one job due and
    ``backlog`` as the threshold of a backlog (queue/jobs.py), as the database would
    run it on an index of any size: PostgreSQL is told to avoid a scan of the table
    and a sort (on a tiny table it would rightly prefer them), so the plan shows
    whether an index gives the claim order."""
    with engine.begin() as conn:
        conn.execute(
            jobs.insert().values(
                destination="pacs", level="study", resource_uid="1.2", state="pending",
                next_attempt_at=0.0, created_at=0.0, updated_at=0.0,
            )
        )  # fmt: skip
    statements: list[tuple[str, object]] = []

    def grab(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append((statement, parameters))

    monkeypatch.setattr(queue_jobs, "BACKLOG", backlog)
    event.listen(engine, "before_cursor_execute", grab)
    try:
        assert JobStore(engine).claim("pacs", "node:1", lease=60) is not None
    finally:
        event.remove(engine, "before_cursor_execute", grab)
    statement, parameters = next(s for s in statements if "ORDER BY" in s[0])
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        cursor = raw.cursor()
        if engine.dialect.name == "postgresql":
            cursor.execute("SET enable_seqscan = off")
            cursor.execute("SET enable_sort = off")
            cursor.execute("EXPLAIN " + statement, parameters)
        else:
            cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
        plan = "\n".join(str(row[-1]) for row in cursor.fetchall())
        raw.rollback()
    return plan


@pytest.mark.parametrize("prebuilt", [False, True], ids=["built", "built_beforehand"])
def test_an_index_of_schema_9_gets_the_claim_and_resource_indexes(
    index_url: str, prebuilt: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revision 0010 on an index of schema 9 (its ``ix_jobs_resource`` led by
    destination and level, no ``ix_jobs_waiting``; or with ``ix_jobs_waiting`` built
    beforehand by an operator, CONCURRENTLY): the upgraded index is the new one, and
    the claim reads its jobs from ``ix_jobs_waiting`` in claim order, without a sort."""
    engine = create_index_engine(index_url)
    with engine.begin() as conn:
        if not prebuilt:
            conn.exec_driver_sql("DROP INDEX ix_jobs_waiting")
        conn.exec_driver_sql("DROP INDEX ix_jobs_resource")
        conn.exec_driver_sql(
            "CREATE INDEX ix_jobs_resource ON jobs (destination, level, resource_uid)"
        )
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0009'")
        conn.exec_driver_sql("UPDATE meta_info SET value = '9' WHERE key = 'schema'")
    engine.dispose()
    engine = create_index_engine(index_url)
    assert _versions(engine) == (migrations.HEAD, str(SCHEMA_VERSION))
    assert _differences(engine) == []
    with engine.connect() as conn:
        found = {ix["name"]: ix["column_names"] for ix in inspect(conn).get_indexes("jobs")}
    assert found["ix_jobs_resource"] == ["destination", "resource_uid", "state"]
    assert "ix_jobs_waiting" in found
    plan = _claim_plan(engine, monkeypatch, backlog=1)
    assert "ix_jobs_waiting" in plan and "Sort" not in plan and "B-TREE" not in plan, plan
    engine.dispose()


@pytest.mark.sqlite_only
def test_a_claim_of_a_few_due_jobs_among_many_backing_off_reads_them_from_ix_jobs_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer jobs due than a backlog: the claim reads the due ones (a range of
    ``ix_jobs_claim``) and sorts them, instead of walking ``ix_jobs_waiting`` past
    every job backing off. (PostgreSQL chooses from its statistics either way.)"""
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    plan = _claim_plan(engine, monkeypatch, backlog=1000)
    assert "ix_jobs_claim (destination=? AND state=? AND next_attempt_at<?)" in plan, plan
    engine.dispose()


def test_the_claims_condition_is_the_waiting_states_of_the_queue() -> None:
    """``ix_jobs_waiting`` and the claim share one condition, written with literals
    (a partial index is used only by the very same expression): the waiting states."""
    rendered = str(JOB_WAITING.compile(compile_kwargs={"literal_binds": True}))
    assert rendered == "jobs.state IN (" + ", ".join(f"'{s}'" for s in S.WAITING_STATES) + ")"
