"""The re-identification mapping's rows (``pseudonym_map``): written by the dispatch
worker before a de-identified copy is sent, read by ``control.reidentify``.

Everything here is already sealed: the originals arrive encrypted and leave
encrypted (the key is the transforms' business, ``transforms.mapping``). Recording
is insert-or-ignore on (pipeline, kind, lookup): the same mapping recorded twice,
by two workers, after a retry or a restart, is one row.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from .dialect import upsert_insert
from .schema import pseudonym_map

#: Columns a recorded row is given (``recorded_at`` is added here).
FIELDS = ("pipeline", "kind", "lookup", "pseudonym", "sealed", "key_id")


def _insert_or_ignore(conn: Connection) -> Any:
    return upsert_insert(conn.dialect.name, pseudonym_map).on_conflict_do_nothing(
        index_elements=["pipeline", "kind", "lookup"]
    )


def record(engine: Engine, rows: Iterable[Mapping[str, str]]) -> int:
    """Commit ``rows`` (each with :data:`FIELDS`) in one transaction, ignoring those
    already recorded. Returns how many were offered (after removing duplicates
    within the batch). Raises what the database raises: the caller must not send
    what it could not record."""
    now = time.time()
    unique: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        values: dict[str, Any] = {name: row[name] for name in FIELDS}
        values["recorded_at"] = now
        unique.setdefault((values["pipeline"], values["kind"], values["lookup"]), values)
    if not unique:
        return 0
    with engine.begin() as conn:
        conn.execute(_insert_or_ignore(conn), list(unique.values()))
    return len(unique)


def by_pseudonym(engine: Engine, pseudonym: str) -> list[dict[str, Any]]:
    """Every row recorded under ``pseudonym`` (any pipeline, any kind), oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(pseudonym_map)
            .where(pseudonym_map.c.pseudonym == pseudonym)
            .order_by(pseudonym_map.c.id)
        )
        return [dict(row._mapping) for row in rows]


def by_lookup(engine: Engine, lookups: Sequence[str]) -> list[dict[str, Any]]:
    """Every row whose look-up hash is one of ``lookups``, oldest first."""
    if not lookups:
        return []
    with engine.connect() as conn:
        rows = conn.execute(
            select(pseudonym_map)
            .where(pseudonym_map.c.lookup.in_(list(lookups)))
            .order_by(pseudonym_map.c.id)
        )
        return [dict(row._mapping) for row in rows]


def count(engine: Engine) -> int:
    """How many rows the mapping holds (for status and tests)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(pseudonym_map)).scalar_one())
