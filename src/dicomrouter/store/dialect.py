"""What differs between the index's two databases, SQLite and PostgreSQL, in one place.

Everything else is SQLAlchemy Core, written once. Here: the INSERT that has
``ON CONFLICT`` (both databases share the syntax, SQLAlchemy has one construct per
dialect), which errors mean "the index is busy, try again", the lock that gives
PostgreSQL's writers SQLite's one-writer-at-a-time (see ``database.py``), and whose
clock leases and due times are measured by (:func:`database_now`).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Boolean, Connection, Engine, Integer, Table, text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

SQLITE = "sqlite"
POSTGRESQL = "postgresql"

#: PostgreSQL's errors that mean "another transaction was in the way, the same work
#: can succeed if tried again": serialization_failure, deadlock_detected,
#: lock_not_available (``lock_timeout`` ran out).
BUSY_SQLSTATES = frozenset({"40001", "40P01", "55P03"})

#: The key of the transaction-level advisory lock every writer transaction takes on
#: PostgreSQL (``pg_advisory_xact_lock``): PostgreSQL's equivalent of SQLite's
#: ``BEGIN IMMEDIATE``. Any constant works; this one spells "dicomrtr" in ASCII.
WRITE_LOCK_KEY = 0x6469636F6D727472
WRITE_LOCK_SQL = f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"


#: The database server's clock, as seconds since the epoch. ``clock_timestamp()``, not
#: ``now()``: a writer transaction may have waited for the write lock, and the time
#: that matters is when its statements run, not when it began.
_NOW_SQL = "SELECT extract(epoch FROM clock_timestamp())"


def database_now(conn: Connection) -> float:
    """The time every node agrees on, for leases and "due" times: the database's.

    Several nodes share one PostgreSQL index, and their clocks drift; a node whose
    clock runs an hour ahead would otherwise take live leases of the others as
    expired, and one an hour behind would leave expired ones alone. So a lease's
    expiry, a job's next attempt and a trigger's quiet time are written and compared
    in the server's time (one round trip, on the transaction's connection). SQLite
    is one file on one machine: its processes share the machine's clock, which is
    ``time.time()``, with no round trip."""
    if conn.dialect.name == POSTGRESQL:
        return float(conn.exec_driver_sql(_NOW_SQL).scalar_one())
    return time.time()


def notify(conn: Connection, channel: str, payload: str) -> None:
    """PostgreSQL's ``NOTIFY channel, payload``, sent when ``conn``'s transaction
    commits (never if it rolls back). Nothing on SQLite, which has no other node to
    tell: its readers poll."""
    if conn.dialect.name == POSTGRESQL:
        conn.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload}
        )


#: Keepalives of a dedicated connection, both ends: a node that vanishes from the
#: network (power cut, cable) is noticed by the server within about 25 s, which then
#: ends its session and frees what it held (an advisory lock); the node notices too.
KEEPALIVES = {"idle": 10, "interval": 5, "count": 3}


def dedicated_connection(engine: Engine, purpose: str) -> Any:
    """A psycopg connection of its own, in autocommit, beside ``engine``'s pool (for
    PostgreSQL only): for what lives as long as a session (an advisory lock held by
    a leader, a LISTEN). ``purpose`` goes into its ``application_name`` (after the
    URL's own, if it names one), so ``pg_stat_activity`` shows which node holds what."""
    import psycopg

    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    named = engine.url.query.get("application_name")  # a node's name for its connections
    name = f"{named} ({purpose})" if isinstance(named, str) else f"dicomrouter {purpose}"
    server = " ".join(f"-c tcp_keepalives_{k}={v}" for k, v in KEEPALIVES.items())
    return psycopg.connect(
        url,
        autocommit=True,
        application_name=name[:63],
        options=server,
        keepalives=1,
        keepalives_idle=KEEPALIVES["idle"],
        keepalives_interval=KEEPALIVES["interval"],
        keepalives_count=KEEPALIVES["count"],
        connect_timeout=10,
    )


def begin_write_sql(dialect_name: str) -> str | None:
    """What opens a write transaction on a raw DBAPI connection of the index. SQLite
    connections run with ``isolation_level = None`` (each statement commits on its
    own) so a transaction of several statements starts with ``BEGIN IMMEDIATE`` (the
    write lock up-front); psycopg opens one implicitly: None."""
    return "BEGIN IMMEDIATE" if dialect_name == SQLITE else None


def groups_commits_itself(dialect_name: str) -> bool:
    """Whether the database already shares one WAL flush among the commits of
    concurrent connections. PostgreSQL does (its WAL writer flushes every commit
    waiting at that moment): grouping the receiver's rows in one transaction on top
    only serialised them, 2x slower per row with four senders (docs/benchmarks.md).
    SQLite lets one writer in at a time, each commit its own fsync: there the
    receiver groups them (``store.groupcommit``)."""
    return dialect_name == POSTGRESQL


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a DBAPI error, or of the one an SQLAlchemy error wraps (psycopg
    sets it; sqlite3 has none)."""
    for candidate in (exc, getattr(exc, "orig", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def is_busy(exc: BaseException) -> bool:
    """Whether ``exc`` means another writer held the index and the same statement can
    succeed when tried again. PostgreSQL says so by SQLSTATE; SQLite only in its
    message ("database is locked", "database table is locked", SQLITE_BUSY)."""
    state = sqlstate(exc)
    if state is not None:
        return state in BUSY_SQLSTATES
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def upsert_insert(dialect_name: str, table: Table) -> Any:
    """``INSERT INTO table`` in the flavour that has ``on_conflict_do_update`` and
    ``on_conflict_do_nothing`` for this dialect. (The dialect modules load here, on
    first use: importing them costs tens of milliseconds that a CLI command or the
    HTTP process need not pay at start-up.)"""
    from sqlalchemy.dialects import postgresql, sqlite

    if dialect_name == POSTGRESQL:
        return postgresql.insert(table)
    if dialect_name == SQLITE:
        return sqlite.insert(table)
    raise NotImplementedError(f"ON CONFLICT on {dialect_name}")  # pragma: no cover


class int_part(FunctionElement[int]):  # noqa: N801 (an SQL function, named like one)
    """The integer part of a number (towards zero). ``CAST(x AS INTEGER)`` is that on
    SQLite, but rounds to the nearest on PostgreSQL."""

    type = Integer()
    name = "int_part"
    inherit_cache = True


@compiles(int_part)
def _int_part(element: int_part, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS INTEGER)"


@compiles(int_part, POSTGRESQL)
def _int_part_postgresql(element: int_part, compiler: Any, **kw: Any) -> str:
    return f"CAST(trunc({compiler.process(element.clauses, **kw)}) AS BIGINT)"


class like_any_case(FunctionElement[bool]):  # noqa: N801 (an SQL operator, named like one)
    """``column LIKE pattern ESCAPE '\\'`` matching letters in any case, as SQLite's
    LIKE does (ASCII letters); PostgreSQL's LIKE is case-sensitive: ILIKE there.
    Arguments: the column, the pattern."""

    type = Boolean()
    name = "like_any_case"
    inherit_cache = True
    _is_implicitly_boolean = True  # a comparison: no "= 1" on SQLite


def _like_operands(element: like_any_case, compiler: Any, **kw: Any) -> tuple[str, str]:
    column, pattern = element.clauses.clauses
    return compiler.process(column, **kw), compiler.process(pattern, **kw)


@compiles(like_any_case)
def _like_any_case(element: like_any_case, compiler: Any, **kw: Any) -> str:
    column, pattern = _like_operands(element, compiler, **kw)
    return f"{column} LIKE {pattern} ESCAPE '\\'"


@compiles(like_any_case, POSTGRESQL)
def _like_any_case_postgresql(element: like_any_case, compiler: Any, **kw: Any) -> str:
    column, pattern = _like_operands(element, compiler, **kw)
    return f"{column} ILIKE {pattern} ESCAPE '\\'"
