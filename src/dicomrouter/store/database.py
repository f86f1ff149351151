"""Engine creation: the embedded SQLite default, tuned for several processes.

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when it
returns, which is what lets the receiver answer success right after it. The
receiver and the dispatcher are separate processes, so a generous busy timeout
turns lock contention into short waits instead of errors.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select
from sqlalchemy.engine import make_url

from .private import PRIVATE_FILE, private_file, tighten
from .schema import SCHEMA_VERSION, meta_info, metadata


class IndexVersionError(RuntimeError):
    pass


#: Upgrades of an existing index, by the version they produce. New tables are made
#: by ``create_all``; only changes to existing tables need a step here. Each step
#: runs in the same transaction as the version bump.
MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE destination_state ADD COLUMN admin_paused INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS ix_instances_received_at ON instances (received_at)",
        "CREATE INDEX IF NOT EXISTS ix_instances_accession ON instances (accession_number)",
        "CREATE INDEX IF NOT EXISTS ix_route_matches_route ON route_matches (route, matched_at)",
        "CREATE INDEX IF NOT EXISTS ix_jobs_state ON jobs (state)",
        "CREATE INDEX IF NOT EXISTS ix_jobs_created ON jobs (created_at)",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_updated ON job_instances (updated_at)",
    ],
    3: [
        "ALTER TABLE instances ADD COLUMN purged_at FLOAT",
        "ALTER TABLE instances ADD COLUMN purge_reason TEXT",
        "CREATE INDEX IF NOT EXISTS ix_instances_live ON instances (purged_at, received_at, size)",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_instance "
        "ON job_instances (instance_id, state)",
    ],
    # Instances an earlier version set aside for good (routed = -1) are retried now.
    4: [
        "INSERT INTO unplanned (instance_id, generation, attempts, first_failed_at, "
        "next_attempt_at, last_error) SELECT id, generation, 1, received_at, 0, "
        "'set aside by an earlier version, which never retried it' FROM instances "
        "WHERE routed = -1 AND id NOT IN (SELECT instance_id FROM unplanned)",
    ],
    # 5: the http_sessions table (server-side dashboard sessions) is new: create_all
    # makes it, nothing else changes.
    5: [],
    # Connection failures (unreachable destination) are counted apart from delivery
    # attempts; open jobs get theirs from the attempts they already recorded.
    6: [
        "ALTER TABLE jobs ADD COLUMN connection_failures INTEGER NOT NULL DEFAULT 0",
        "UPDATE jobs SET connection_failures = (SELECT count(*) FROM attempts "
        "WHERE attempts.job_id = jobs.id AND attempts.outcome = 'unavailable') "
        "WHERE state IN ('scheduled', 'pending', 'in_progress')",
    ],
    # Transforms: a job names its routes' pipeline, and a delivery is unique per
    # (destination, instance, generation, pipeline). The unique constraint changes,
    # so job_instances is rebuilt (SQLite cannot alter a constraint).
    7: [
        "ALTER TABLE jobs ADD COLUMN transform VARCHAR(128) NOT NULL DEFAULT ''",
        "CREATE TABLE job_instances_v7 ("
        "job_id INTEGER NOT NULL REFERENCES jobs (id), "
        "instance_id INTEGER NOT NULL REFERENCES instances (id), "
        "destination VARCHAR(128) NOT NULL, generation INTEGER NOT NULL, "
        "state VARCHAR(16) NOT NULL, status INTEGER, message TEXT, "
        "updated_at FLOAT NOT NULL, transform VARCHAR(128) NOT NULL DEFAULT '', "
        "sent_as TEXT, sent_uid VARCHAR(64), commitment VARCHAR(16), "
        "commitment_uid VARCHAR(64), PRIMARY KEY (job_id, instance_id), "
        "CONSTRAINT uq_delivery_v7 UNIQUE (destination, instance_id, generation, transform))",
        "INSERT INTO job_instances_v7 (job_id, instance_id, destination, generation, state, "
        "status, message, updated_at) SELECT job_id, instance_id, destination, generation, "
        "state, status, message, updated_at FROM job_instances",
        "DROP TABLE job_instances",
        "ALTER TABLE job_instances_v7 RENAME TO job_instances",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_state ON job_instances (job_id, state)",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_updated ON job_instances (updated_at)",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_instance "
        "ON job_instances (instance_id, state)",
        "CREATE INDEX IF NOT EXISTS ix_job_instances_commitment ON job_instances (commitment_uid)",
    ],
    # Groups (``type: group``): a job remembers the group it was planned through;
    # the group_affinity and group_rotation tables are new (create_all).
    8: [
        "ALTER TABLE jobs ADD COLUMN via_group VARCHAR(128)",
    ],
}


#: The audit log is append-only: the index itself refuses to change or delete a row.
#: (Retention's audit pruning lifts the DELETE guard inside its own transaction only:
#: see ``retention/prune.py``.)
_APPEND_ONLY_SQLITE = [
    f"CREATE TRIGGER IF NOT EXISTS audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
    for verb in ("UPDATE", "DELETE")
]
APPEND_ONLY_DELETE_TRIGGER = _APPEND_ONLY_SQLITE[1]


_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", re.IGNORECASE)


def _already_applied(conn: Connection, statement: str) -> bool:
    """An ``ADD COLUMN`` whose column exists (SQLite has no ``IF NOT EXISTS`` for it):
    an index some steps of which were applied by hand, or a copy restored over a
    newer schema, upgrades instead of failing. Other steps say ``IF NOT EXISTS``."""
    match = _ADD_COLUMN.match(statement.strip())
    if match is None:
        return False
    table, column = match.groups()
    return column in {c["name"] for c in inspect(conn).get_columns(table)}


def _private_sqlite(path: Path) -> None:
    """The index holds patient names, the audit log and (in configuration versions)
    password hashes: create it 0600 before SQLite does (its WAL and shared-memory
    files take the database file's mode), and tighten all three if they exist."""
    private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        tighten(path.with_name(path.name + suffix), PRIVATE_FILE)


def _sqlite_pragmas(busy_timeout_ms: int, synchronous: str):  # type: ignore[no-untyped-def]
    def apply(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return apply


def create_index_engine(
    url: str,
    create: bool = True,
    busy_timeout_ms: int = 60_000,
    writer: bool = True,
    durable_commits: bool = True,
) -> Engine:
    """Open (and by default create or check) the index at ``url``.

    ``busy_timeout_ms`` is how long SQLite itself waits for a lock. Its busy handler
    sleeps in steps of up to 100 ms; the receiver sets 0 and retries with sub-
    millisecond sleeps instead (see ``InstanceIndex``), because every millisecond it
    waits is a millisecond a modality waits for its C-STORE response.

    A ``writer`` engine starts every transaction with ``BEGIN IMMEDIATE`` (the write
    lock up-front, so concurrent writers queue instead of failing); a reader engine
    (``writer=False``) never takes the write lock: WAL lets it read alongside writers.

    ``durable_commits=False`` (SQLite ``synchronous=NORMAL``, per connection) is for
    the dispatch process: its commits do not wait for an fsync of the WAL, so it
    holds the write lock the receiver needs for far less time. Atomicity is
    unchanged; a power loss may forget the last of those commits (a planned batch,
    a delivery result), which is re-planned or re-sent: at least once, as after any
    crash. The next durable commit (every C-STORE's) syncs them anyway, the WAL
    being one sequential file. What was promised to a sender stays ``FULL``.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if create and parsed.database and parsed.database != ":memory:":
            _private_sqlite(Path(parsed.database))
        engine = create_engine(
            url,
            connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
        )
        synchronous = "FULL" if durable_commits else "NORMAL"
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms, synchronous))
        # pysqlite's own transaction handling defers BEGIN; take the write lock
        # up-front so concurrent writers queue instead of failing with "locked".
        if writer:
            event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))

        @event.listens_for(engine, "connect")
        def _no_auto_begin(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            dbapi_connection.isolation_level = None

    else:
        engine = create_engine(url, pool_pre_ping=True)
    if create:
        metadata.create_all(engine)
        if parsed.get_backend_name() == "sqlite":
            with engine.begin() as conn:
                for statement in _APPEND_ONLY_SQLITE:
                    conn.exec_driver_sql(statement)
        with engine.begin() as conn:
            row = conn.execute(select(meta_info.c.value).where(meta_info.c.key == "schema")).first()
            if row is None:
                conn.execute(meta_info.insert().values(key="schema", value=str(SCHEMA_VERSION)))
            elif int(row.value) > SCHEMA_VERSION:
                raise IndexVersionError(
                    f"index schema version {row.value} is newer than this dicomrouter "
                    f"({SCHEMA_VERSION}); upgrade dicomrouter"
                )
            elif int(row.value) < SCHEMA_VERSION:
                for version in range(int(row.value) + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS.get(version, []):
                        if not _already_applied(conn, statement):
                            conn.exec_driver_sql(statement)
                conn.execute(
                    meta_info.update()
                    .where(meta_info.c.key == "schema")
                    .values(value=str(SCHEMA_VERSION))
                )
    return engine
