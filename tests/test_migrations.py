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
from sqlalchemy import Engine, inspect, text

from dicomrouter.store import create_index_engine, migrations
from dicomrouter.store.migrations import IndexVersionError
from dicomrouter.store.schema import SCHEMA_VERSION, metadata


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
