"""The CSV tables of ``map``: read when first needed, reloaded when they change.

A table is two columns, original value then new value, UTF-8 (a BOM is allowed).
Blank lines are skipped; a first row whose first cell is ``original`` (any case) is a
header. Cells are stripped of surrounding spaces. A row with another number of cells,
an empty original, or an original listed twice with different new values makes the
table malformed: a wrong lookup is worse than none.

Sites edit these files while the router runs, so the file's modification time and
size are compared with the loaded copy, at most once a second (a ``stat`` per object
would be cheap, but a burst of thousands of objects does not need thousands). A table
that is missing or malformed at run time makes the pipeline *unavailable*
(:class:`~.base.TransformUnavailable`): deliveries wait and retry instead of going out
unmapped. ``check`` reports the same problems before that (:func:`read_table`).
"""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

from .base import TransformUnavailable

#: Seconds between two checks of a table's modification time and size.
RECHECK_INTERVAL = 1.0
_HEADER_WORDS = frozenset({"original"})


class TableError(ValueError):
    """A table file that cannot be used; the message names the file and the line."""


def read_table(path: Path) -> dict[str, str]:
    """The table in ``path``, or :class:`TableError` (missing, unreadable, malformed)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TableError(f"{path}: cannot read: {exc}") from None
    table: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if not table and number == 1 and cells[0].lower() in _HEADER_WORDS:
            continue
        if len(cells) != 2:
            raise TableError(
                f"{path}, line {number}: {len(cells)} cell(s), expected 2 (original,new)"
            )
        original, new = cells
        if not original:
            raise TableError(f"{path}, line {number}: empty original value")
        if table.get(original, new) != new:
            raise TableError(
                f"{path}, line {number}: {original!r} is listed twice with different values"
            )
        table[original] = new
    return table


class LookupTable:
    """One ``map`` table file, reloaded when it changes. Thread-safe: the dispatcher
    runs deliveries in parallel."""

    def __init__(self, path: Path):
        self.path = path
        self._clock = time.monotonic
        self._lock = threading.Lock()
        self._table: dict[str, str] | None = None
        self._signature: tuple[int, int] | None = None
        self._checked_at = float("-inf")

    def get(self, value: str) -> str | None:
        """The new value for ``value``, or None when the table does not list it.
        :class:`TransformUnavailable` when the file is missing or malformed."""
        return self.current().get(value)

    def current(self) -> dict[str, str]:
        with self._lock:
            now = self._clock()
            if self._table is not None and now - self._checked_at < RECHECK_INTERVAL:
                return self._table
            self._checked_at = now
            try:
                stat = os.stat(self.path)
            except OSError as exc:
                self._table = None
                raise TransformUnavailable(f"lookup table {self.path}: {exc.strerror}") from None
            signature = (stat.st_mtime_ns, stat.st_size)
            if self._table is None or signature != self._signature:
                try:
                    table = read_table(self.path)
                except TableError as exc:
                    self._table = None
                    raise TransformUnavailable(f"lookup table {exc}") from None
                self._table, self._signature = table, signature
            return self._table
