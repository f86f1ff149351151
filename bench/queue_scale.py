"""What the dispatch process asks of the index as the queue grows (issue 14: claim and
plan cost flat from 1k to 1M queued jobs, on SQLite and PostgreSQL). Run through
``bench/index_queries.py --queue``.

For each size N and database, one index holding N queued jobs: one instance each
(10 per study): a quarter for ``archive``, an eighth for ``m1`` through the group
``pool`` (``m1``, ``m2``; ``m2`` paused as unreachable), the rest for ``pacs``; 10% urgent
and 10% low priority; one job in 7 backing off (due in an hour); one fired study
trigger per study; one finished storage commitment per 100 jobs. Generation is bulk
(``executemany`` on SQLite, ``COPY`` on PostgreSQL, one transaction per table),
timed apart; PostgreSQL then gets ``VACUUM ANALYZE`` as autovacuum would.

Then ``repeats`` rounds; each round runs every call once on every index, the sizes
interleaved, and the median of the rounds is reported with the ratio of the largest
size to the smallest:

- ``claim``: ``JobStore.claim`` of ``pacs``, 200 jobs (the worker's ``max_items``
  of 5 batches); ``finish``: that claim settled, every instance delivered (the
  results are recorded before the clock starts);
- ``plan``: ``Planner.route_new_instances`` of 100 new instances (10 new studies)
  through three routes: instance-level to ``pacs``, urgent to the group ``pool``,
  and a study trigger to ``archive``;
- ``fire``: ``Planner.fire_stable_triggers`` with 10 studies gone quiet;
- ``recover``: ``JobStore.recover`` with 20 expired leases;
- the dispatcher's periodic reads and writes: ``open_jobs_by_destination`` (at
  start and on reload), ``wake_destination`` of ``archive`` (a paused destination
  answers again; 200 of its jobs back off, from its last claims before the pause),
  ``groups.move_waiting`` (nothing to move), ``commitment.expire`` (nothing due),
  ``unplanned.due``.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, update

from dicomrouter.config import RouterConfig, parse_config
from dicomrouter.queue import JobStore, Planner, commitment, groups, unplanned
from dicomrouter.queue.jobs import ItemResult
from dicomrouter.store import ObjectStore, create_index_engine
from dicomrouter.store.schema import instances, jobs, triggers

STUDY = 10  # instances per study
CLAIM = 200


def _config(root: Path) -> RouterConfig:
    peer = {"ae_title": "P", "host": "127.0.0.1", "port": 4242}
    return parse_config(
        {
            "storage": {"path": str(root)},
            "destinations": {
                "pacs": peer,
                "archive": peer,
                "m1": peer,
                "m2": peer,
                "pool": {"type": "group", "members": ["m1", "m2"]},
            },
            "routes": [
                {"name": "all", "trigger": "instance", "to": ["pacs"]},
                {"name": "pooled", "trigger": "instance", "to": ["pool"], "priority": "urgent"},
                {
                    "name": "studies",
                    "trigger": "study",
                    "stable_after": 60,
                    "forward": "study",
                    "to": ["archive"],
                },
            ],
        },
        environ={},
    )


def _bulk(
    engine: Engine, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
) -> None:
    """Rows in one transaction, through the driver: ``COPY`` on PostgreSQL, one
    ``executemany`` on SQLite."""
    names = ", ".join(columns)
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        if engine.dialect.name == "postgresql":
            with raw.cursor() as cursor, cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" * len(columns))
            raw.cursor().executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)


def _destination(i: int) -> str:
    return "archive" if i % 4 == 3 else "m1" if i % 8 == 1 else "pacs"


def build(url: str, n: int) -> float:
    """The index of ``n`` queued jobs (module docstring); returns the seconds taken."""
    started = time.perf_counter()
    engine = create_index_engine(url)
    now = time.time()
    _bulk(
        engine,
        "instances",
        ("id", "sop_instance_uid", "sop_class_uid", "transfer_syntax_uid",
         "study_instance_uid", "series_instance_uid", "patient_id", "patient_name",
         "accession_number", "study_date", "study_description", "modality", "path", "size",
         "received_at", "calling_ae", "called_ae", "source_address", "generation", "routed"),
        ((i + 1, f"1.2.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
          f"1.3.{i // STUDY}", f"1.4.{i // STUDY}", f"P{i // STUDY % 5000}", "DOE^J",
          f"A{i // STUDY}", "20261122", "CT HEAD", "CT", f"x/{i}.dcm", 9000,
          now - (n - i) * 0.1, "CT1", "R", "127.0.0.1", 1, 1) for i in range(n)),
    )  # fmt: skip

    def job(i: int) -> tuple[Any, ...]:
        created = now - (n - i) * 0.1
        return (
            i + 1, _destination(i), "instance", f"1.2.{i}", f"1.3.{i // STUDY}",
            {"archive": "studies", "m1": "pooled"}.get(_destination(i), "all"), "", "pending",
            10 if i % 10 == 0 else -10 if i % 10 == 9 else 0, 0, 0,
            now + 3600 if i % 7 == 6 else created, created, created,
            "pool" if _destination(i) == "m1" else None,
        )  # fmt: skip

    _bulk(
        engine,
        "jobs",
        ("id", "destination", "level", "resource_uid", "study_instance_uid", "routes",
         "transform", "state", "priority", "attempts", "connection_failures",
         "next_attempt_at", "created_at", "updated_at", "via_group"),
        (job(i) for i in range(n)),
    )  # fmt: skip
    _bulk(
        engine,
        "job_instances",
        ("job_id", "instance_id", "destination", "generation", "state", "updated_at", "transform"),
        ((i + 1, i + 1, _destination(i), 1, "pending", now, "")
         for i in range(n)),
    )  # fmt: skip
    _bulk(
        engine,
        "triggers",
        ("id", "route", "level", "uid", "study_instance_uid", "last_arrival", "pending",
         "fired_at"),
        ((s + 1, "studies", "study", f"1.3.{s}", f"1.3.{s}", now - 7200, 0, now - 3600)
         for s in range(n // STUDY)),
    )  # fmt: skip
    _bulk(
        engine,
        "commitments",
        ("transaction_uid", "destination", "job_ids", "sent_at", "deadline", "state",
         "instances", "failed", "finished_at"),
        ((f"2.25.{c}", "pacs", str(c * 100 + 1), now - 600, now - 300, "committed", 100, 0,
          now - 590) for c in range(max(n // 100, 1))),
    )  # fmt: skip
    _bulk(
        engine,
        "destination_state",
        ("name", "state", "admin_paused", "consecutive_failures", "paused_since",
         "next_probe_at", "updated_at"),
        [("m2", "paused", 0, 3, now - 60, now + 3600, now)],
    )  # fmt: skip
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            for table in ("instances", "jobs", "triggers"):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()
    return time.perf_counter() - started


class Subject:
    """One index of one size: the calls measured on it, and what each needs first."""

    def __init__(self, url: str, root: Path, n: int) -> None:
        self.n = n
        self.config = _config(root)
        self.engine = create_index_engine(url, create=False)
        self.queue = JobStore(self.engine)
        self.planner = Planner(self.config, self.engine, ObjectStore(root, self.config.node.name))
        self.policies = commitment.policies(self.config.destinations)
        self.round = 0
        self.claimed: Any = None

    def calls(self) -> dict[str, tuple[Callable[[], Any] | None, Callable[[], Any]]]:
        """name -> (setup, not timed; the call, timed)."""
        archive = self.config.destinations["archive"]
        pacs = self.config.destinations["pacs"]
        return {
            "claim 200 jobs": (None, self._claim),
            "finish the claim": (self._deliver, lambda: self.queue.finish(
                self.claimed, pacs, True, 60.0, "", "completed", len(self.claimed.items), 0)),
            "plan 100 new instances": (self._receive, self.planner.route_new_instances),
            "fire 10 stable triggers": (self._go_quiet, self.planner.fire_stable_triggers),
            "recover (20 expired)": (self._expire, self.queue.recover),
            "open_jobs_by_destination": (None, self.queue.open_jobs_by_destination),
            "wake_destination": (self._back_off, lambda: self.queue.wake_destination(
                "archive", archive)),
            "groups.move_waiting": (None, lambda: groups.move_waiting(
                self.engine, self.config, time.time(), self.planner.reader)),
            "commitment.expire": (None, lambda: commitment.expire(self.engine, self.policies)),
            "unplanned.due": (None, lambda: unplanned.due(self.planner.reader, time.time(), 100)),
        }  # fmt: skip

    def _claim(self) -> None:
        self.claimed = self.queue.claim("pacs", f"bench:{self.round}", 60.0, CLAIM, CLAIM * 5)

    def _deliver(self) -> None:
        self.queue.record_results(
            [ItemResult(i.job_id, i.instance_id, "completed", 0, "") for i in self.claimed.items]
        )

    def _receive(self) -> None:
        """100 new instances in 10 new studies, as the receiver records them."""
        first = self.n + self.round * 100
        now = time.time()
        rows = [
            {"sop_instance_uid": f"1.2.{i}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
             "transfer_syntax_uid": "1.2.840.10008.1.2.1",
             "study_instance_uid": f"1.3.{i // STUDY}",
             "series_instance_uid": f"1.4.{i // STUDY}", "patient_id": f"P{i // STUDY % 5000}",
             "path": f"x/{i}.dcm", "size": 9000, "received_at": now, "generation": 1, "routed": 0}
            for i in range(first, first + 100)
        ]  # fmt: skip
        with self.engine.begin() as conn:
            conn.execute(instances.insert(), rows)

    def _go_quiet(self) -> None:
        """10 studies of the queue get a late instance's arming, an hour ago."""
        studies = [f"1.3.{(self.round * 10 + k) * 7 % (self.n // STUDY)}" for k in range(10)]
        with self.engine.begin() as conn:
            conn.execute(
                update(triggers)
                .where(triggers.c.route == "studies", triggers.c.uid.in_(studies))
                .values(pending=1, last_arrival=time.time() - 3600)
            )

    def _back_off(self) -> None:
        """200 jobs of ``archive`` wait out a backoff (its last claims before the pause)."""
        ids = [(self.round * 200 + k) * 4 % self.n + 4 for k in range(200)]
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(ids), jobs.c.state == "pending")
                .values(next_attempt_at=time.time() + 600)
            )

    def _expire(self) -> None:
        """20 waiting jobs held by a worker whose lease ran out."""
        ids = [(self.round * 20 + k) * 13 % self.n + 1 for k in range(20)]
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(ids), jobs.c.state == "pending")
                .values(state="in_progress", lease_owner="dead:1", lease_expires_at=0.0)
            )

    def close(self) -> None:
        self.engine.dispose()
        self.planner.reader.dispose()


@contextlib.contextmanager
def _servers(
    databases: Sequence[str],
) -> Iterator[Callable[[str, int], contextlib.AbstractContextManager[str]]]:
    """A factory of index URLs for (database, size), PostgreSQL's cluster started once."""
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        server = None
        if "postgresql" in databases:
            from tests.support.postgres import throwaway_cluster

            server = stack.enter_context(throwaway_cluster(durable=True))

        @contextlib.contextmanager
        def url(database: str, n: int) -> Iterator[str]:
            if database == "sqlite":
                yield f"sqlite:///{folder / f'queue-{n}.sqlite'}"
            else:
                assert server is not None
                with server.database(f"queue{n}") as made:
                    yield made

        yield url


def run(sizes: Sequence[int], databases: Sequence[str], repeats: int) -> None:
    with _servers(databases) as url, contextlib.ExitStack() as stack:
        subjects: dict[tuple[str, int], Subject] = {}
        for database, n in itertools.product(databases, sizes):
            made = stack.enter_context(url(database, n))
            seconds = build(made, n)
            print(f"{database}: built {n} queued jobs in {seconds:.1f} s", flush=True)
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            subjects[(database, n)] = subject = Subject(made, root, n)
            stack.callback(subject.close)
        times: dict[tuple[str, int, str], list[float]] = {}
        for round_ in range(repeats):
            for (database, n), subject in subjects.items():
                subject.round = round_
                for name, (setup, call) in subject.calls().items():
                    if setup is not None:
                        setup()
                    begin = time.perf_counter()
                    call()
                    times.setdefault((database, n, name), []).append(time.perf_counter() - begin)
            print(f"round {round_ + 1} of {repeats} done", flush=True)
        names = list(next(iter(subjects.values())).calls())
        for database in databases:
            print(f"\n{database}: median ms of {repeats}, sizes in queued jobs")
            head = "".join(f"{n:>10}" for n in sizes)
            print(f"{'call':28}{head}{'ratio':>8}")
            for name in names:
                ms = [statistics.median(times[(database, n, name)]) * 1000 for n in sizes]
                cells = "".join(f"{m:10.1f}" for m in ms)
                print(f"{name:28}{cells}{ms[-1] / ms[0]:8.1f}")


def _jobs_only(engine: Engine, n: int, backing_off: bool) -> None:
    """The ``jobs`` table of the main run alone (no instances nor deliveries): the
    claim's first statements and the schema-10 indexes read nothing else."""
    now = time.time()
    _bulk(
        engine,
        "jobs",
        ("id", "destination", "level", "resource_uid", "study_instance_uid", "routes",
         "transform", "state", "priority", "attempts", "connection_failures",
         "next_attempt_at", "created_at", "updated_at"),
        ((i + 1, _destination(i), "instance", f"1.2.{i}", f"1.3.{i // STUDY}", "all", "",
          "pending", 10 if i % 10 == 0 else -10 if i % 10 == 9 else 0, 0, 0,
          now + 3600 if backing_off or i % 7 == 6 else now - (n - i) * 0.1, now, now)
         for i in range(n)),
    )  # fmt: skip
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE jobs")


def _claims_ms(queue: JobStore, repeats: int, max_jobs: int) -> float:
    """Median of claims of ``pacs``, each released (the same jobs each time)."""
    times = []
    for round_ in range(repeats):
        begin = time.perf_counter()
        claim = queue.claim("pacs", f"bench:{round_}", 60.0, max_jobs)
        times.append(time.perf_counter() - begin)
        if claim is not None:
            queue.release(claim)
    return statistics.median(times) * 1000


def backing_off(sizes: Sequence[int], databases: Sequence[str], repeats: int) -> None:
    """What was measured apart from the main run, per size: a claim of 20 when every
    job of ``pacs`` backs off but the newest 0, 100 or 5000 jobs (a destination that
    refused everything for a while); then the upgrade of that ``jobs`` table from
    schema 9 (revision 0010: its two indexes built in the upgrade's transaction)."""
    with _servers(databases) as url:
        for database, n in itertools.product(databases, sizes):
            with url(database, n) as made:
                engine = create_index_engine(made)
                _jobs_only(engine, n, backing_off=True)
                queue = JobStore(engine)
                for due in (0, 100, 5000):
                    ids = list(range(max(n - due, 0) + 1, n + 1))
                    for start in range(0, len(ids), 500):
                        with engine.begin() as conn:
                            conn.execute(
                                update(jobs)
                                .where(jobs.c.id.in_(ids[start : start + 500]))
                                .values(next_attempt_at=0.0)
                            )
                    ms = _claims_ms(queue, repeats, 20)
                    print(f"{database} {n}: the newest {due} due, claim of 20: {ms:.1f} ms")
                with engine.begin() as conn:
                    for statement in (
                        "DROP INDEX ix_jobs_waiting",
                        "DROP INDEX ix_jobs_resource",
                        "CREATE INDEX ix_jobs_resource ON jobs (destination, level, resource_uid)",
                        "UPDATE alembic_version SET version_num = '0009'",
                        "UPDATE meta_info SET value = '9' WHERE key = 'schema'",
                    ):
                        conn.exec_driver_sql(statement)
                engine.dispose()
                begin = time.perf_counter()
                create_index_engine(made).dispose()
                took = time.perf_counter() - begin
                print(f"{database} {n}: upgrade from schema 9 to 10 in {took:.1f} s", flush=True)
