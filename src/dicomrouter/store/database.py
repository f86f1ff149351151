"""Engine creation: the embedded SQLite default, tuned for several processes.

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when it
returns, which is what lets the receiver answer success right after it. The
receiver and the dispatcher are separate processes, so a generous busy timeout
turns lock contention into short waits instead of errors.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url

from .schema import SCHEMA_VERSION, meta_info, metadata


class IndexVersionError(RuntimeError):
    pass


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_index_engine(url: str, create: bool = True) -> Engine:
    """Open (and by default create or check) the index at ``url``."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take the write lock
        # up-front so concurrent writers queue instead of failing with "locked".
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))

        @event.listens_for(engine, "connect")
        def _no_auto_begin(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            dbapi_connection.isolation_level = None

    else:
        engine = create_engine(url, pool_pre_ping=True)
    if create:
        metadata.create_all(engine)
        with engine.begin() as conn:
            row = conn.execute(select(meta_info.c.value).where(meta_info.c.key == "schema")).first()
            if row is None:
                conn.execute(meta_info.insert().values(key="schema", value=str(SCHEMA_VERSION)))
            elif int(row.value) > SCHEMA_VERSION:
                raise IndexVersionError(
                    f"index schema version {row.value} is newer than this dicomrouter "
                    f"({SCHEMA_VERSION}); upgrade dicomrouter"
                )
    return engine
