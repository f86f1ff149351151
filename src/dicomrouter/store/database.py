"""Engine creation: the embedded SQLite default, tuned for several processes, or
PostgreSQL (``postgresql://``, through psycopg 3).

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when it
returns, which is what lets the receiver answer success right after it. The
receiver and the dispatcher are separate processes, so a generous busy timeout
turns lock contention into short waits instead of errors.

PostgreSQL commits durably by default (``synchronous_commit=on``). SQLite lets one
writer in at a time, and every write transaction (``BEGIN IMMEDIATE``) relies on it:
the planner, claims, retention, commitments, the loop guards, the audit log. On
PostgreSQL a writer engine takes one transaction-level advisory lock first
(:data:`.dialect.WRITE_LOCK_SQL`), which gives those transactions exactly the same
guarantee; the reasons are in docs/deployment.md ("One node on PostgreSQL").
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from dicomrouter.config.models import index_url

from . import migrations
from .dialect import POSTGRESQL, SQLITE, WRITE_LOCK_SQL
from .private import PRIVATE_FILE, private_file, tighten

#: The audit log is append-only: the index itself refuses to change or delete a row.
#: (Retention's audit pruning lifts the DELETE guard inside its own transaction only:
#: see ``retention/prune.py``.)
_APPEND_ONLY_SQLITE = [
    f"CREATE TRIGGER IF NOT EXISTS audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
    for verb in ("UPDATE", "DELETE")
]
APPEND_ONLY_DELETE_TRIGGER = _APPEND_ONLY_SQLITE[1]

#: The setting (transaction-local, ``SET LOCAL``) under which the PostgreSQL trigger
#: lets a DELETE of audit rows through: retention's audit pruning, and nothing else.
#: A role that may not DELETE from ``audit_log`` at all (the documented REVOKE) is
#: refused whatever it sets.
AUDIT_PRUNE_SETTING = "dicomrouter.prune_audit"

#: PostgreSQL: one function refuses UPDATE, DELETE and TRUNCATE of the audit log
#: (DELETE only under :data:`AUDIT_PRUNE_SETTING`). Created with the schema; the owner
#: of the table alone may drop it, which is why the application role should not own
#: it where the log must hold against the application itself (docs/deployment.md).
APPEND_ONLY_POSTGRESQL = [
    "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN "
    f"IF TG_OP = 'DELETE' AND current_setting('{AUDIT_PRUNE_SETTING}', true) = 'on' "
    "THEN RETURN OLD; END IF; "
    "RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'restrict_violation'; "
    "END $$",
    "CREATE OR REPLACE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    "CREATE OR REPLACE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
]


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


def missing_index_file(url: str) -> Path | None:
    """The SQLite file ``url`` names, when it does not exist yet (the commands that
    read an index refuse to create an empty one); None for PostgreSQL, which the
    router never creates."""
    parsed = make_url(index_url(url))
    if parsed.get_backend_name() != SQLITE or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def _sqlite_engine(
    url: str, create: bool, busy_timeout_ms: int, writer: bool, durable_commits: bool
) -> Engine:
    database = make_url(url).database
    if create and database and database != ":memory:":
        _private_sqlite(Path(database))
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

    return engine


def _postgresql_engine(
    url: str, busy_timeout_ms: int, writer: bool, durable_commits: bool
) -> Engine:
    """PostgreSQL waits for a lock without polling, so SQLite's busy timeout becomes
    ``lock_timeout`` (the receiver's 0, "do not sleep in SQLite's busy handler",
    becomes the same 60 s its own retries allow). ``durable_commits=False`` is
    ``synchronous_commit=off``: the same bargain as SQLite's ``synchronous=NORMAL``
    (atomic, may forget the last commits on a power loss, never corrupts). Settings
    travel in the connection's start-up packet: no extra round trip."""
    options = [f"-c lock_timeout={int(busy_timeout_ms or 60_000)}"]
    if not durable_commits:
        options.append("-c synchronous_commit=off")
    engine = create_engine(url, pool_pre_ping=True, connect_args={"options": " ".join(options)})
    if writer:
        # SQLite's BEGIN IMMEDIATE: one writer transaction at a time (released at
        # commit or rollback). Readers and the receiver's one-statement upserts do
        # not take it.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(WRITE_LOCK_SQL))
    return engine


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
    lock up-front, so concurrent writers queue instead of failing; on PostgreSQL the
    advisory lock of :data:`.dialect.WRITE_LOCK_SQL`); a reader engine
    (``writer=False``) never takes the write lock: WAL lets it read alongside writers
    (PostgreSQL readers never wait for writers).

    ``durable_commits=False`` (SQLite ``synchronous=NORMAL``, per connection) is for
    the dispatch process: its commits do not wait for an fsync of the WAL, so it
    holds the write lock the receiver needs for far less time. Atomicity is
    unchanged; a power loss may forget the last of those commits (a planned batch,
    a delivery result), which is re-planned or re-sent: at least once, as after any
    crash. The next durable commit (every C-STORE's) syncs them anyway, the WAL
    being one sequential file. What was promised to a sender stays ``FULL``.
    """
    url = index_url(url)
    backend = make_url(url).get_backend_name()
    if backend == SQLITE:
        engine = _sqlite_engine(url, create, busy_timeout_ms, writer, durable_commits)
    elif backend == POSTGRESQL:
        engine = _postgresql_engine(url, busy_timeout_ms, writer, durable_commits)
    else:
        raise ValueError(f"database: {backend} is not supported (sqlite or postgresql)")
    if create:
        with engine.begin() as conn:
            new = migrations.upgrade(conn)
            if backend == SQLITE:
                # Every start (IF NOT EXISTS): an index from before the triggers gets them.
                for statement in _APPEND_ONLY_SQLITE:
                    conn.exec_driver_sql(statement)
            elif new:
                for statement in APPEND_ONLY_POSTGRESQL:
                    conn.exec_driver_sql(statement)
    return engine
