"""Instance records: what the receiver writes and the later stages read."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

from sqlalchemy import Engine, bindparam, literal_column, select

from .dialect import begin_write_sql, groups_commits_itself, is_busy, upsert_insert
from .groupcommit import GroupCommit, Work
from .header import InstanceHeader
from .schema import instances

_LOCK_WAIT = 60.0  # seconds before a locked index is reported as an error (0xA700)
_LOCK_RETRY_SLEEP = 0.0003


def _parameters(order: tuple[str, ...] | None, values: dict[str, Any]) -> Any:
    """DBAPI parameters: a tuple in ``order`` for positional dialects, else the dict."""
    return tuple(values[name] for name in order) if order is not None else values


def _busy_cause(exc: BaseException) -> bool:
    """Whether ``exc`` (an :class:`IndexUnavailable`) comes from a lock held too long."""
    return exc.__cause__ is not None and is_busy(exc.__cause__)


class IndexUnavailable(RuntimeError):
    """The index could not be written (locked too long, disk error...): the receiver
    answers 0xA700 so the sender retries later."""


class Recorded(StrEnum):
    NEW = "new"
    OVERWRITTEN = "overwritten"
    KEPT = "kept"  # already indexed, and the call asked not to replace it


@dataclass(frozen=True)
class Provenance:
    """Who sent an instance; the rules' pseudo-keys read these."""

    calling_ae: str = ""
    called_ae: str = ""
    source_address: str = ""


class InstanceIndex:
    def __init__(self, engine: Engine):
        self.engine = engine
        # The receiver's rows: concurrent associations share one commit (groupcommit),
        # where the database does not do it itself.
        self.group: GroupCommit | None = None
        if not groups_commits_itself(engine.dialect.name):
            self.group = GroupCommit(self._transaction, alone=lambda exc: not _busy_cause(exc))
        self._begin = begin_write_sql(engine.dialect.name)

    def prepare(self) -> None:
        """Compile the receive path's statements now (importing the SQL dialects and
        compiling costs 25-100 ms), not during the first C-STORE."""
        for name in ("_exists_sql", "_insert_sql", "_upsert_sql"):
            getattr(self, name)  # cached_property: compiled once, then kept

    def exists(self, sop_instance_uid: str) -> bool:
        sql, order = self._exists_sql
        values = {"uid": sop_instance_uid}
        params = _parameters(order, values)

        def query(cursor: Any) -> bool:
            cursor.execute(sql, params)
            return cursor.fetchone() is not None

        return bool(self._run(query, commit=False))

    @cached_property
    def _exists_sql(self) -> tuple[str, tuple[str, ...] | None]:
        statement = select(instances.c.id).where(
            instances.c.sop_instance_uid == bindparam("uid"), instances.c.purged_at.is_(None)
        )
        return self._compile(statement)

    def _run(self, work: Any, commit: bool) -> Any:
        """Run ``work(cursor)`` on a pooled DBAPI connection; retry while another
        process holds the write lock (short sleeps: the caller is a C-STORE waiting)."""
        deadline = time.monotonic() + _LOCK_WAIT
        while True:
            try:
                raw = self.engine.raw_connection()
            except Exception as exc:
                raise IndexUnavailable(f"cannot open the index: {exc}") from exc
            try:
                cursor = raw.cursor()
                result = work(cursor)
                cursor.close()
                if commit:
                    raw.commit()
                return result
            except Exception as exc:  # the DBAPI's own OperationalError on this path
                raw.rollback()
                if not is_busy(exc) or time.monotonic() > deadline:
                    raise IndexUnavailable(str(exc)) from exc
            finally:
                raw.close()
            time.sleep(_LOCK_RETRY_SLEEP)

    def record(
        self,
        header: InstanceHeader,
        relative_path: str,
        size: int,
        provenance: Provenance,
        received_at: float | None = None,
        replace: bool = True,
    ) -> Recorded:
        """Insert the instance, or replace the record of the same SOP Instance UID as a
        new generation (to be routed again). One statement; committed on return.

        ``replace=False`` keeps an existing record (``on_duplicate: ignore``)."""
        generation = self.record_generation(
            header, relative_path, size, provenance, received_at, replace
        )
        if generation == 0:
            return Recorded.KEPT
        return Recorded.NEW if generation == 1 else Recorded.OVERWRITTEN

    def record_generation(
        self,
        header: InstanceHeader,
        relative_path: str,
        size: int,
        provenance: Provenance,
        received_at: float | None = None,
        replace: bool = True,
    ) -> int:
        """:meth:`record`, returning the generation now indexed (0: the existing record
        was kept). The receiver needs it to retract exactly its own copy (:meth:`retract`).
        Committed on return; on SQLite with the rows of concurrent callers
        (:class:`.GroupCommit`)."""
        values = {
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "patient_id": header.patient_id[:64],
            "patient_name": header.patient_name[:324],
            "accession_number": header.accession_number[:64],
            "study_date": header.study_date[:8],
            "study_description": header.study_description[:64],
            "modality": header.modality[:16],
            "path": relative_path,
            "size": size,
            "received_at": received_at or time.time(),
            "calling_ae": provenance.calling_ae[:16],
            "called_ae": provenance.called_ae[:16],
            "source_address": provenance.source_address[:64],
            "generation": 1,
            "routed": 0,
            "purged_at": None,
            "purge_reason": None,
        }
        sql, order = self._upsert_sql if replace else self._insert_sql
        params = _parameters(order, values)

        # The receive hot path: one pre-compiled statement on a pooled DBAPI connection.
        # An Engine transaction costs more than the INSERT itself (profiled: 0.7 ms).
        def upsert(cursor: Any) -> int:
            cursor.execute(sql, params)
            row = cursor.fetchone()
            return 0 if row is None else int(row[0])

        if self.group is None:
            return int(self._run(upsert, commit=True))
        return int(self.group.run(upsert))

    def _transaction(self, works: list[Work]) -> list[Any]:
        """``works`` in one transaction, committed (and durable) on return."""

        def together(cursor: Any) -> list[Any]:
            if self._begin is not None:
                cursor.execute(self._begin)
            return [work(cursor) for work in works]

        return list(self._run(together, commit=True))

    def retract(self, sop_instance_uid: str, generation: int, reason: str) -> None:
        """The receiver's copy vanished between its commit and its answer: a purge took
        the file (store/retention.py). The sender is told to retry (0xA700), so this
        generation becomes a tombstone, never a live row without a file. Rare path."""
        statement = (
            instances.update()
            .where(
                instances.c.sop_instance_uid == bindparam("uid"),
                instances.c.generation == bindparam("gen"),
                instances.c.purged_at.is_(None),
            )
            .values(purged_at=bindparam("at"), purge_reason=bindparam("why"))
        )
        sql, order = self._compile(statement)
        values = {"uid": sop_instance_uid, "gen": generation, "at": time.time(), "why": reason}
        params = _parameters(order, values)
        self._run(lambda cursor: cursor.execute(sql, params), commit=True)

    @cached_property
    def _insert_sql(self) -> tuple[str, tuple[str, ...] | None]:
        """``INSERT .. ON CONFLICT DO UPDATE .. WHERE purged_at IS NOT NULL RETURNING
        generation``: no row back for a SOP Instance UID already indexed and still held
        (``on_duplicate: ignore``); one whose copy retention deleted is stored again."""
        statement = self._insert()
        statement = statement.on_conflict_do_update(
            index_elements=[instances.c.sop_instance_uid],
            set_=self._next_generation(statement),
            where=instances.c.purged_at.is_not(None),
        )
        return self._compile(statement.returning(instances.c.generation))

    @cached_property
    def _upsert_sql(self) -> tuple[str, tuple[str, ...] | None]:
        """``INSERT .. ON CONFLICT (sop_instance_uid) DO UPDATE .. RETURNING generation``:
        a SOP Instance UID received again becomes the next generation."""
        statement = self._insert()
        statement = statement.on_conflict_do_update(
            index_elements=[instances.c.sop_instance_uid], set_=self._next_generation(statement)
        )
        return self._compile(statement.returning(instances.c.generation))

    @staticmethod
    def _next_generation(statement: Any) -> dict[str, Any]:
        """Every column from the new copy (``purged_at`` back to NULL: it is live
        again), and the next generation."""
        replaced: dict[str, Any] = {
            column.name: statement.excluded[column.name]
            for column in instances.columns
            if column.name not in ("id", "sop_instance_uid", "generation")
        }
        replaced["generation"] = instances.c.generation + literal_column("1")
        return replaced

    def _insert(self) -> Any:
        """An INSERT of every column but ``id`` as named parameters, in the dialect
        flavour that has ON CONFLICT (SQLite and PostgreSQL share the syntax)."""
        columns = [c.name for c in instances.columns if c.name != "id"]
        insert = upsert_insert(self.engine.dialect.name, instances)
        return insert.values({name: bindparam(name) for name in columns})

    def _compile(self, statement: Any) -> tuple[str, tuple[str, ...] | None]:
        """SQL text for this engine's dialect, and the parameter order for positional
        dialects (None for dialects that take named parameters)."""
        compiled = statement.compile(dialect=self.engine.dialect)
        order = tuple(compiled.positiontup or ()) if self.engine.dialect.positional else None
        return str(compiled), order
