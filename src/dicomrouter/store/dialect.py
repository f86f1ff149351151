"""What differs between the index's two databases, SQLite and PostgreSQL, in one place.

Everything else is SQLAlchemy Core, written once. Here: the INSERT that has
``ON CONFLICT`` (both databases share the syntax, SQLAlchemy has one construct per
dialect), which errors mean "the index is busy, try again", and the lock that gives
PostgreSQL's writers SQLite's one-writer-at-a-time (see ``database.py``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Integer, Table
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
