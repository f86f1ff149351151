"""Group commit: the index rows of concurrent associations share one transaction.

Each C-STORE is answered only once its row is committed, and a durable commit costs
an fsync (SQLite's WAL with ``synchronous=FULL``, PostgreSQL's WAL flush). One commit
per row makes N modalities sending at once queue for N fsyncs one after the other.
Here the first association thread to arrive commits what is waiting; the threads that
arrive while that commit runs gather behind it and the first of them commits all
their rows in one transaction, one fsync, as soon as the previous commit returns. No
thread waits for company: alone, a row is committed at once, as before. Used on
SQLite, whose single writer lock makes each commit its own fsync; PostgreSQL already
flushes concurrent commits together (``dialect.groups_commits_itself``).

The promise is unchanged: :meth:`GroupCommit.run` returns (or raises) only after the
transaction holding that thread's work has committed (or failed). A transaction that
fails for another reason than a busy index is tried again one piece of work at a
time (unless the index was busy all along), so a bad row costs only its own sender
an error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Work = Callable[[Any], Any]
"""A piece of work: given a DBAPI cursor inside the transaction, returns its result."""

Transaction = Callable[[list[Work]], list[Any]]
"""Runs works in one committed transaction and returns their results, in order (or
raises: nothing of it was committed)."""


class _Slot:
    __slots__ = ("work", "done", "result", "error")

    def __init__(self, work: Work):
        self.work = work
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    """Commits the works of concurrent callers together (see the module docstring)."""

    def __init__(
        self, transaction: Transaction, alone: Callable[[BaseException], bool] = lambda e: True
    ):
        """``alone(error)``: whether the works of a failed transaction are worth trying
        one at a time (not when the index was busy for the whole lock wait)."""
        self._transaction = transaction
        self._alone = alone
        self._changed = threading.Condition(threading.Lock())
        self._waiting: list[_Slot] = []
        self._committing = False
        #: How many transactions and rows so far (for the benchmarks and tests).
        self.transactions = 0
        self.rows = 0

    def run(self, work: Work) -> Any:
        """Run ``work`` in a transaction that is committed when this returns."""
        slot = _Slot(work)
        batch: list[_Slot] = []
        with self._changed:
            self._waiting.append(slot)
            while self._committing and not slot.done:
                self._changed.wait()
            if not slot.done:  # this thread commits everything waiting, its own included
                batch, self._waiting = self._waiting, []
                self._committing = True
        if batch:
            try:
                self._commit(batch)
            finally:
                with self._changed:
                    self._committing = False
                    self._changed.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _commit(self, batch: list[_Slot]) -> None:
        try:
            results = self._transaction([slot.work for slot in batch])
        except BaseException as exc:
            if len(batch) == 1 or not self._alone(exc):
                for slot in batch:
                    slot.error = exc
            else:  # one bad row must not fail its neighbours: each on its own
                for slot in batch:
                    self._commit([slot])
                return
        else:
            self.transactions += 1
            self.rows += len(batch)
            for slot, result in zip(batch, results, strict=True):
                slot.result = result
        for slot in batch:
            slot.done = True
