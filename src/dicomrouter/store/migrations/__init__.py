"""Schema migrations of the index, for SQLite and PostgreSQL alike: Alembic
revisions shipped in the package (``versions/``), run from ``create_index_engine``.
No ``alembic.ini``: the script directory is this folder.

- A new index is created at the head (``metadata.create_all``) and stamped with it:
  revisions are never replayed to build one.
- An index at an older revision is upgraded in place, in one transaction.
- An index from before Alembic (SQLite, versions 1 to 7, which said their version
  only in ``meta_info``) is stamped with the revision of its version (``0001`` to
  ``0007``) and upgraded from there: ``versions/0002`` to ``0007`` are the in-place
  upgrades of that time (:mod:`.legacy`).

``meta_info.schema`` keeps the version too (the head's number): a dicomrouter from
before Alembic refuses an index newer than itself by that row. The common case, an
index already at the head, costs two one-row reads, and Alembic (whose import takes
a few hundred milliseconds) is loaded only when there is something to upgrade.

A new revision: ``alembic revision -m "what changes"`` from the repository root
(``[tool.alembic]`` in pyproject.toml), then write its ``upgrade()`` with ``op``
for both databases, bump ``schema.SCHEMA_VERSION`` to its number, and change
``schema.py`` to match (a test compares an upgraded index with a new one).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, inspect, select

from ..schema import SCHEMA_VERSION, meta_info, metadata
from . import legacy

SCRIPT_LOCATION = Path(__file__).resolve().parent
#: The revision of the schema ``schema.py`` describes; revision ids are the schema
#: version on four digits.
HEAD = f"{SCHEMA_VERSION:04d}"
#: The last version from before Alembic.
LEGACY_HEAD = 7
_VERSION_TABLE = "alembic_version"


class IndexVersionError(RuntimeError):
    """The index is newer than this dicomrouter."""


def _newer(found: str) -> IndexVersionError:
    return IndexVersionError(
        f"index schema version {found} is newer than this dicomrouter "
        f"({SCHEMA_VERSION}); upgrade dicomrouter"
    )


def _current_revision(conn: Connection, tables: set[str]) -> str | None:
    if _VERSION_TABLE not in tables:
        return None
    row = conn.exec_driver_sql(f"SELECT version_num FROM {_VERSION_TABLE}").first()
    return None if row is None else str(row[0])


def _stamp(conn: Connection, revision: str) -> None:
    """What ``alembic stamp`` writes (the same table, the same constraint name)."""
    conn.exec_driver_sql(
        f"CREATE TABLE IF NOT EXISTS {_VERSION_TABLE} (version_num VARCHAR(32) NOT NULL, "
        "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
    )
    conn.exec_driver_sql(f"DELETE FROM {_VERSION_TABLE}")
    conn.exec_driver_sql(f"INSERT INTO {_VERSION_TABLE} (version_num) VALUES ('{revision}')")


def _set_version(conn: Connection) -> None:
    conn.execute(
        meta_info.update().where(meta_info.c.key == "schema").values(value=str(SCHEMA_VERSION))
    )


def upgrade(conn: Connection) -> bool:
    """Create the schema, or bring it to the head, inside the caller's transaction.
    Returns True when the index was new. Raises :class:`IndexVersionError` for an
    index newer than this code."""
    tables = set(inspect(conn).get_table_names())
    row = None
    if meta_info.name in tables:
        row = conn.execute(select(meta_info.c.value).where(meta_info.c.key == "schema")).first()
    if row is None:
        metadata.create_all(conn)
        _stamp(conn, HEAD)
        conn.execute(meta_info.insert().values(key="schema", value=str(SCHEMA_VERSION)))
        return True
    version = int(row.value)
    if version > SCHEMA_VERSION:
        raise _newer(str(version))
    current = _current_revision(conn, tables)
    if version < LEGACY_HEAD or current is None:
        # Last opened by a dicomrouter from before Alembic: its meta_info says where
        # it stands, whatever an earlier stamp said.
        current = f"{min(version, LEGACY_HEAD):04d}"
        _stamp(conn, current)
        legacy.create_missing_tables(conn)
    if current != HEAD:
        _run_revisions(conn, current)
        _set_version(conn)
    elif version != SCHEMA_VERSION:
        _set_version(conn)
    return False


def _run_revisions(conn: Connection, current: str) -> None:
    """Alembic's upgrade from ``current`` to the head, on ``conn``."""
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    script = ScriptDirectory.from_config(config)
    try:
        script.get_revision(current)
    except Exception:
        raise _newer(f"revision {current}") from None

    def steps(revision, _context):  # type: ignore[no-untyped-def]
        return script._upgrade_revs(HEAD, revision)

    with EnvironmentContext(config, script, fn=steps, destination_rev=HEAD) as env:
        env.configure(connection=conn, target_metadata=metadata)
        env.run_migrations()
