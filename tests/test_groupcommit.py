"""Group commit: the receiver's index rows from concurrent associations share one
transaction, and each caller returns only once the transaction holding its row has
committed. Checked on the real index (both databases) and on the mechanism itself."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from dicomrouter.store import InstanceHeader, InstanceIndex, Provenance, create_index_engine
from dicomrouter.store.groupcommit import GroupCommit
from dicomrouter.store.schema import instances


def _header(n: int) -> InstanceHeader:
    return InstanceHeader(
        sop_instance_uid=f"1.2.3.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.0",
        patient_id="P",
        patient_name="DOE^J",
        accession_number="A",
        study_date="20261206",
        study_description="",
        modality="CT",
    )


class _Blocking:
    """A transaction that waits for ``release`` on its first call, so that the
    callers arriving meanwhile have to gather behind it."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.batches: list[int] = []
        self.committed: list[Any] = []

    def __call__(self, works: list[Any]) -> list[Any]:
        if not self.batches:
            self.entered.set()
            self.release.wait(10)
        self.batches.append(len(works))
        results = [work(None) for work in works]
        if any(isinstance(r, ValueError) for r in results):
            raise next(r for r in results if isinstance(r, ValueError))
        self.committed += results
        return results


def _run_concurrently(group: GroupCommit, blocking: _Blocking, works: list[Any]) -> list[Any]:
    """The first work starts a transaction that blocks; the others arrive while it
    runs; then it is released. Returns each caller's result or exception."""
    outcomes: list[Any] = [None] * len(works)

    def call(i: int) -> None:
        try:
            outcomes[i] = group.run(works[i])
        except Exception as exc:
            outcomes[i] = exc

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert blocking.entered.wait(10)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, len(works))]
    for thread in others:
        thread.start()
    while len(group._waiting) < len(works) - 1:  # all gathered behind the first
        threading.Event().wait(0.01)
    blocking.release.set()
    for thread in [first, *others]:
        thread.join(10)
    return outcomes


def test_callers_arriving_during_a_commit_share_the_next_one() -> None:
    blocking = _Blocking()
    group = GroupCommit(blocking)
    outcomes = _run_concurrently(group, blocking, [lambda _c, i=i: i for i in range(5)])
    assert outcomes == [0, 1, 2, 3, 4]
    assert blocking.batches == [1, 4]  # the first alone, the four others together
    assert (group.transactions, group.rows) == (2, 5)


def test_a_failing_work_fails_only_its_own_caller() -> None:
    blocking = _Blocking()
    group = GroupCommit(blocking)

    def bad(_cursor: Any) -> Any:
        return ValueError("bad row")

    works = [lambda _c: "a", lambda _c: "b", bad, lambda _c: "d"]
    outcomes = _run_concurrently(group, blocking, works)
    assert outcomes[:2] == ["a", "b"] and outcomes[3] == "d"
    assert isinstance(outcomes[2], ValueError)
    # The group of three failed as a whole; then each was tried on its own.
    assert blocking.batches == [1, 3, 1, 1, 1]
    assert sorted(blocking.committed) == ["a", "b", "d"]


@pytest.fixture
def engine(index_url: str) -> Iterator[Engine]:
    create_index_engine(index_url).dispose()
    engine = create_index_engine(index_url, create=False, busy_timeout_ms=0)
    yield engine
    engine.dispose()


def test_concurrent_rows_are_all_committed(engine: Engine) -> None:
    """Sixteen threads record at once; every call returns its generation with its row
    committed. On SQLite the rows shared transactions; PostgreSQL shares the flush of
    concurrent commits itself, and each row is its own transaction there."""
    index = InstanceIndex(engine)
    index.prepare()
    start = threading.Barrier(16)
    results: dict[int, int] = {}

    def record(n: int) -> None:
        start.wait()
        for k in range(10):
            generation = index.record_generation(
                _header(n * 100 + k), f"p/{n}/{k}", 10, Provenance("CT")
            )
            results[n * 100 + k] = generation

    threads = [threading.Thread(target=record, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results.values()) == [1] * 160
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(instances)).scalar() == 160
    if engine.dialect.name == "sqlite":
        assert index.group is not None
        assert index.group.rows == 160
        assert index.group.transactions < 160
    else:
        assert index.group is None
